"""The tokenizer a run trained with, kept in its run folder and in each of its checkpoints.

A sentencepiece model is kept as ``tokenizer.model``; a HuggingFace tokenizer as a
``tokenizer/`` folder (``tokenizer.json``, ``tokenizer_config.json``, ...; see
:attr:`Tokenizer.files <evoformer.data.tokenizer.Tokenizer.files>`). ``evoformer generate`` and
``export-hf`` find it there; the ``data.eod_id`` override comes from the checkpoint's config.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from evoformer.checkpoint.model_io import checkpoint_config
from evoformer.data.tokenizer import HF_DIR, HF_JSON, SP_FILE, Tokenizer, load_tokenizer
from evoformer.errors import UserError


def find_tokenizer(ckpt: Path) -> Path | None:
    """The tokenizer kept in checkpoint folder ``ckpt``, else in its run folder (two levels up),
    or None."""
    for folder in (ckpt, ckpt.parent.parent):
        if (folder / HF_DIR / HF_JSON).is_file():
            return folder / HF_DIR
        if (folder / SP_FILE).is_file():
            return folder / SP_FILE
    return None


def checkpoint_tokenizer(ckpt: Path, path: str | Path | None = None) -> Tokenizer:
    """The tokenizer of checkpoint ``ckpt`` (or the one at ``path``), with the end-of-document
    override of the checkpoint's config (``data.eod_id``)."""
    found = Path(path) if path is not None else find_tokenizer(ckpt)
    if found is None:
        raise UserError(
            f"no tokenizer ({SP_FILE} or {HF_DIR}/{HF_JSON}) in {ckpt} or its run folder; "
            "pass --tokenizer"
        )
    return load_tokenizer(found, checkpoint_config(ckpt).data.eod_id)


def copy_tokenizer(tokenizer: Tokenizer, dest: Path) -> dict[str, Path]:
    """Copy ``tokenizer``'s files into folder ``dest`` (each atomically), removing a copy of the
    other kind left there; returns name -> the copied file. Copying a tokenizer onto itself
    (a run folder training with its own copy) is a no-op."""
    names = tokenizer.files
    copied = {}
    for name, src in names.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.exists() and os.path.samefile(src, target)):
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        copied[name] = target
    # then (the source may lie inside it) the copy of the other kind, so that one is found
    if not any(n.startswith(f"{HF_DIR}/") for n in names) and (dest / HF_DIR).is_dir():
        shutil.rmtree(dest / HF_DIR)
    if SP_FILE not in names:
        (dest / SP_FILE).unlink(missing_ok=True)
    return copied
