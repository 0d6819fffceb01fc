"""Weights between a ``save_pretrained`` folder and our model, driven by a family's rules.

Rules list every tensor a family can have; the ones whose evoformer tensors the configured model
lacks (biases, an untied head) are skipped, so optional tensors need no special cases. Any HF
tensor left unconsumed is an error rather than silently dropped weights. Weights are read with
``safetensors`` only: pickled ``pytorch_model.bin`` files can run arbitrary code when loaded, so
they are refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evoformer.checkpoint.hf.family import Family, WeightRule
from evoformer.errors import UserError
from evoformer.model import Transformer


def _expand(rules: Sequence[WeightRule], n_layers: int, have: set[str]) -> list[WeightRule]:
    """Per-layer copies of the rules, keeping those whose evoformer tensors the model has."""
    out = []
    for rule in rules:
        layers = range(n_layers) if any("{i}" in n for n in (rule.hf, *rule.ours)) else [None]
        for i in layers:
            r = (
                rule
                if i is None
                else dataclasses.replace(
                    rule,
                    hf=rule.hf.replace("{i}", str(i)),
                    ours=tuple(n.replace("{i}", str(i)) for n in rule.ours),
                )
            )
            present = [n in have for n in r.ours]
            if all(present):
                out.append(r)
            elif any(present):  # a bug in a rule table, not a user mistake
                raise ValueError(f"rule {r} maps onto tensors the model only partly has")
    return out


class SafetensorsReader:
    """The tensors of a ``save_pretrained`` folder (one file or an index of shards), read on
    demand so peak memory stays near one copy of the model."""

    def __init__(self, hf_dir: Path, base_prefix: str) -> None:
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{index}: not a safetensors index ({err})") from None
            files = {name: hf_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            files = {name: single for name in self._keys(single)}
        else:
            bins = [p.name for p in hf_dir.glob("pytorch_model*.bin*")]
            if bins:
                raise UserError(
                    f"{hf_dir} holds pickled PyTorch weights ({bins[0]}), which evoformer never "
                    "loads (unpickling can run arbitrary code); convert them to safetensors first "
                    "(save_pretrained in transformers >= 4.35 writes model.safetensors)"
                )
            raise UserError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        for path in set(files.values()):
            if not path.is_file():
                raise UserError(f"{hf_dir}: weight shard {path.name} is missing")
        # Bare-model files (GPT2Model, or the original GPT-2 release) lack the decoder prefix.
        if not any(n.startswith(base_prefix) for n in files):
            files = {
                (n if n.startswith("lm_head.") else base_prefix + n): p for n, p in files.items()
            }
            self._strip = base_prefix
        else:
            self._strip = ""
        self.files = files
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: unreadable safetensors file ({err})") from None

    def names(self) -> list[str]:
        return list(self.files)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        stored = name[len(self._strip) :] if self._strip and name.startswith(self._strip) else name
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            return self._handles[path].get_tensor(stored)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: cannot read tensor {stored} ({err})") from None


def _rules(family: Family, model: Transformer, have: set[str]) -> list[WeightRule]:
    extra = family.extra_rules(model.cfg) if family.extra_rules is not None else ()
    return _expand((*family.rules, *extra), model.cfg.n_layers, have)


@torch.no_grad()
def load_hf_weights(
    family: Family,
    reader: SafetensorsReader,
    model: Transformer,
    hf_cfg: dict[str, Any] | None = None,
) -> None:
    """Copy every HF tensor into the model (converting dtype), checking names and shapes."""
    ours = model.state_dict()
    rules = _rules(family, model, set(ours))
    available = set(reader.names())
    filled: dict[tuple[str, int | None], str] = {}  # (our tensor, slice) -> the HF tensor
    for rule in rules:
        if rule.hf not in available:
            raise UserError(f"{family.name}: tensor {rule.hf} is missing from the weights")
        t = reader.get(rule.hf)
        if family.transform is not None:
            t = family.transform(rule.hf, t, hf_cfg or {}, True)
        t = t.t() if rule.transpose else t
        targets = [ours[n] if rule.index is None else ours[n][rule.index] for n in rule.ours]
        sizes = [x.shape[0] for x in targets]
        parts = t.split(sizes, dim=0) if len(rule.ours) > 1 and t.shape[0] == sum(sizes) else [t]
        for name, target, part in zip(rule.ours, targets, parts):
            if len(parts) != len(rule.ours) or part.shape != target.shape:
                raise UserError(
                    f"{family.name}: tensor {rule.hf} has shape {tuple(t.shape)}, but config.json "
                    f"implies {' + '.join(str(tuple(x.shape)) for x in targets)}"
                )
            key = (name, rule.index)
            if key in filled and not torch.equal(target, part.to(target.dtype)):
                # A checkpoint may store copies (DeepSeek's MTP layers repeat the embedding).
                raise UserError(
                    f"{family.name}: tensors {filled[key]} and {rule.hf} should hold the same "
                    f"weights ({name}) but differ"
                )
            target.copy_(part)
            filled[key] = rule.hf
        available.discard(rule.hf)
    ignore = re.compile("|".join(family.ignore)) if family.ignore else None
    for name in sorted(available):
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # some tied checkpoints store the head anyway
        if ignore is not None and ignore.fullmatch(name):
            continue
        raise UserError(
            f"{family.name}: tensor {name} has no evoformer counterpart (a feature config.json "
            "does not declare, or an unsupported variant)"
        )
    filled_names = {name for name, _ in filled}
    missing = sorted(n for n, p in model.named_parameters() if n not in filled_names)
    if missing:
        raise UserError(f"{family.name}: no HF tensor provides {missing[0]}")


def hf_state_dict(family: Family, model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``family``'s HF names: fresh contiguous tensors, none shared
    (as safetensors requires), ready for ``save_file`` or an HF model's ``load_state_dict``."""
    ours = {n: t.detach() for n, t in model.state_dict().items()}
    transform = family.transform
    hf_cfg = family.to_hf_config(model.cfg) if transform is not None else {}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in _rules(family, model, set(ours)):
        parts = [ours[n] if rule.index is None else ours[n][rule.index] for n in rule.ours]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        t = t.t() if rule.transpose else t
        if transform is not None:
            t = transform(rule.hf, t, hf_cfg, False)
        out[rule.hf] = t.contiguous().clone()
        used.update(rule.ours)
    params = {n for n, _ in model.named_parameters()}
    left = sorted(params - used)
    if left:
        raise UserError(f"{family.name}: no HF tensor holds evoformer's {left[0]}")
    return out
