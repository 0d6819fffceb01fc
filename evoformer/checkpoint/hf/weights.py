"""Weights between a ``save_pretrained`` folder and our model, driven by a family's rules.

Rules list every tensor a family can have; the ones whose evoformer tensors the configured model
lacks (biases, an untied head) are skipped, so optional tensors need no special cases. Any HF
tensor left unconsumed is an error rather than silently dropped weights. Weights are read with
``safetensors`` only: pickled ``pytorch_model.bin`` files can run arbitrary code when loaded, so
they are refused.

Both directions work tensor by tensor, so nothing here holds a model: :func:`import_plan` checks
every name and shape from the files' headers and says which HF tensors make each of ours
(:meth:`ImportPlan.produce` then makes one); :func:`export_plan` says which of ours make each HF
tensor. :func:`load_hf_weights` and :func:`hf_state_dict` are the same plans applied to a model
in memory.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evoformer.checkpoint.hf import fp8, mxfp4
from evoformer.checkpoint.hf.family import Family, WeightRule
from evoformer.checkpoint.hf.stream import INDEX, SINGLE, TensorInfo, read_header
from evoformer.config.schema import ModelConfig
from evoformer.errors import UserError
from evoformer.model import Transformer

# Prefixes of a multimodal wrapper's text model (transformers 4 files and save_pretrained in 5,
# then the in-memory layout of 5) and of the parts of it evoformer does not train.
WRAPPER_TEXT = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
WRAPPER_TEXT += (("model.language_model.", "model."),)
WRAPPER_DROPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.")
WRAPPER_DROPPED += ("model.multi_modal_projector.",)


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


def family_rules(family: Family, cfg: ModelConfig, have: set[str]) -> list[WeightRule]:
    """``family``'s rules for a model of ``cfg`` whose tensors are ``have``."""
    extra = family.extra_rules(cfg) if family.extra_rules is not None else ()
    return _expand((*family.rules, *extra), cfg.n_layers, have)


