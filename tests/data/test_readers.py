"""The corpus readers: every input format, folders and globs, skipped records, streaming."""

from __future__ import annotations

import gzip
import json
import types
from pathlib import Path

import pytest

from evoformer.data.readers import Skipped, expand_inputs, file_kind, read_documents
from evoformer.errors import UserError

DOCS = ["def f():\n    return 1\n", "x = 'é ü 漢字'\n", "", "last\tline"]


def _jsonl_bytes(rows: list[object]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _write_all_formats(folder: Path, key: str = "text") -> dict[str, Path]:
    """The same documents in each supported record format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{key: d, "id": i} for i, d in enumerate(DOCS)]
    data = _jsonl_bytes(rows)
    paths = {
        "jsonl": folder / "a.jsonl",
        "gz": folder / "b.jsonl.gz",
        "zst": folder / "c.jsonl.zst",
        "parquet": folder / "d.parquet",
    }
    paths["jsonl"].write_bytes(data)
    paths["gz"].write_bytes(gzip.compress(data))
    # two frames: a zstd stream written in pieces (as zstdmt tools do) is read across frames
    cctx = zstandard.ZstdCompressor()
    paths["zst"].write_bytes(cctx.compress(data[:20]) + cctx.compress(data[20:]))
    table = pa.table({"id": list(range(len(DOCS))), key: DOCS})
    pq.write_table(table, paths["parquet"], row_group_size=2)
    return paths


def test_every_record_format_reads_the_same_documents(tmp_path: Path) -> None:
    paths = _write_all_formats(tmp_path)
    for name, path in paths.items():
        assert list(read_documents(path)) == DOCS, name
    assert [file_kind(p) for p in paths.values()] == ["jsonl", "jsonl", "jsonl", "parquet"]
    (tmp_path / "k").mkdir()
    custom = _write_all_formats(tmp_path / "k", key="content")
    assert list(read_documents(custom["parquet"], text_key="content")) == DOCS
    assert list(read_documents(custom["zst"], text_key="content")) == DOCS


def test_text_files_plain_and_compressed(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text(DOCS[1], encoding="utf-8")
    gz = tmp_path / "b.py.gz"
    gz.write_bytes(gzip.compress(DOCS[0].encode()))
    assert list(read_documents(txt)) == [DOCS[1]]
    assert list(read_documents(gz)) == [DOCS[0]]
    assert file_kind(gz) == "text"


def test_big_text_file_is_cut_at_line_ends(tmp_path: Path) -> None:
    lines = [f"line {i} {'é' * (i % 7)}\n" for i in range(300)]
    text = "".join(lines)
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(read_documents(path, max_doc_bytes=256))
    assert "".join(docs) == text and len(docs) > 10
    assert all(len(d.encode()) <= 256 and d.endswith("\n") for d in docs)
    # one endless line: hard cuts, never inside a UTF-8 character
    one = "漢字" * 500
    path.write_text(one, encoding="utf-8")
    docs = list(read_documents(path, max_doc_bytes=100))
    assert "".join(docs) == one and all(len(d.encode()) <= 100 for d in docs)


def test_readers_stream(tmp_path: Path) -> None:
    """A reader is a generator that has read only about one record when the first one comes
    out: memory stays bounded whatever the file size."""
    rows = [{"text": "x" * 1000} for _ in range(2000)]
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl_bytes(rows)))
    counters: dict[str, int] = {}
    gen = read_documents(path, counters=counters)
    assert isinstance(gen, types.GeneratorType) and counters == {}
    assert next(gen) == "x" * 1000
    assert counters["bytes"] < 2000  # one line of ~1 KB, not the 2 MB file
    txt = tmp_path / "big.txt"
    txt.write_text("abc\n" * 100_000)
    counters = {}
    gen = read_documents(txt, max_doc_bytes=4096, counters=counters)
    assert len(next(gen)) == 4096 and counters["bytes"] == 4096


def test_bad_records_are_counted_per_reason(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        b'{"text": "good 1"}',
        b'{"text": oops}',
        b'{"body": "no text"}',
        b'{"text": 5}',
        b'{"text": "bad \xff byte"}',
        b"[1, 2]",
        b"",
        b'{"text": "good 2"}',
        b'{"text": null}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    skipped = Skipped()
    assert list(read_documents(path, skipped=skipped)) == ["good 1", "good 2"]
    assert skipped.counts == {
        "invalid JSON": 1,
        'missing key "text"': 2,
        "non-string text": 2,
        "invalid UTF-8": 1,
    }
    assert skipped.total == 6
    assert skipped.where['missing key "text"'] == [f"{path}:3", f"{path}:6"]
    summary = skipped.summary()
    assert (
        summary.startswith("skipped 6 records: ")
        and f"invalid UTF-8 1 (first: {path}:5)" in summary
    )
    # strict (the default, as tokenizer training reads): the first bad line is one clear error
    with pytest.raises(UserError, match=r"mixed\.jsonl:2: invalid JSON"):
        list(read_documents(path))


def test_bad_text_parquet_and_truncated_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xfe\xff")
    skipped = Skipped()
    assert list(read_documents(bad, skipped=skipped)) == []
    assert skipped.counts == {"invalid UTF-8": 1}
    no_col = tmp_path / "no_col.parquet"
    pq.write_table(pa.table({"content": ["a", "b", "c"]}), no_col)
    assert list(read_documents(no_col, skipped=skipped)) == []
    assert skipped.counts['missing key "text"'] == 3
    with pytest.raises(UserError, match=r'no column "text" \(columns: content\): set --text-key'):
        list(read_documents(no_col))
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    assert list(read_documents(ints, skipped=skipped)) == []
    assert skipped.counts["non-string text"] == 2
    trunc = tmp_path / "cut.jsonl.gz"
    rows = [{"text": f"{i} " + str(i * 7919 % 104729) * 20} for i in range(200)]
    whole = gzip.compress(_jsonl_bytes(rows))
    trunc.write_bytes(whole[: len(whole) // 2])
    skipped = Skipped()
    docs = list(read_documents(trunc, skipped=skipped))
    assert len(docs) < 200 and skipped.counts == {"unreadable file": 1}
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz is truncated or corrupt"):
        list(read_documents(trunc))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"junk\.parquet is not a readable parquet file"):
        list(read_documents(junk))


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/a.jsonl", "d/sub/c.txt", "d/.hidden", "e.txt"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "d" / ".git").mkdir()
    (tmp_path / "d" / ".git" / "x").write_text("x")
    got = expand_inputs([tmp_path / "d"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "d/a.jsonl",
        "d/b.txt",
        "d/sub/c.txt",
    ]
    got = expand_inputs([str(tmp_path / "**" / "*.txt"), tmp_path / "e.txt"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["d/b.txt", "d/sub/c.txt", "e.txt"]
    with pytest.raises(UserError, match=r"input pattern '.*\*\.parquet' matches no files"):
        expand_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="input folder .*empty holds no files"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(UserError, match="input file .*nope.txt not found"):
        expand_inputs([tmp_path / "nope.txt"])
