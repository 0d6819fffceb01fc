"""What every config check uses: a value by its dotted key, and the one-line failure."""

from __future__ import annotations

from typing import Any

from evoformer.errors import UserError


def get(cfg: object, key: str) -> Any:
    """The value at a dotted key such as ``model.d_model``; its type depends on the key."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def fail(key: str, value, why: str) -> None:
    """Raise the one-line UserError naming the key, its value and why it cannot be."""
    raise UserError(f"config: {key}={value!r}: {why}")
