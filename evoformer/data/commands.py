"""The data sub-commands: `evoformer tokenizer train` and `evoformer preprocess`.

The CLI dispatches to these with the remaining arguments; they return an exit code and raise
:class:`UserError` for bad input.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path

from evoformer.data.corpus import default_corpus_files
from evoformer.data.preprocess import preprocess
from evoformer.data.tokenizer import load_tokenizer, train_tokenizer
from evoformer.errors import UserError


def _check_inputs(inputs: list[str]) -> list[Path]:
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise UserError(f"input file {path} not found")
    return paths


def tokenizer_train_main(argv: list[str]) -> int:
    """`evoformer tokenizer train [INPUT...] --out PREFIX [--vocab-size N] [--seed S]`."""
    parser = argparse.ArgumentParser(
        prog="evoformer tokenizer train",
        description="Train a byte-fallback BPE sentencepiece tokenizer that round-trips code "
        "exactly. Writes PREFIX.model and PREFIX.vocab.",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files (one document each) or .jsonl files (a 'text' field per line); "
        "none = the default corpus (the Python standard library's source)",
    )
    parser.add_argument("--out", required=True, metavar="PREFIX", help="output path prefix")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (8192)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: byte fallback needs >= 300")
    if args.inputs:
        files = _check_inputs(args.inputs)
        inputs: Iterable[str | Path] = files
        what = f"{len(files)} file(s)"
    else:
        files = default_corpus_files()
        # read leniently, as the corpus preparation does: an odd byte is not the user's fault
        inputs = (p.read_text(encoding="utf-8", errors="replace") for p in files)
        what = f"the default corpus ({len(files)} files)"
    print(f"training a {args.vocab_size}-token tokenizer on {what}...")
    t0 = time.perf_counter()
    model = train_tokenizer(inputs, Path(args.out), args.vocab_size, seed=args.seed)
    tok = load_tokenizer(model)
    print(f"wrote {model} ({tok.vocab_size} tokens) in {time.perf_counter() - t0:.1f} s")
    return 0


def preprocess_main(argv: list[str]) -> int:
    """`evoformer preprocess INPUT... --tokenizer T [--eod-id ID] --out FILE.tok`."""
    parser = argparse.ArgumentParser(
        prog="evoformer preprocess",
        description="Tokenise text/.jsonl files into a token store for data.source=files.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files (one document each) or .jsonl files (a 'text' field per line)",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="TOKENIZER",
        help="sentencepiece .model, HuggingFace tokenizer.json or HF tokenizer folder",
    )
    parser.add_argument(
        "--eod-id",
        type=int,
        metavar="ID",
        help="end-of-document id between documents (default: the tokenizer's eos)",
    )
    parser.add_argument("--out", required=True, metavar="FILE.tok", help="token store to write")
    args = parser.parse_args(argv)
    paths = _check_inputs(args.inputs)
    tokenizer = load_tokenizer(args.tokenizer, args.eod_id)
    preprocess(paths, tokenizer, Path(args.out), log=print)
    return 0