class SafetensorsReader:
    """The tensors of a ``save_pretrained`` folder (one file or an index of shards). Names,
    dtypes and shapes come from the file headers; each tensor is read on demand with its file
    opened for that read only, so memory holds the tensors in flight and never a whole shard.

    ``fp8_block``: FP8 block-scaled weights are returned dequantized (bf16) and their
    ``weight_scale_inv`` tensors are consumed with them. ``wrapper``: the folder holds a
    multimodal wrapper; its text model's tensors get the text family's names and the vision
    tower and projector are left out (:attr:`dropped` counts them). ``mx``: MXFP4 tensors
    (``X_blocks`` + ``X_scales``, gpt-oss) are returned as ``X`` dequantized (bf16)."""

    def __init__(
        self,
        hf_dir: Path,
        base_prefix: str,
        fp8_block: tuple[int, int] | None = None,
        wrapper: bool = False,
        mx: bool = False,
    ) -> None:
        index = hf_dir / INDEX
        single = hf_dir / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {str(name): hf_dir / str(fname) for name, fname in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise UserError(f"{index}: not a safetensors index ({err!r})") from None
        elif single.is_file():
            files = {name: single for name in read_header(single)}
        else:
            bins = [p.name for p in hf_dir.glob("pytorch_model*.bin*")]
            if bins:
                raise UserError(
                    f"{hf_dir} holds pickled PyTorch weights ({bins[0]}), which evoformer never "
                    "loads (unpickling can run arbitrary code); convert them to safetensors first "
                    "(save_pretrained in transformers >= 4.35 writes model.safetensors)"
                )
            raise UserError(f"{hf_dir}: no {SINGLE} or {INDEX}")
        headers: dict[str, TensorInfo] = {}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise UserError(f"{hf_dir}: weight shard {path.name} is missing")
            header = read_header(path)
            headers.update({n: info for n, info in header.items() if files.get(n) == path})
        missing = sorted(set(files) - set(headers))
        if missing:
            raise UserError(f"{index}: tensor {missing[0]} is not in {files[missing[0]].name}")
        stored = {n: n for n in files}  # our-facing name -> the name in the file
        self.dropped = 0
        if wrapper:
            stored = {}
            for n in files:
                if n.startswith(WRAPPER_DROPPED):
                    self.dropped += 1
                    continue
                new = next((to + n[len(fr) :] for fr, to in WRAPPER_TEXT if n.startswith(fr)), n)
                stored[new] = n
        # Bare-model files (GPT2Model, or the original GPT-2 release) lack the decoder prefix.
        if not any(n.startswith(base_prefix) for n in stored):
            stored = {
                (n if n.startswith("lm_head.") else base_prefix + n): s for n, s in stored.items()
            }
        self.fp8_block = fp8_block
        self.scales: dict[str, str] = {}  # our-facing weight name -> its scale's stored name
        if fp8_block is not None:
            for n in [n for n in stored if n.endswith(fp8.SCALE_SUFFIX)]:
                weight = n.removesuffix(fp8.SCALE_SUFFIX)
                if weight not in stored:
                    raise UserError(f"{hf_dir}: {n} scales no tensor ({weight} is missing)")
                self.scales[weight] = stored.pop(n)
        self.mx: dict[str, tuple[str, str]] = {}  # X -> stored names of X_blocks, X_scales
        if mx:
            for n in [n for n in stored if n.endswith(mxfp4.BLOCKS)]:
                base = n.removesuffix(mxfp4.BLOCKS)
                if base + mxfp4.SCALES not in stored:
                    raise UserError(f"{hf_dir}: {n} has no {base + mxfp4.SCALES}")
                self.mx[base] = (stored.pop(n), stored.pop(base + mxfp4.SCALES))
        self.files = files
        self._stored = stored
        self._headers = headers
        self.dequantized = 0
        self.mx_read: set[str] = set()  # MXFP4 tensors dequantized (some are read twice)

    def names(self) -> list[str]:
        return list(self._stored) + list(self.mx)

    def info(self, name: str) -> TensorInfo:
        """Dtype and shape of what :meth:`get` returns (FP8 and MXFP4 weights: bf16)."""
        if name in self.mx:
            *lead, rows, groups, _ = self._headers[self.mx[name][0]].shape
            return TensorInfo(mxfp4.OUT_DTYPE, (*lead, groups * 32, rows))
        info = self._headers[self._stored[name]]
        if name in self.scales:
            return TensorInfo(fp8.OUT_DTYPE, info.shape)
        return info

    def _read(self, stored: str) -> torch.Tensor:
        path = self.files[stored]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(stored)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: cannot read tensor {stored} ({err})") from None

    def get(self, name: str) -> torch.Tensor:
        if name in self.mx:
            blocks, scales = self.mx[name]
            try:
                t = mxfp4.dequantize(self._read(blocks), self._read(scales))
            except ValueError as err:
                raise UserError(f"{blocks}: not MXFP4 ({err})") from None
            self.mx_read.add(name)
            return t
        stored = self._stored[name]
        t = self._read(stored)
        if name in self.scales:
            assert self.fp8_block is not None
            scale = self._read(self.scales[name])
            if t.dtype != torch.float8_e4m3fn or t.ndim != 2:
                raise UserError(
                    f"{stored}: has a weight_scale_inv but is {t.dtype} {tuple(t.shape)}, not a "
                    "2-D float8_e4m3fn weight"
                )
            try:
                t = fp8.dequantize(t, scale, self.fp8_block)
            except ValueError as err:
                raise UserError(f"{stored}: {err} of {self.fp8_block}") from None
            self.dequantized += 1
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise UserError(
                f"{stored} is {t.dtype} without a weight_scale_inv (and config.json's "
                "quantization_config must say how it was quantized)"
            )
        return t


@dataclasses.dataclass(frozen=True)
class Source:
    """One HF tensor's contribution to one of ours: part ``part`` of its (transposed) rows
    split by ``sizes``; ``index``: slice [index] of ours (a stacked expert)."""

    rule: WeightRule
    part: int
    sizes: tuple[int, ...] | None


@dataclasses.dataclass
class ImportPlan:
    """Which HF tensors make each of our tensors, checked against the headers."""

    family: Family
    reader: SafetensorsReader
    hf_cfg: dict[str, Any]
    sources: dict[str, list[Source]]
    infos: dict[str, TensorInfo]  # what each of our tensors is stored as (HF's dtype)

    def _piece(self, src: Source) -> torch.Tensor:
        t = self.reader.get(src.rule.hf)
        if self.family.transform is not None:
            t = self.family.transform(src.rule.hf, t, self.hf_cfg, True)
        sizes = list(src.sizes) if src.sizes is not None else None
        return src.rule.to_ours(t, sizes)[src.part]

    def produce(self, name: str) -> torch.Tensor:
        """Our tensor ``name``, made from its HF tensors (stacked experts slice by slice;
        copies of one tensor checked equal)."""
        info = self.infos[name]
        out = None
        first: dict[int | None, str] = {}
        for src in self.sources[name]:
            part = self._piece(src).to(info.dtype)
            key = src.rule.index
            if key in first:  # a checkpoint may store copies (DeepSeek's MTP layers)
                assert out is not None
                held = out if key is None else out[key]
                if not torch.equal(held, part):
                    raise UserError(
                        f"{self.family.name}: tensors {first[key]} and {src.rule.hf} should hold "
                        f"the same weights ({name}) but differ"
                    )
                continue
            first[key] = src.rule.hf
            if key is None:
                out = part.contiguous()
            else:
                if out is None:
                    out = torch.empty(info.shape, dtype=info.dtype)
                out[key].copy_(part)
        assert out is not None
        return out


def import_plan(
    family: Family,
    reader: SafetensorsReader,
    cfg: ModelConfig,
    ours: dict[str, torch.Tensor],
    hf_cfg: dict[str, Any],
) -> ImportPlan:
    """Check every HF tensor against ``ours`` (our state dict, meta tensors are enough) and
    say which make each of ours: one UserError for a missing, misshapen or unconsumed tensor,
    before anything is read."""
    rules = family_rules(family, cfg, set(ours))
    available = set(reader.names())
    sources: dict[str, list[Source]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for rule in rules:
        if rule.hf not in available:
            raise UserError(f"{family.name}: tensor {rule.hf} is missing from the weights")
        info = reader.info(rule.hf)
        shape = tuple(reversed(info.shape)) if rule.transpose else info.shape
        targets = [
            tuple(ours[n].shape if rule.index is None else ours[n].shape[1:]) for n in rule.ours
        ]
        sizes = tuple(t[0] for t in targets) if len(targets) > 1 and not rule.interleave else None
        parts = [(s, *shape[1:]) for s in sizes] if sizes and shape[0] == sum(sizes) else [shape]
        if rule.swap_last or rule.interleave:  # the shapes the rule's own layout change makes
            meta = torch.empty(info.shape, device="meta")
            parts = [tuple(p.shape) for p in rule.to_ours(meta)]
        if len(parts) != len(targets) or any(p != t for p, t in zip(parts, targets)):
            raise UserError(
                f"{family.name}: tensor {rule.hf} has shape {info.shape}, but config.json "
                f"implies {' + '.join(str(t) for t in targets)}"
            )
        for k, name in enumerate(rule.ours):
            sources.setdefault(name, []).append(Source(rule, k, sizes))
            dtypes.setdefault(name, info.dtype)
        available.discard(rule.hf)
    ignore = re.compile("|".join(family.ignore)) if family.ignore else None
    for name in sorted(available):
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints store the head anyway
        if ignore is not None and ignore.fullmatch(name):
            continue
        raise UserError(
            f"{family.name}: tensor {name} has no evoformer counterpart (a feature config.json "
            "does not declare, or an unsupported variant)"
        )
    missing = sorted(n for n in ours if n not in sources)
    if missing:
        raise UserError(f"{family.name}: no HF tensor provides {missing[0]}")
    for name, srcs in sources.items():
        stacked = srcs[0].rule.index is not None
        if stacked and {s.rule.index for s in srcs} != set(range(ours[name].shape[0])):
            raise UserError(f"{family.name}: the HF tensors do not provide every slice of {name}")
    infos = {n: TensorInfo(dtypes[n], tuple(ours[n].shape)) for n in ours}
    return ImportPlan(family, reader, hf_cfg, sources, infos)


@torch.no_grad()
def load_hf_weights(
    family: Family,
    reader: SafetensorsReader,
    model: Transformer,
    hf_cfg: dict[str, Any] | None = None,
) -> None:
    """Copy every HF tensor into a model in memory (converting dtype), checking names and
    shapes."""
    ours = model.state_dict()
    plan = import_plan(family, reader, model.cfg, ours, hf_cfg or {})
    for name, target in ours.items():
        target.copy_(plan.produce(name))


def export_plan(
    family: Family, cfg: ModelConfig, have: set[str], params: set[str]
) -> list[WeightRule]:
    """The HF tensors ``family`` writes for a model of ``cfg`` (tensors ``have``), each made
    by its rule from ours; a UserError when one of our ``params`` would not be written."""
    rules = family_rules(family, cfg, have)
    left = sorted(params - {n for r in rules for n in r.ours})
    if left:
        raise UserError(f"{family.name}: no HF tensor holds evoformer's {left[0]}")
    return rules


def hf_tensor(
    family: Family,
    rule: WeightRule,
    fetch: Callable[[str], torch.Tensor],
    hf_cfg: dict[str, Any],
) -> torch.Tensor:
    """HF tensor ``rule.hf`` from our tensors (``fetch(name)``): fresh and contiguous."""
    parts = [fetch(n) if rule.index is None else fetch(n)[rule.index] for n in rule.ours]
    t = rule.to_hf(parts)
    if family.transform is not None:
        t = family.transform(rule.hf, t, hf_cfg, False)
    return t.contiguous().clone()


def hf_state_dict(family: Family, model: Transformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``family``'s HF names: fresh contiguous tensors, none shared
    (as safetensors requires), ready for ``save_file`` or an HF model's ``load_state_dict``."""
    ours = {n: t.detach() for n, t in model.state_dict().items()}
    hf_cfg = family.to_hf_config(model.cfg) if family.transform is not None else {}
    params = {n for n, _ in model.named_parameters()}
    rules = export_plan(family, model.cfg, set(ours), params)
    return {r.hf: hf_tensor(family, r, ours.__getitem__, hf_cfg) for r in rules}
