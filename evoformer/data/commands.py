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
from evoformer.data.preprocess import merge_slices, preprocess
from evoformer.data.readers import DEFAULT_MAX_DOC_BYTES
from evoformer.data.sharded import DEFAULT_SHARD_TOKENS
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
    """`evoformer preprocess INPUT... --tokenizer T [--eod-id ID] --out DIR [options]`, or
    `evoformer preprocess --merge --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="evoformer preprocess",
        description="Tokenise a corpus into a sharded token store (a folder: shard-*.tok files "
        "and index.json) that data.paths=[DIR] reads. Inputs: .txt and any other text file (one "
        "document each), .jsonl / .jsonl.gz / .jsonl.zst (one JSON object per line), .parquet; "
        "files, folders (every file below) or globs. Bad records are skipped and counted.",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, folders or quoted globs ('data/**/*.jsonl.zst')",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="TOKENIZER",
        help="sentencepiece .model, HuggingFace tokenizer.json or HF tokenizer folder",
    )
    parser.add_argument(
        "--eod-id",
        type=int,
        metavar="ID",
        help="end-of-document id between documents (default: the tokenizer's eos)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="token store folder to write")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenizer processes, one core each (default: the cores; 0 = in this process)",
    )
    parser.add_argument(
        "--text-key", default="text", help="JSON field / parquet column with the text (text)"
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file before a new one starts ({DEFAULT_SHARD_TOKENS})",
    )
    parser.add_argument(
        "--max-doc-mb",
        type=float,
        default=DEFAULT_MAX_DOC_BYTES / (1 << 20),
        help="a text file larger than this is cut at line ends into several documents (64)",
    )
    parser.add_argument(
        "--num-slices",
        type=int,
        default=1,
        help="split the input files into N contiguous slices (one per job-array task)",
    )
    parser.add_argument(
        "--slice-index", type=int, default=0, help="the slice this run tokenises (0..N-1)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="write DIR/index.json over the finished slices under DIR (no inputs, no tokenizer)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing store at --out")
    args = parser.parse_args(argv)
    if args.merge:
        if args.inputs:
            raise UserError("--merge takes no inputs: it merges the slices under --out")
        merge_slices(
            args.out, log=print, num_slices=args.num_slices if args.num_slices > 1 else None
        )
        return 0
    if not args.inputs:
        raise UserError("evoformer preprocess: no inputs given (files, folders or globs)")
    if not args.tokenizer:
        raise UserError("evoformer preprocess: --tokenizer TOKENIZER is required")
    if args.shard_tokens <= 0 or args.max_doc_mb <= 0:
        raise UserError("--shard-tokens and --max-doc-mb must be positive")
    tokenizer = load_tokenizer(args.tokenizer, args.eod_id)
    preprocess(
        args.inputs,
        tokenizer,
        Path(args.out),
        log=print,
        workers=args.workers,
        text_key=args.text_key,
        shard_tokens=args.shard_tokens,
        max_doc_bytes=int(args.max_doc_mb * (1 << 20)),
        num_slices=args.num_slices,
        slice_index=args.slice_index,
        force=args.force,
    )
    return 0
