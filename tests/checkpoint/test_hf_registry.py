"""The HF family registry: every module under ``evoformer/checkpoint/hf/`` that defines a
:class:`Family` is registered exactly once, in the order export tries them."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import evoformer.checkpoint.hf as hf_package
from evoformer.checkpoint.hf import FAMILIES, Family

# Export without --family writes the first family that can express the model: order is behaviour.
EXPECTED_ORDER = [
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "olmo2",
    "olmo3",
    "phi3",
    "smollm3",
    "gemma3",
    "mixtral",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "kimi_k2",  # after deepseek_v3: the same model exports as deepseek_v3 (transformers loads it)
    "gpt_oss",
    "glm4_moe",
    "minimax_m2",
    "qwen3_next",
    "nemotron_h",
]


def _family_modules() -> dict[str, list[Family]]:
    """Module name -> the Family objects it defines, for every module in the package that has
    any (found on disk, so a new file cannot hide from the check)."""
    found = {}
    for info in pkgutil.iter_modules(hf_package.__path__):
        module = importlib.import_module(f"{hf_package.__name__}.{info.name}")
        families = [v for v in vars(module).values() if isinstance(v, Family)]
        if families:
            found[info.name] = families
    return found


def _problems(modules: dict[str, list[Family]], registry: dict[str, Family]) -> list[str]:
    bad = []
    registered = list(registry.values())
    for name, families in sorted(modules.items()):
        if len(families) != 1:
            bad.append(f"{name}: defines {len(families)} Family objects, not one")
        for family in families:
            count = sum(f is family for f in registered)
            if count != 1:
                bad.append(f"{name}: {family.name} is in FAMILIES {count} times")
    defined = [f for families in modules.values() for f in families]
    bad += [
        f"{f.name}: registered but defined by no module" for f in registered if f not in defined
    ]
    bad += [f"FAMILIES[{k!r}] is named {f.name!r}" for k, f in registry.items() if k != f.name]
    return bad


def test_every_family_module_is_registered_once() -> None:
    modules = _family_modules()
    assert len(modules) == len(EXPECTED_ORDER)
    assert _problems(modules, FAMILIES) == []


def test_registry_order() -> None:
    assert list(FAMILIES) == EXPECTED_ORDER


def test_the_check_can_fail() -> None:
    modules = _family_modules()
    stray = dataclasses.replace(FAMILIES["llama"], name="stray")
    bad = _problems({**modules, "stray": [stray]}, FAMILIES)
    assert "stray: stray is in FAMILIES 0 times" in bad
    twice = {**FAMILIES, "again": FAMILIES["gpt2"]}
    bad = _problems(modules, twice)
    assert "gpt2: gpt2 is in FAMILIES 2 times" in bad
    assert "FAMILIES['again'] is named 'gpt2'" in bad
