"""A small HuggingFace tokenizer for tests: byte-level BPE (as GPT-2 / Llama 3 use) trained with
the ``tokenizers`` library on a few default-corpus files, saved as ``tokenizer.json`` and as an HF
folder (``tokenizer.json`` + ``tokenizer_config.json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
# Specials first, so their ids are fixed: <|endoftext|> 0, <|im_end|> 1 (a turn end, never a
# document end), <|pad|> 2.
SPECIALS = [EOS, "<|im_end|>", "<|pad|>"]


def train_byte_level_bpe(files: Sequence[Path], vocab_size: int = 512) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((p.read_text(errors="replace") for p in files), trainer)
    return tok


def write_hf_folder(tok: Tokenizer, out: Path, eos_token: object = EOS) -> Path:
    """``out`` with tokenizer.json and a tokenizer_config.json naming ``eos_token``."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out
