"""The tokenizer travels with import-hf and export-hf.

Import copies an HF folder's tokenizer files (:data:`~evoformer.data.tokenizer.HF_FILES`) into the
run folder's ``tokenizer/`` and its step_0 checkpoint; the written config names that folder as
``data.tokenizer``. Export writes the checkpoint's tokenizer as HF files: an HF tokenizer's own
files, or a sentencepiece model converted to a ``tokenizer.json`` (:func:`sentencepiece_to_hf`),
plus a ``tokenizer_config.json`` and a ``generation_config.json`` whose eos is our end-of-document
id, so ``AutoTokenizer`` and ``pipeline("text-generation")`` work on the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from evoformer.checkpoint.io import write_text_atomic
from evoformer.checkpoint.tokenizer import checkpoint_tokenizer, find_tokenizer
from evoformer.data.tokenizer import (
    HF_CONFIG,
    HF_DIR,
    HF_FILES,
    HF_JSON,
    SP_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from evoformer.errors import UserError

GENERATION_CONFIG = "generation_config.json"


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _first_id(value: Any) -> int | None:
    """An HF token-id field: an int, a list of them (the first), or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- import ---------------------------------------------------------------------------------------


def import_tokenizer(hf_dir: Path, out_dir: Path) -> tuple[Path, int | None] | None:
    """Copy ``hf_dir``'s tokenizer files into ``out_dir/tokenizer/`` (a folder with only a
    sentencepiece ``tokenizer.model``: into ``out_dir/tokenizer.model``); returns (the path for
    ``data.tokenizer``, a ``data.eod_id`` override or None), or None when ``hf_dir`` holds no
    tokenizer. The override is needed only when the tokenizer names no end of document itself:
    it is then ``generation_config.json``'s (first) ``eos_token_id``."""
    present = [n for n in HF_FILES if (hf_dir / n).is_file()]
    if HF_JSON not in present and SP_FILE not in present:
        return None
    source = hf_dir if HF_JSON in present else hf_dir / SP_FILE
    eod_id = None
    try:  # read before copying, so an error names the user's file
        load_tokenizer(source)
    except UserError:
        gen = hf_dir / GENERATION_CONFIG
        eod_id = _first_id(_read_json(gen).get("eos_token_id")) if gen.is_file() else None
        if eod_id is None:
            raise
        load_tokenizer(source, eod_id)  # still a UserError if the id is outside the vocabulary
    if HF_JSON in present:
        path = out_dir / HF_DIR
        path.mkdir(parents=True, exist_ok=True)
        for name in present:
            _copy(hf_dir / name, path / name)
    else:
        path = out_dir / SP_FILE
        _copy(hf_dir / SP_FILE, path)
    return path, eod_id


# -- export ---------------------------------------------------------------------------------------


def export_tokenizer(ckpt: Path, out_dir: Path, max_seq_len: int) -> dict[str, int | None]:
    """Write the checkpoint's tokenizer (if it has one) into ``out_dir`` as HF files; returns the
    token ids for config.json (``bos_token_id``, ``eos_token_id``, ``pad_token_id``; None where
    unknown), which ``generation_config.json`` carries too."""
    if find_tokenizer(ckpt) is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tok = checkpoint_tokenizer(ckpt)
    generation: dict[str, Any] = {}
    if isinstance(tok, HFTokenizer):
        for name, src in tok.files.items():
            name = name.removeprefix(f"{HF_DIR}/")
            if name == GENERATION_CONFIG:
                generation = _read_json(src)
            else:
                _copy(src, out_dir / name)
        if not (out_dir / HF_CONFIG).is_file():  # a bare tokenizer.json
            _write_tokenizer_config(tok, out_dir, max_seq_len)
    else:
        assert isinstance(tok, SentencePieceTokenizer)
        sentencepiece_to_hf(tok).save(str(out_dir / HF_JSON))
        _write_tokenizer_config(tok, out_dir, max_seq_len)
    ids = {
        "bos_token_id": tok.bos_id if tok.bos_id >= 0 else None,
        "eos_token_id": tok.eod_id,
        "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None,
    }
    # An imported list of stop ids (chat models) is kept when our end of document is among them.
    eos = generation.get("eos_token_id")
    keep_eos = isinstance(eos, list) and tok.eod_id in eos
    generation.update({k: v for k, v in ids.items() if v is not None})
    if keep_eos:
        generation["eos_token_id"] = eos
    write_text_atomic(
        out_dir / GENERATION_CONFIG, json.dumps(generation, indent=2, sort_keys=True) + "\n"
    )
    return ids


def _token(tok: Tokenizer, i: int) -> str | None:
    if i < 0:
        return None
    if isinstance(tok, SentencePieceTokenizer):
        return tok.id_to_piece(i)
    assert isinstance(tok, HFTokenizer)
    return tok.token(i)


def _write_tokenizer_config(tok: Tokenizer, out_dir: Path, max_seq_len: int) -> None:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        # our training saw no bos and no template: neither does an HF user's encode
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eod_id), ("pad_token", tok.pad_id)):
        if (piece := _token(tok, i)) is not None:
            config[key] = piece
    if isinstance(tok, SentencePieceTokenizer) and tok.unk_id >= 0:
        config["unk_token"] = tok.id_to_piece(tok.unk_id)
    write_text_atomic(out_dir / HF_CONFIG, json.dumps(config, indent=2) + "\n")


def sentencepiece_to_hf(tok: SentencePieceTokenizer):
    """A ``tokenizers.Tokenizer`` that encodes like the sentencepiece BPE model ``tok``.

    sentencepiece's BPE merges, at each step, the adjacent pair whose concatenation is the
    best-scored piece; as an HF BPE that is every split of a piece into two pieces as a merge,
    ranked by the merged piece's id (sentencepiece orders BPE pieces by score). Spaces are
    ``▁`` (a normaliser and a decoder replace them), unknown characters fall back to
    ``<0xNN>`` byte pieces, user-defined pieces (our ``\\n``) are added tokens matched before the
    model, control pieces (``<s>``, ``</s>``, ``<unk>``) special added tokens.
    """
    from sentencepiece import sentencepiece_model_pb2 as generated
    from tokenizers import AddedToken, Regex, decoders, models, normalizers
    from tokenizers import Tokenizer as HFBackend

    pb2: Any = generated  # protobuf-generated classes: invisible to type checkers
    proto = pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != pb2.TrainerSpec.BPE:
        raise UserError(f"export-hf: {tok.path} is not a BPE sentencepiece model")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise UserError(
            f"export-hf: {tok.path} normalises text ({norm.name}, remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}); only identity-normalised models (as "
            "`evoformer tokenizer train` makes) convert exactly"
        )
    piece_type = pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p in proto.pieces if p.type == piece_type.NORMAL}
    merges = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = proto.pieces[spec.unk_id].piece if spec.unk_id >= 0 else None
    backend = HFBackend(
        models.BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    )
    steps: list[Any] = (
        [normalizers.Replace(Regex(" "), "\u2581")] if norm.escape_whitespaces else []
    )
    if norm.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    backend.add_tokens(
        [
            AddedToken(p.piece, special=False, normalized=False)
            for p in proto.pieces
            if p.type == piece_type.USER_DEFINED
        ]
    )
    backend.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in (piece_type.CONTROL, piece_type.UNKNOWN)
        ]
    )
    return backend
