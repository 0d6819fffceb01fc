"""Import and export: a ``save_pretrained`` folder <-> an evoformer run folder.

``config.json`` is read as JSON (with the family's HF defaults filled in for keys
``save_pretrained`` may omit; a null means what the HF class makes of it), so importing needs
no ``transformers``. The family is found in :data:`~evoformer.checkpoint.hf.registry.FAMILIES`:
by ``model_type`` on import (a multimodal wrapper by its text model's), on export the named
one, or the first that can express the model. Both directions stream (``stream.py``): no
model is ever built in memory, only the tensors in flight.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from evoformer.checkpoint.hf.family import Family, WeightRule
from evoformer.checkpoint.hf.fp8 import fp8_block_size
from evoformer.checkpoint.hf.mxfp4 import is_mxfp4
from evoformer.checkpoint.hf.registry import FAMILIES
from evoformer.checkpoint.hf.roundtrip import hf_config_for
from evoformer.checkpoint.hf.stream import (
    DEFAULT_MAX_SHARD,
    LazySavePlanner,
    StoredTensors,
    TensorInfo,
    stand_in,
    write_sharded,
)
from evoformer.checkpoint.hf.tokenizer import export_tokenizer, import_tokenizer
from evoformer.checkpoint.hf.weights import (
    SafetensorsReader,
    export_plan,
    hf_tensor,
    import_plan,
)
from evoformer.checkpoint.io import (
    WEIGHTS_ONLY,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from evoformer.checkpoint.model_io import checkpoint_config
from evoformer.checkpoint.tokenizer import copy_tokenizer
from evoformer.config.loader import to_yaml
from evoformer.config.schema import Config, ModelConfig
from evoformer.config.validate import validate_model
from evoformer.data.tokenizer import load_tokenizer
from evoformer.errors import UserError
from evoformer.model import build_model


class Conversion(NamedTuple):
    """What an import or export wrote: the folder, the family, the model's parameter count,
    and a line for each thing the conversion dropped or chose that the files do not say."""

    out_dir: Path
    family: Family
    n_params: int
    notes: tuple[str, ...] = ()


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"HuggingFace folder not found: {hf_dir}")
    if not path.is_file():
        raise UserError(f"{hf_dir} is not a save_pretrained folder: config.json is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def _unwrap(hf_cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A multimodal wrapper's ``text_config`` (with the wrapper-level keys it inherits) as the
    text family's config, and what was dropped; other configs as they are."""
    model_type = str(hf_cfg.get("model_type"))
    family = next((f for f in FAMILIES.values() if model_type in f.wrappers), None)
    if family is None:
        return hf_cfg, []
    archs = family.wrappers[model_type]
    for arch in hf_cfg.get("architectures") or []:
        if arch not in archs:
            raise UserError(
                f"{model_type}: architecture {arch} cannot be imported "
                f"(expected {' or '.join(archs)})"
            )
    text = hf_cfg.get("text_config")
    if not isinstance(text, dict):
        raise UserError(f"{model_type}: text_config={text!r} (a wrapper needs its text model)")
    text = {k: v for k, v in text.items() if k != "architectures"}
    if text.setdefault("model_type", family.model_type) != family.model_type:
        raise UserError(
            f"{model_type}: text_config.model_type={text['model_type']!r} cannot be imported "
            f"(expected {family.model_type!r})"
        )
    for key in ("tie_word_embeddings",):
        # Set on the wrapper, it decides (transformers 5 ties the wrapper's head by it, and
        # writes it there); absent (files of transformers 4), the text model's own setting.
        if key in hf_cfg:
            text[key] = hf_cfg[key]
    vision = (hf_cfg.get("vision_config") or {}).get("model_type", "vision")
    notes = [
        f"imported the text model of {model_type} ({family.model_type}); dropped its "
        f"{vision} tower and multimodal projector (vision_config, image token settings)"
    ]
    return text, notes


def family_for_hf_config(hf_cfg: dict[str, Any]) -> Family:
    """The family of an HF ``config.json`` (by ``model_type``), checking its architecture."""
    model_type = hf_cfg.get("model_type")
    family = next((f for f in FAMILIES.values() if f.model_type == model_type), None)
    if family is None:
        wrapped = [w for f in FAMILIES.values() for w in f.wrappers]
        known = ", ".join(sorted([f.model_type for f in FAMILIES.values()] + wrapped))
        raise UserError(f"HF model_type {model_type!r} is not supported (supported: {known})")
    for arch in hf_cfg.get("architectures") or []:
        if arch not in family.architectures:
            raise UserError(
                f"{family.name}: architecture {arch} is not a causal LM evoformer can import "
                f"(expected {' or '.join(family.architectures)})"
            )
    return family


