from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evoformer.data import TokenStore, write_token_store
from evoformer.data.store import HEADER_SIZE, MAGIC
from evoformer.errors import UserError


def _docs(rng: np.random.Generator, n: int, vocab: int) -> list[np.ndarray]:
    return [rng.integers(0, vocab, size=rng.integers(0, 50)) for _ in range(n)]


@pytest.mark.parametrize(
    "vocab, dtype", [(1000, np.uint16), (65536, np.uint16), (70000, np.uint32)]
)
def test_round_trip(tmp_path: Path, vocab: int, dtype: type) -> None:
    rng = np.random.default_rng(0)
    docs = _docs(rng, 101, vocab)
    docs[3] = np.array([], dtype=np.int64)  # empty documents are kept
    docs[4] = np.array([vocab - 1, 0])
    path = write_token_store(tmp_path / "x.tok", (d.tolist() for d in docs), vocab, eod_id=2)
    store = TokenStore(path)
    assert (store.n_docs, store.vocab_size, store.eod_id) == (101, vocab, 2)
    assert store.n_tokens == sum(len(d) for d in docs)
    assert store.tokens.dtype == dtype
    assert store.offsets[0] == 0 and store.offsets[-1] == store.n_tokens
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(store.doc(i), d)
    np.testing.assert_array_equal(store.doc(-1), docs[-1])
    np.testing.assert_array_equal(store.tokens, np.concatenate(docs))
    np.testing.assert_array_equal(store.doc_lengths(), [len(d) for d in docs])
    # file size is exactly header + padded tokens + offsets
    tok_bytes = store.n_tokens * np.dtype(dtype).itemsize
    assert path.stat().st_size == HEADER_SIZE + tok_bytes + (-tok_bytes) % 8 + 8 * 102
    assert not store.tokens.flags.writeable
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.tokens, store.tokens)


def test_empty_store(tmp_path: Path) -> None:
    store = TokenStore(write_token_store(tmp_path / "e.tok", [], 100, eod_id=2))
    assert (store.n_tokens, store.n_docs, len(store.tokens)) == (0, 0, 0)
    with pytest.raises(IndexError):
        store.doc(0)


def test_bad_ids_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        write_token_store(tmp_path / "b.tok", [[1, 2, 100]], 100, eod_id=2)
    with pytest.raises(ValueError, match="eod_id"):
        write_token_store(tmp_path / "b.tok", [[1]], 100, eod_id=100)
    assert list(tmp_path.iterdir()) == []


def _valid(tmp_path: Path) -> Path:
    return write_token_store(tmp_path / "v.tok", [[1, 2, 3], [4, 5]], 10, eod_id=2)


def test_foreign_file_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.tok"
    other.write_bytes(b"PK\x03\x04 a zip file, not ours" * 4)
    with pytest.raises(UserError, match=r"other.tok is not an evoformer token store"):
        TokenStore(other)
    (tmp_path / "empty.tok").write_bytes(b"")
    with pytest.raises(UserError, match="not an evoformer token store"):
        TokenStore(tmp_path / "empty.tok")
    with pytest.raises(UserError, match=r"token store .*missing.tok not found"):
        TokenStore(tmp_path / "missing.tok")


def test_truncated_refused(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(
        UserError, match=r"truncated or corrupt: header says 5 tokens .* file holds"
    ):
        TokenStore(path)
    path.write_bytes(data[:20])
    with pytest.raises(UserError, match="truncated or corrupt"):
        TokenStore(path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(UserError, match="truncated or corrupt"):
        TokenStore(path)


def test_version_and_offsets_checked(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    data = bytearray(path.read_bytes())
    bad_version = bytearray(data)
    struct.pack_into("<I", bad_version, len(MAGIC), 99)
    path.write_bytes(bad_version)
    with pytest.raises(UserError, match="format version 99"):
        TokenStore(path)
    bad_offsets = bytearray(data)
    struct.pack_into("<q", bad_offsets, len(data) - 16, 7)  # offsets [0, 7, 5]: not monotonic
    path.write_bytes(bad_offsets)
    with pytest.raises(UserError, match="inconsistent document offsets"):
        TokenStore(path)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    old = _valid(tmp_path)
    before = old.read_bytes()

    def docs():
        yield [1, 2]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_token_store(tmp_path / "new.tok", docs(), 10, eod_id=2)
    with pytest.raises(RuntimeError):
        write_token_store(old, docs(), 10, eod_id=2)
    # no new file, no temporary, and the existing store under the same name is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.tok"]
    assert old.read_bytes() == before


_KILLED_WRITER = """
import os, signal, sys
from evoformer.data import write_token_store

def docs():
    for i in range(1000):
        if i == 500:
            os.kill(os.getpid(), signal.SIGKILL)
        yield list(range(100))

write_token_store(sys.argv[1], docs(), 1000, eod_id=2)
"""


def test_killed_process_leaves_no_file_under_final_name(tmp_path: Path) -> None:
    target = tmp_path / "killed.tok"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], env=env)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    # only the hidden temporary remains, which no reader ever opens
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".killed.tok.")
