"""Reading raw documents and tokenising them into a token store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from evoformer.data._common import Log
from evoformer.data.store import TokenStore, TokenStoreWriter
from evoformer.errors import UserError

if TYPE_CHECKING:
    from evoformer.data.tokenizer import Tokenizer

# Documents handed to sentencepiece's threaded encoder at once: large enough to keep the
# threads busy, small enough that the ids of one batch (Python lists) stay modest in memory.
_ENCODE_BATCH = 256


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise UserError(f"input file {path} not found")
    if not path.is_file():
        raise UserError(f"input {path} is not a file")


def read_documents(path: str | Path) -> Iterator[str]:
    """The documents of one input file.

    ``.jsonl``: one JSON object per line with a string field ``"text"`` (blank lines skipped).
    Anything else: the whole file, read as UTF-8, is one document. Errors name the file (and
    line) and raise :class:`UserError`.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
        return
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or "text" not in obj:
                    raise UserError(f'{path}:{lineno}: JSON object has no "text" field')
                if not isinstance(obj["text"], str):
                    raise UserError(f'{path}:{lineno}: "text" is not a string')
                yield obj["text"]
        except UnicodeDecodeError:
            raise UserError(f"{path}:{lineno + 1}: not UTF-8 text") from None


def _batches(inputs: Sequence[Path], counts: dict[str, int]) -> Iterator[list[str]]:
    docs = (doc for path in inputs for doc in read_documents(path))
    while batch := list(islice(docs, _ENCODE_BATCH)):
        counts["chars"] += sum(len(d) for d in batch)
        yield batch


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    out_path: str | Path,
    log: Log = print,
) -> TokenStore:
    """Tokenise the documents of ``inputs`` into a token store at ``out_path``; returns it opened.

    Documents that tokenise to nothing (empty texts) are skipped. The store is written
    atomically: a failure (bad input line, interrupt) leaves no file under ``out_path``.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files to preprocess")
    for path in paths:
        _check_exists(path)
    t0 = time.perf_counter()
    counts = {"chars": 0, "skipped": 0}
    with TokenStoreWriter(out_path, tokenizer.vocab_size, tokenizer.eod_id) as writer:
        for batch in _batches(paths, counts):
            for ids in tokenizer.encode_batch(batch):
                if ids:
                    writer.add(ids)
                else:
                    counts["skipped"] += 1
        if writer.n_tokens == 0:
            names = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
            raise UserError(f"no text to tokenise in {names}: the corpus is empty")
    store = TokenStore(out_path)
    ratio = store.n_tokens / max(counts["chars"], 1)
    log(
        f"tokenised {len(paths)} file(s): {store.n_docs} documents, {store.n_tokens} tokens "
        f"({ratio:.3f} tokens/char) -> {out_path} in {time.perf_counter() - t0:.1f} s"
        + (f" ({counts['skipped']} empty documents skipped)" if counts["skipped"] else "")
    )
    return store