def read_model_config(family: Family, hf_cfg: dict[str, Any]) -> ModelConfig:
    """``family.to_model_config``, with a config.json value the converter cannot read (a null
    or a string where a number belongs) named in one line instead of a traceback."""
    try:
        return family.to_model_config(hf_cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{family.name}: config.json cannot be read ({err!r})") from None


def _checked_config(model_cfg: ModelConfig) -> Config:
    cfg = Config(model=model_cfg)
    # The default train.seq_len must fit a short-context model for config.yaml to validate.
    cfg.train.seq_len = min(cfg.train.seq_len, model_cfg.max_seq_len)
    validate_model(cfg)
    return cfg


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a HuggingFace ``save_pretrained`` folder into an evoformer run folder.

    Writes ``out_dir/config.yaml`` and ``out_dir/checkpoints/step_0`` (weights only: training
    from it starts at step 0 with a fresh optimizer) so that ``load_model(out_dir)`` and
    ``checkpoint.load=PATH`` training can use it; the folder's tokenizer files are copied into
    ``out_dir/tokenizer/`` (and the checkpoint) and named by the config's ``data.tokenizer``.
    Weights are streamed: read from the shards one tensor at a time and written into the
    checkpoint as they are read, in the dtype the files hold (FP8 block-scaled weights
    dequantized to bf16). Returns ``out_dir``. Refuses an ``out_dir`` that already holds
    checkpoints.
    """
    return convert_from_hf(Path(hf_dir), Path(out_dir)).out_dir


def convert_from_hf(hf_dir: Path, out_dir: Path) -> Conversion:
    """:func:`import_hf`, also telling which family was read, how many parameters, and what
    was dropped or chosen."""
    outer = _read_hf_config(hf_dir)
    hf_cfg, notes = _unwrap(outer)
    family = family_for_hf_config(hf_cfg)
    block = fp8_block_size(outer)
    model_cfg = read_model_config(family, hf_cfg)
    reader = SafetensorsReader(
        hf_dir, family.base_prefix, block, wrapper=bool(notes), mx=is_mxfp4(outer)
    )
    if family.refine is not None:
        model_cfg = family.refine(model_cfg, set(reader.names()))
    cfg = _checked_config(model_cfg)
    if list_checkpoints(out_dir / "checkpoints"):
        raise UserError(f"{out_dir} already holds checkpoints; import into a new folder")
    meta = build_model(cfg.model, device="meta", seed=None)  # names and shapes, no memory
    plan = import_plan(family, reader, cfg.model, meta.state_dict(), hf_cfg)
    if family.notes is not None:
        notes += family.notes(hf_cfg, cfg.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Path] = {}
    imported = import_tokenizer(hf_dir, out_dir)
    if imported is not None:
        # An absolute path: training from the import (`evoformer train OUT/config.yaml ...`)
        # runs from anywhere; generate and export-hf read the checkpoint's own copy.
        tok_path, cfg.data.eod_id = imported
        cfg.data.tokenizer = str(tok_path.resolve())
        extra = copy_tokenizer(load_tokenizer(tok_path, cfg.data.eod_id), out_dir)
    config_yaml = to_yaml(cfg)
    planner = LazySavePlanner(plan.produce)
    try:
        save_checkpoint(
            out_dir / "checkpoints",
            step=0,
            model=meta,
            optimizer=None,
            # weights only: training from here starts at step 0 with a fresh optimizer
            trainer_state={"source": "hf", WEIGHTS_ONLY: True},
            config_yaml=config_yaml,
            extra_files=extra,
            model_state_dict={n: stand_in(i) for n, i in plan.infos.items()},
            planner=planner,
            file_per_tensor=True,
        )
    except CheckpointException:  # (a BaseException) wraps what failed while DCP wrote
        if planner.error is not None:  # a tensor's check failed
            raise planner.error from None
        raise
    write_text_atomic(out_dir / "config.yaml", config_yaml)
    if reader.dequantized and block is not None:
        notes.append(
            f"dequantized {reader.dequantized} FP8 block-scaled weights (e4m3, "
            f"{block[0]}x{block[1]} weight_scale_inv blocks) to bf16, as DeepSeek's weight_dequant"
        )
    if reader.mx_read:
        notes.append(
            f"dequantized {len(reader.mx_read)} MXFP4 expert tensors (E2M1, 32-element E8M0 "
            "blocks) to bf16; export writes them in full precision"
        )
    if reader.dropped:
        notes.append(f"left out {reader.dropped} vision tower / projector tensors")
    return Conversion(out_dir, family, meta.num_params(), tuple(notes))


def family_for_model_config(model_cfg: ModelConfig, family: str | None = None) -> Family:
    """The HF family that can express ``model_cfg`` (the named one, or the first that fits)."""
    if family is not None:
        if family not in FAMILIES:
            raise UserError(f"unknown HF family {family!r} (known: {', '.join(FAMILIES)})")
        hf_config_for(FAMILIES[family], model_cfg)  # raises, naming the choice it lacks
        return FAMILIES[family]
    reasons = []
    for fam in FAMILIES.values():
        try:
            hf_config_for(fam, model_cfg)
            return fam
        except UserError as err:
            reasons.append(str(err))
    raise UserError("no HuggingFace family can express this model: " + "; ".join(reasons))


def export_hf(
    ckpt_path: str | Path,
    out_dir: str | Path,
    family: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
) -> Path:
    """Write an evoformer checkpoint as a HuggingFace folder (``config.json`` + safetensors:
    one ``model.safetensors``, or shards of at most ``max_shard_size`` bytes with
    ``model.safetensors.index.json``) that ``AutoModelForCausalLM.from_pretrained(out_dir)``
    loads. Tensors are streamed from the checkpoint one at a time, in the dtype it stores them.

    ``ckpt_path`` is anything :func:`load_model` accepts. ``family`` forces one HF architecture;
    by default the first in :data:`FAMILIES` that can express the model is used. The
    checkpoint's tokenizer (kept in it or its run folder) is written as HF tokenizer files with
    a ``generation_config.json`` whose eos is the end-of-document id (``hf/tokenizer.py``), so
    ``AutoTokenizer`` and ``pipeline("text-generation")`` work on ``out_dir``; without one the
    token ids stay null. Returns ``out_dir``.
    """
    return convert_to_hf(ckpt_path, Path(out_dir), family, max_shard_size).out_dir


def convert_to_hf(
    ckpt_path: str | Path,
    out_dir: Path,
    family: str | None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
) -> Conversion:
    """:func:`export_hf`, also telling which family was written and how many parameters."""
    ckpt = resolve_checkpoint(ckpt_path)
    model_cfg = checkpoint_config(ckpt).model
    fam = family_for_model_config(model_cfg, family)
    hf_cfg = hf_config_for(fam, model_cfg)
    meta = build_model(model_cfg, device="meta", seed=None)
    stored = StoredTensors(ckpt)
    ours = meta.state_dict()
    absent = sorted(set(ours) - set(stored.infos))
    if absent:
        raise UserError(f"checkpoint {ckpt}: holds no tensor {absent[0]}")
    rules = export_plan(fam, model_cfg, set(ours), {n for n, _ in meta.named_parameters()})
    # HF tensors sharing one of ours (an expert stack's slices) are written one after another,
    # so each of ours is read once and dropped when its last HF tensor is written.
    order = {n: k for k, n in enumerate(ours)}
    rules.sort(key=lambda r: min(order[n] for n in r.ours))
    by_hf = {r.hf: r for r in rules}
    users: dict[str, int] = {}
    for r in rules:
        for n in r.ours:
            users[n] = users.get(n, 0) + 1
    held: dict[str, torch.Tensor] = {}

    def fetch(name: str) -> torch.Tensor:
        if name not in held:
            held.update(stored.load([name]))
        return held[name]

    def produce(hf_name: str) -> torch.Tensor:
        rule = by_hf[hf_name]
        t = hf_tensor(fam, rule, fetch, hf_cfg)
        for n in rule.ours:
            users[n] -= 1
            if not users[n]:
                held.pop(n, None)
        return t

    infos = [(r.hf, _hf_info(r, ours, stored)) for r in rules]
    dtypes: Counter[torch.dtype] = Counter()
    for _, info in infos:
        dtypes[info.dtype] += info.nbytes  # config.json's dtype: that of most of the bytes
    dtype = str(dtypes.most_common(1)[0][0]).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The ids come from the tokenizer; without one, HF's class defaults (e.g. GPT-2's 50256) may
    # not even fit the vocabulary, so they say "unknown" rather than inherit them.
    ids = export_tokenizer(ckpt, out_dir, model_cfg.max_seq_len)
    hf_cfg = {**hf_cfg, "dtype": dtype, **ids}
    write_sharded(out_dir, infos, produce, max_shard_size)
    write_text_atomic(out_dir / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return Conversion(out_dir, fam, meta.num_params())


def _hf_info(rule: WeightRule, ours: dict[str, torch.Tensor], stored: StoredTensors) -> TensorInfo:
    """Dtype and shape of the HF tensor ``rule`` makes (our stored dtype)."""
    shapes = [tuple(ours[n].shape if rule.index is None else ours[n].shape[1:]) for n in rule.ours]
    parts = [torch.empty(s, device="meta") for s in shapes]
    return TensorInfo(stored.infos[rule.ours[0]].dtype, tuple(rule.to_hf(parts).shape))
