"""Import and export: a ``save_pretrained`` folder <-> an evoformer run folder.

``config.json`` is read as JSON (with the family's HF defaults filled in for keys
``save_pretrained`` may omit), so importing needs no ``transformers``. The family is found in
:data:`~evoformer.checkpoint.hf.registry.FAMILIES`: by ``model_type`` on import; on export the
named one, or the first that can express the model.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from safetensors.torch import save_file

from evoformer.checkpoint.hf.family import Family
from evoformer.checkpoint.hf.registry import FAMILIES
from evoformer.checkpoint.hf.roundtrip import hf_config_for
from evoformer.checkpoint.hf.tokenizer import export_tokenizer, import_tokenizer
from evoformer.checkpoint.hf.weights import SafetensorsReader, hf_state_dict, load_hf_weights
from evoformer.checkpoint.io import (
    WEIGHTS_ONLY,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from evoformer.checkpoint.model_io import load_model
from evoformer.checkpoint.tokenizer import copy_tokenizer
from evoformer.config.loader import to_yaml
from evoformer.config.schema import Config, ModelConfig
from evoformer.config.validate import validate_model
from evoformer.data.tokenizer import load_tokenizer
from evoformer.errors import UserError
from evoformer.model import build_model


class Conversion(NamedTuple):
    """What an import or export wrote: the folder, the family, the model's parameter count."""

    out_dir: Path
    family: Family
    n_params: int


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


def family_for_hf_config(hf_cfg: dict[str, Any]) -> Family:
    """The family of an HF ``config.json`` (by ``model_type``), checking its architecture."""
    model_type = hf_cfg.get("model_type")
    family = next((f for f in FAMILIES.values() if f.model_type == model_type), None)
    if family is None:
        known = ", ".join(sorted(f.model_type for f in FAMILIES.values()))
        raise UserError(f"HF model_type {model_type!r} is not supported (supported: {known})")
    for arch in hf_cfg.get("architectures") or []:
        if arch not in family.architectures:
            raise UserError(
                f"{family.name}: architecture {arch} is not a causal LM evoformer can import "
                f"(expected {' or '.join(family.architectures)})"
            )
    return family


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
    Returns ``out_dir``. Refuses an ``out_dir`` that already holds checkpoints.
    """
    return convert_from_hf(Path(hf_dir), Path(out_dir)).out_dir


def convert_from_hf(hf_dir: Path, out_dir: Path) -> Conversion:
    """:func:`import_hf`, also telling which family was read and how many parameters."""
    hf_cfg = _read_hf_config(hf_dir)
    family = family_for_hf_config(hf_cfg)
    model_cfg = family.to_model_config(hf_cfg)
    reader = SafetensorsReader(hf_dir, family.base_prefix)
    if family.refine is not None:
        model_cfg = family.refine(model_cfg, set(reader.names()))
    cfg = _checked_config(model_cfg)
    if list_checkpoints(out_dir / "checkpoints"):
        raise UserError(f"{out_dir} already holds checkpoints; import into a new folder")
    model = build_model(cfg.model, seed=None)
    try:
        load_hf_weights(family, reader, model, hf_cfg)
    finally:
        reader.close()
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
    save_checkpoint(
        out_dir / "checkpoints",
        step=0,
        model=model,
        optimizer=None,
        # weights only: training from here starts at step 0 with a fresh optimizer
        trainer_state={"source": "hf", WEIGHTS_ONLY: True},
        config_yaml=config_yaml,
        extra_files=extra,
    )
    write_text_atomic(out_dir / "config.yaml", config_yaml)
    return Conversion(out_dir, family, model.num_params())


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


def export_hf(ckpt_path: str | Path, out_dir: str | Path, family: str | None = None) -> Path:
    """Write an evoformer checkpoint as a HuggingFace folder (``config.json`` +
    ``model.safetensors``) that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

    ``ckpt_path`` is anything :func:`load_model` accepts. ``family`` forces one HF architecture;
    by default the first in :data:`FAMILIES` that can express the model is used. The
    checkpoint's tokenizer (kept in it or its run folder) is written as HF tokenizer files with
    a ``generation_config.json`` whose eos is the end-of-document id (``hf/tokenizer.py``), so
    ``AutoTokenizer`` and ``pipeline("text-generation")`` work on ``out_dir``; without one the
    token ids stay null. Returns ``out_dir``.
    """
    return convert_to_hf(ckpt_path, Path(out_dir), family).out_dir


def convert_to_hf(ckpt_path: str | Path, out_dir: Path, family: str | None) -> Conversion:
    """:func:`export_hf`, also telling which family was written and how many parameters."""
    ckpt = resolve_checkpoint(ckpt_path)
    model = load_model(ckpt)
    fam = family_for_model_config(model.cfg, family)
    hf_cfg = hf_config_for(fam, model.cfg)
    state = hf_state_dict(fam, model)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The ids come from the tokenizer; without one, HF's class defaults (e.g. GPT-2's 50256) may
    # not even fit the vocabulary, so they say "unknown" rather than inherit them.
    ids = export_tokenizer(ckpt, out_dir, model.cfg.max_seq_len)
    hf_cfg = {**hf_cfg, "dtype": dtype, **ids}
    tmp = out_dir / f".model.safetensors.{uuid.uuid4().hex[:8]}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    write_text_atomic(out_dir / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return Conversion(out_dir, fam, model.num_params())
