"""What a resumed run may change: the settings that differ from its checkpoint's, and the ones
that cannot differ because they fix the model or the data order.

A checkpoint stores the resolved config it was trained with (``config.yaml``). Resuming compares
that with this run's config key by key: a layout, precision, learning-rate or step-count change
is reported and taken; a change of the architecture, the sequence length, the global batch, the
seed or the blend is refused with one line naming every such key (resuming would be a different
run, or fail deep inside the load). Keys the checkpoint's config does not know (added to the
schema since) are not compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from evoformer.config import Config
from evoformer.errors import UserError

# Keys (or prefixes ending in ".") a resume may not change, and exceptions among them.
FIXED = ("model.", "train.seq_len", "train.global_batch_size", "run.seed", "data.weights")
# How the same function is computed may change (the loss's chunking, the attention kernel):
# the weights and the data order stay what they were.
CHANGEABLE = ("model.dropout", "model.loss_chunk", "model.attention.sdpa_kernel")
# Keys that name where the run is, not what it is.
IGNORED = ("checkpoint.load", "run.output_dir")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def config_changes(ckpt: Path, cfg: Config) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this run's value)`` for each setting that differs."""
    path = ckpt / "config.yaml"
    if not path.is_file():
        return []
    try:
        old = flatten(OmegaConf.to_container(OmegaConf.load(path)))
    except Exception as err:  # a damaged file: say so, do not guess
        raise UserError(f"checkpoint {ckpt}: unreadable config.yaml ({err})") from None
    new = flatten(cast(dict, OmegaConf.to_container(OmegaConf.structured(cfg))))
    return [
        (key, old[key], value)
        for key, value in new.items()
        if key in old and old[key] != value and key not in IGNORED
    ]


def _fixed(key: str) -> bool:
    if key in CHANGEABLE:
        return False
    return any(key.startswith(f) if f.endswith(".") else key == f for f in FIXED)


def check_resume(ckpt: Path, cfg: Config) -> list[str]:
    """The allowed changes, as ``key old -> new`` words; raises UserError naming every change
    that fixes the model or the data order."""
    changes = config_changes(ckpt, cfg)
    fixed = [c for c in changes if _fixed(c[0])]
    if fixed:
        keys = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in fixed)
        raise UserError(
            f"cannot resume {ckpt} with changed {keys}: these fix the model or the data order; "
            "set them back, or start a new run (another run.output_dir)"
        )
    return [f"{k} {old!r} -> {new!r}" for k, old, new in changes]
