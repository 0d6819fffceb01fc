"""Tensors streamed one at a time: safetensors files written without holding a shard, DCP
checkpoints written and read by name, so a conversion's peak memory is the tensors in flight,
not the model (docs/decisions.md, "Streaming conversion").

- :func:`read_header`: a safetensors file's names, dtypes and shapes, from its JSON header only;
- :func:`write_sharded`: HF's sharded layout (``model-0000k-of-0000n.safetensors`` + the
  ``model.safetensors.index.json`` weight map; one ``model.safetensors`` when it fits), each
  file's header computed from the shapes first and then every tensor's bytes appended as it
  is produced;
- :class:`LazySavePlanner`: a DCP save whose state dict holds stand-ins (shape and dtype, no
  memory) and whose tensors are produced when DCP writes them;
- :class:`StoredTensors`: a DCP checkpoint's model tensors, read by name.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem

from evoformer.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner
from evoformer.errors import UserError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD = 5 * 1000**3  # transformers' save_pretrained default, "5GB"


class TensorInfo(NamedTuple):
    """What a tensor is without its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, from its header (no data is read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise UserError(f"{path}: unreadable safetensors file ({err})") from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, not supported")
        out[name] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return out


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (transformers' units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise UserError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * scale[unit])


def plan_shards(tensors: list[tuple[str, TensorInfo]], max_bytes: int) -> list[list[str]]:
    """Tensors in order, a new shard whenever the next would overflow ``max_bytes`` (a tensor
    larger than that gets a shard of its own), as ``save_pretrained`` splits."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in tensors:
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += info.nbytes
    return shards


def _write_one(path: Path, names: list[str], infos: dict[str, TensorInfo], produce) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = infos[name]
        header[name] = {
            "dtype": NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = produce(name)
            info = infos[name]
            if t.dtype != info.dtype or tuple(t.shape) != info.shape:
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {info}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())


def write_sharded(
    out_dir: Path,
    tensors: list[tuple[str, TensorInfo]],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD,
) -> list[Path]:
    """Write ``tensors`` (in this order; ``produce(name)`` makes each when its turn comes) as
    HF's sharded safetensors with the index, or one ``model.safetensors``. Files appear by
    rename, the index last, and stale weight files of an earlier export are removed."""
    infos = dict(tensors)
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    tag = uuid.uuid4().hex[:8]
    written = []
    for fname, shard in zip(names, shards):
        tmp = out_dir / f".{fname}.{tag}.tmp"
        _write_one(tmp, shard, infos, produce)
        os.replace(tmp, out_dir / fname)
        written.append(out_dir / fname)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX]:
        if stale.exists() and stale not in written:
            stale.unlink()
    if n > 1:
        index = {
            "metadata": {"total_size": sum(i.nbytes for _, i in tensors)},
            "weight_map": {name: fname for fname, shard in zip(names, shards) for name in shard},
        }
        tmp = out_dir / f".{INDEX}.{tag}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out_dir / INDEX)
    return written


def stand_in(info: TensorInfo) -> torch.Tensor:
    """A tensor of ``info``'s shape and dtype that owns one element (what DCP plans from)."""
    return torch.empty((), dtype=info.dtype).expand(info.shape)


class LazySavePlanner(DefaultSavePlanner):
    """DCP planning from stand-ins; each tensor is made by ``produce(name)`` (name without the
    ``model.`` prefix) only when DCP writes it, and dropped once written."""

    def __init__(self, produce: Callable[[str], torch.Tensor]) -> None:
        super().__init__()
        self._produce = produce
        self.error: UserError | None = None  # DCP wraps what produce raises; kept to re-raise

    def resolve_data(self, write_item: WriteItem) -> Any:
        fqn = write_item.index.fqn
        if not fqn.startswith("model."):
            return super().resolve_data(write_item)
        try:
            return self._produce(fqn.removeprefix("model."))
        except UserError as err:
            self.error = err
            raise


class StoredTensors:
    """A DCP checkpoint's model tensors (names, dtypes and shapes from its metadata), each read
    by name in its stored dtype."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        meta = SafeFileSystemReader(str(ckpt)).read_metadata()
        self.infos: dict[str, TensorInfo] = {}
        for key, md in meta.state_dict_metadata.items():
            if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
                self.infos[key.removeprefix("model.")] = TensorInfo(
                    md.properties.dtype, tuple(md.size)
                )

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        state = {n: torch.empty(self.infos[n].shape, dtype=self.infos[n].dtype) for n in names}
        with warnings.catch_warnings():  # one process means no process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                {"model": state},
                storage_reader=SafeFileSystemReader(str(self.ckpt)),
                planner=SafeLoadPlanner(),
                no_dist=True,
            )
        return state
