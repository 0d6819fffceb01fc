"""Reading raw documents from corpus files: text, JSON lines (plain, gzip, zstd) and parquet.

Every reader is a generator that holds at most one record (one line, one parquet batch, one
capped text document) in memory, whatever the file size. Reading is split in two: the raw
records (:func:`raw_records`: bytes of a line or document, a parquet value) and their decoding
(:func:`decode_record`: UTF-8, JSON, the text key), so `evoformer preprocess` reads in its main
process and decodes in the worker processes, where the tokenizing happens.

Bad records are either fatal (strict mode, the default: one :class:`UserError` naming file and
line) or counted per reason in a :class:`Skipped` and passed over (what `evoformer preprocess`
does, so one bad line in a terabyte never stops a run halfway).

Formats, by file name (compression suffixes ``.gz`` / ``.zst`` are peeled off first):
``.parquet`` (a string column, ``text_key``); ``.jsonl`` / ``.ndjson`` (one JSON object per line
with a string field ``text_key``; blank lines skipped); anything else is UTF-8 text, one document
per file, cut at line boundaries into documents of at most ``max_doc_bytes``.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from evoformer.errors import UserError

# A text file larger than this becomes several documents, cut at line boundaries, so one huge
# file never has to sit in memory (or in one encode call) at once.
DEFAULT_MAX_DOC_BYTES = 64 << 20
_PARQUET_BATCH_ROWS = 1024
_KEEP_LOCATIONS = 3
_EXTRA = "pip install 'evoformer[corpora]'"


class Skipped:
    """Records passed over, counted per reason, with the first few locations of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.where: dict[str, list[str]] = {}

    def add(self, reason: str, location: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        locs = self.where.setdefault(reason, [])
        if len(locs) < _KEEP_LOCATIONS:
            locs.append(location)

    def update(self, other: Skipped) -> None:
        """Add ``other``'s counts (its locations come after this one's)."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            locs = self.where.setdefault(reason, [])
            locs += other.where[reason][: _KEEP_LOCATIONS - len(locs)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: ``skipped N records: reason n (loc, loc, ...); ...``."""
        parts = [
            f"{reason} {n} (first: {', '.join(self.where[reason])})"
            for reason, n in sorted(self.counts.items())
        ]
        return f"skipped {self.total} records: " + "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "first": {k: list(v) for k, v in self.where.items()}}


def _bad(skipped: Skipped | None, reason: str, location: str, strict: str, n: int = 1) -> None:
    if skipped is None:
        raise UserError(strict)
    skipped.add(reason, location, n)


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _visible_files(folder: Path) -> list[Path]:
    found = [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (every non-hidden file below, sorted) and globs (``**`` recursive), in the
    order given; a file named twice is read once. Nothing found raises :class:`UserError`."""
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = _visible_files(path)
            if not files:
                raise UserError(f"input folder {path} holds no files")
        elif _has_magic(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            files = []
            for m in matches:
                files += _visible_files(m) if m.is_dir() else [m] if m.is_file() else []
            if not files:
                raise UserError(f"input pattern {str(raw)!r} matches no files")
        else:
            raise UserError(f"input file {path} not found")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _split_compression(path: Path) -> tuple[str, str | None]:
    name = path.name.lower()
    for suffix, kind in ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd")):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def file_kind(path: Path) -> str:
    """``parquet``, ``jsonl`` or ``text``, from the file name."""
    name, _ = _split_compression(path)
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "text"


@contextmanager
def _open_binary(path: Path) -> Iterator[IO[bytes]]:
    _, compression = _split_compression(path)
    if compression == "gzip":
        with gzip.open(path, "rb") as fh:
            yield fh  # type: ignore[misc]
    elif compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst files needs zstandard ({_EXTRA})") from None
        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader) as fh:  # type: ignore[arg-type]
                yield fh
    else:
        with open(path, "rb") as fh:
            yield fh


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


# A raw record: (path, kind, location, payload). kind "json" = a JSON line (bytes), "utf8" = a
# text document (bytes), "value" = a parquet value (str, bytes or None). The location is the
# line number, byte offset or row. Raw records are cheap to produce and to send to another
# process; decoding them (UTF-8, JSON) is the costly part, done by whoever tokenises.
Record = tuple[str, str, int, Any]


def raw_records(
    path: str | Path,
    text_key: str = "text",
    skipped: Skipped | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    counters: dict[str, int] | None = None,
) -> Iterator[Record]:
    """The undecoded records of one input file, streamed; file-level problems (truncated
    compression, unreadable parquet, missing column) go to ``skipped`` (None: raise)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input file {path} not found")
    if not path.is_file():
        raise UserError(f"input {path} is not a file")
    counters = counters if counters is not None else {}
    counters.setdefault("bytes", 0)
    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_records(path, text_key, skipped, counters)
        return
    reader = _jsonl_records if kind == "jsonl" else _text_records
    try:
        yield from reader(path, max_doc_bytes, counters)
    except _corrupt_errors() as exc:
        reason = str(exc) or type(exc).__name__
        _bad(skipped, "unreadable file", str(path), f"{path} is truncated or corrupt ({reason})")


def decode_record(record: Record, text_key: str) -> tuple[str | None, str, str, str]:
    """``(text, "", "", "")`` for a good record, else ``(None, reason, location, message)``."""
    path, kind, loc, payload = record
    if kind == "utf8":
        try:
            return payload.decode("utf-8"), "", "", ""
        except UnicodeDecodeError as exc:
            at = loc + exc.start
            msg = f"{path} is not UTF-8 text (bad byte at offset {at})"
            return None, "invalid UTF-8", f"{path}@byte{at}", msg
    where = f"{path}:{loc}" if kind == "json" else f"{path}:row{loc}"
    if kind == "value":
        if isinstance(payload, str):
            return payload, "", "", ""
        if payload is None:
            return None, "non-string text", where, f'{where}: "{text_key}" is null'
        try:
            return payload.decode("utf-8"), "", "", ""
        except UnicodeDecodeError:
            return None, "invalid UTF-8", where, f"{where}: not UTF-8 text"
    try:
        line = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid UTF-8", where, f"{where}: not UTF-8 text"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, "invalid JSON", where, f"{where}: invalid JSON ({exc.msg})"
    if not isinstance(obj, dict) or text_key not in obj:
        msg = f'{where}: JSON object has no "{text_key}" field'
        return None, f'missing key "{text_key}"', where, msg
    text = obj[text_key]
    if not isinstance(text, str):
        return None, "non-string text", where, f'{where}: "{text_key}" is not a string'
    return text, "", "", ""


def read_documents(
    path: str | Path,
    text_key: str = "text",
    skipped: Skipped | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    counters: dict[str, int] | None = None,
) -> Iterator[str]:
    """The documents of one input file (see the module docstring for the formats), streamed.

    With ``skipped=None`` a bad record raises :class:`UserError` naming file and line; with a
    :class:`Skipped` it is counted there and passed over. ``counters["bytes"]`` (when given)
    grows by the uncompressed bytes read.
    """
    for record in raw_records(path, text_key, skipped, max_doc_bytes, counters):
        text, reason, where, msg = decode_record(record, text_key)
        if text is None:
            _bad(skipped, reason, where, msg)
        else:
            yield text


def _text_records(path: Path, cap: int, counters: dict[str, int]) -> Iterator[Record]:
    name = str(path)
    with _open_binary(path) as fh:
        pending, offset = b"", 0
        while True:
            data = pending + fh.read(cap - len(pending))
            if len(data) < cap:  # end of file
                cut = len(data)
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one over-long line: cut it, but never inside a UTF-8 character
                    cut = _char_boundary(data)
            piece, pending = data[:cut], data[cut:]
            counters["bytes"] += len(piece)
            if piece:
                yield name, "utf8", offset, piece
            offset += cut
            if len(data) < cap:
                return


def _char_boundary(data: bytes) -> int:
    """The largest cut <= len(data) that does not split a UTF-8 character."""
    j = len(data) - 1
    while j > 0 and data[j] & 0xC0 == 0x80:  # back to the last character's lead byte
        j -= 1
    lead = data[j]
    need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return j if j + need > len(data) and j > 0 else len(data)


def _jsonl_records(path: Path, _cap: int, counters: dict[str, int]) -> Iterator[Record]:
    name = str(path)
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            counters["bytes"] += len(raw)
            if raw.strip():
                yield name, "json", lineno, raw


def _parquet_records(
    path: Path, key: str, skipped: Skipped | None, counters: dict[str, int]
) -> Iterator[Record]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow ({_EXTRA})") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"{path} is not a readable parquet file ({reason})"
        _bad(skipped, "unreadable file", str(path), msg)
        return
    names = pf.schema_arrow.names
    if key not in names:
        msg = f'{path} has no column "{key}" (columns: {", ".join(names)}): set --text-key'
        _bad(skipped, f'missing key "{key}"', f"{path} (no such column)", msg, pf.metadata.num_rows)
        return
    name, row = str(path), 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[key]):
            col = batch.column(0)
            is_str = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            is_bin = pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
            if not (is_str or is_bin):
                where = f"{path}:row{row}"
                msg = f'{where}: column "{key}" is {col.type}, not a string'
                _bad(skipped, "non-string text", where, msg, len(col))
                row += len(col)
                continue
            lengths = pc.call_function("binary_length", [col])
            counters["bytes"] += int(pc.call_function("sum", [lengths]).as_py() or 0)
            for value in col.to_pylist():
                yield name, "value", row, value
                row += 1
    except pa.ArrowException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _bad(skipped, "unreadable file", f"{path}:row{row}", f"{path} is corrupt ({reason})")
