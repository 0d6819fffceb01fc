"""Checkpoints on torch.distributed.checkpoint (DCP), committed atomically.

Layout of a run's ``checkpoints/`` folder::

    step_<N>/            a complete checkpoint (appears only by an atomic rename)
      .metadata, *.distcp  DCP shards: {"model": ..., "optim": ...} keyed by parameter name
      config.yaml          the resolved config, so the checkpoint describes its own model
      trainer.json         step, schedule and sampler position ("weights_only": true for a
                           checkpoint of weights alone, e.g. from import-hf)
      rng_rank<R>.pt       each rank's RNG states (tensors only; loaded with weights_only)
    latest               text file naming the newest complete checkpoint
    .tmp-step_<N>-*/     a save in progress; never taken for a checkpoint, swept on next save

A kill at any point leaves either the old set of checkpoints or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from evoformer.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner
from evoformer.errors import UserError
from evoformer.parallel.sharding import ep_global_view, shard_spec, tp_global_view

# DCP warns that one process means no process group; the background writer's thread runs
# outside any catch_warnings block, so the filter is set once here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

LATEST = "latest"
# trainer.json key of a checkpoint holding weights and no optimizer state (import-hf writes it):
# training from it starts a new run at step 0 with a fresh optimizer and data order.
WEIGHTS_ONLY = "weights_only"
STEP_PREFIX = "step_"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file + fsync + rename, so readers see the old or the new text."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permission denied, a rank's write error):
    ``latest`` still names the previous checkpoint; one line, exit status 2."""


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 0,
    extra_files: dict[str, Path] | None = None,
    before_commit: Callable[[Path], None] | None = None,
    tp_mesh: Any = None,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    ep_mesh: Any = None,
    write_extra: Callable[[Path], None] | None = None,
    planner: Any = None,
    file_per_tensor: bool = False,
) -> Path:
    """Save a complete checkpoint as ``ckpt_root/step_<step>`` and point ``latest`` at it.

    Every rank calls this. With ``tp_mesh`` (the tensor-parallel DeviceMesh), sharded parameters
    and their optimizer states are stored as the unpadded global tensors, so any layout loads
    them. ``before_commit`` is a test hook run on rank 0 just before the rename.
    ``ep_mesh``: expert-parallel shards and their optimizer states are stored as global tensors
    too (see ``_wrap_expert_parallel``).
    ``model_state_dict`` replaces ``model.state_dict()`` when the model's own tensors are not
    its weights (DeepSpeed ZeRO-3 partitions); ``write_extra(tmp)`` runs on every rank after the
    DCP shards are written, for a backend's own files inside the same atomic folder.
    ``planner``: DCP's save planner (a streamed import's tensors are made as DCP writes them).
    ``file_per_tensor``: one DCP file per tensor; DCP's writer keeps every tensor of a file until
    the file is closed, so a streamed save must close a file after each tensor.
    A failed write raises ``CheckpointWriteError`` on every rank and leaves ``latest`` alone.
    """
    pending = begin_save(
        ckpt_root,
        step,
        model,
        optimizer,
        trainer_state,
        config_yaml,
        keep_last=keep_last,
        extra_files=extra_files,
        before_commit=before_commit,
        tp_mesh=tp_mesh,
        model_state_dict=model_state_dict,
        ep_mesh=ep_mesh,
        write_extra=write_extra,
        planner=planner,
        file_per_tensor=file_per_tensor,
    )
    return pending.commit()


def begin_save(
    ckpt_root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 0,
    extra_files: dict[str, Path] | None = None,
    before_commit: Callable[[Path], None] | None = None,
    tp_mesh: Any = None,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    ep_mesh: Any = None,
    write_extra: Callable[[Path], None] | None = None,
    background: bool = False,
    process_group: dist.ProcessGroup | None = None,
    planner: Any = None,
    file_per_tensor: bool = False,
) -> PendingSave:
    """Start a save (arguments as ``save_checkpoint``); ``PendingSave.commit`` completes it.

    ``background``: the shards are staged (copied to host memory) now and written by DCP's
    ``async_save`` on a thread while training continues; its collectives run on
    ``process_group``, which must not be the group the training loop uses (gloo on the host).
    Everything the commit writes (trainer state, config) is captured now, at the step saved.
    """
    root = Path(ckpt_root)
    token = [uuid.uuid4().hex[:8]]
    if _dist():
        dist.broadcast_object_list(token, src=0)
    tmp = root / f".tmp-{STEP_PREFIX}{step}-{token[0]}"
    pending = PendingSave(
        root=root,
        step=step,
        tmp=tmp,
        trainer_state={"step": step, **trainer_state},
        config_yaml=config_yaml,
        keep_last=keep_last,
        extra_files=dict(extra_files or {}),
        before_commit=before_commit,
    )
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _sweep_tmp(root)
            tmp.mkdir()
        except OSError as err:
            pending.error = _write_error(step, err, root)
    pending.agree()  # every rank raises the same line, or all go on
    if optimizer is None:
        state = {"model": model.state_dict() if model_state_dict is None else model_state_dict}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    _wrap_expert_parallel(state, model, ep_mesh)
    _wrap_tensor_parallel(state, model, tp_mesh)
    try:
        torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
        with warnings.catch_warnings():  # DCP warns that one process means no process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            if background:
                future = dcp.async_save(
                    state,
                    checkpoint_id=str(tmp),
                    process_group=process_group,
                    no_dist=not _dist(),
                )
                pending.watch(cast(Future, future))
            else:
                writer = None
                if file_per_tensor:
                    writer = FileSystemWriter(str(tmp), single_file_per_rank=False)
                dcp.save(
                    state,
                    checkpoint_id=str(tmp),
                    no_dist=not _dist(),
                    planner=planner,
                    storage_writer=writer,
                )
        if write_extra is not None:
            write_extra(tmp)
    except (Exception, dcp.api.CheckpointException) as err:
        pending.error = _write_error(step, err, root)
    if not background:
        pending.written_s = time.perf_counter() - pending.started
    return pending


@dataclasses.dataclass
class PendingSave:
    """A checkpoint whose shards are being written into ``tmp``; ``commit`` publishes it.

    The protocol: shards (and each rank's RNG file) go into ``.tmp-step_<N>-<token>/``; when
    every rank's write has completed, rank 0 adds ``config.yaml`` and ``trainer.json`` (the state
    captured when the save began), fsyncs, renames the folder to ``step_<N>``, rewrites
    ``latest`` atomically and prunes to ``keep_last``. A kill at any point leaves ``latest``
    naming the previous complete checkpoint; a failed write raises ``CheckpointWriteError``."""

    root: Path
    step: int
    tmp: Path
    trainer_state: dict[str, Any]
    config_yaml: str
    keep_last: int
    extra_files: dict[str, Path]
    before_commit: Callable[[Path], None] | None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    future: Future | None = None
    written_s: float | None = None  # seconds from the start until the shards were on disk
    error: str | None = None

    @property
    def final(self) -> Path:
        return self.root / f"{STEP_PREFIX}{self.step}"

    def watch(self, future: Future) -> None:
        self.future = future

        def written(f: Future) -> None:
            self.written_s = time.perf_counter() - self.started

        future.add_done_callback(written)

    def done(self) -> bool:
        """This rank's write has finished (or failed); never blocks."""
        return self.future is None or self.future.done()

    def failed(self) -> bool:
        """This rank's write has finished with an error (call after ``done``)."""
        if self.error is None and self.future is not None and self.future.done():
            err = self.future.exception()
            if err is not None:
                self.error = _write_error(self.step, err, self.root)
        return self.error is not None

    def wait(self) -> None:
        """Block until this rank's write has finished (successfully or not)."""
        if self.future is not None:
            try:
                self.future.result()
            except BaseException:  # noqa: B036 (DCP's CheckpointException is a BaseException)
                pass
            self.failed()

    def agree(self) -> None:
        """Collective: raise ``CheckpointWriteError`` on every rank when any rank has an error
        (rank 0's wins: it names the others' failures too), after removing the folder."""
        errors = [self.error]
        if _dist():
            gathered: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.error)
            errors = gathered
        first = next((e for e in errors if e is not None), None)
        if first is None:
            return
        if _rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        raise CheckpointWriteError(first)

    def commit(self) -> Path:
        """Collective: wait for this rank's write, then (all ranks written) publish the
        checkpoint on rank 0; every rank returns the path or raises the same error line."""
        self.wait()
        self.agree()
        if _rank() == 0:
            try:
                self._publish()
            except OSError as err:
                self.error = _write_error(self.step, err, self.root)
        self.agree()
        return self.final

    def _publish(self) -> None:
        tmp, final, root = self.tmp, self.final, self.root
        (tmp / "config.yaml").write_text(self.config_yaml)
        (tmp / "trainer.json").write_text(json.dumps(self.trainer_state, indent=1))
        for name, src in self.extra_files.items():  # a name may hold a sub-folder
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
        for f in tmp.rglob("*"):  # a backend's sub-folder (write_extra) included
            if f.is_dir():
                _fsync_dir(f)
                continue
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if self.before_commit is not None:
            self.before_commit(tmp)
        if final.exists():  # re-saving the same step (e.g. interrupted right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / LATEST, final.name + "\n")
        _prune(root, self.keep_last, final)


def _write_error(step: int, err: BaseException, root: Path) -> str:
    """One line: which checkpoint failed, the root cause, and that ``latest`` is unchanged."""
    cause: BaseException = err
    failures = getattr(err, "failures", None)  # DCP's CheckpointException: per-rank causes
    if isinstance(failures, dict) and failures:
        cause = sorted(failures.items())[0][1][0]  # (exception, traceback) of the first rank
    while cause.__cause__ is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        where = f" ({cause.filename})" if cause.filename else ""
        text = f"{cause.strerror}{where}"
    else:
        lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
        text = f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]
    try:
        kept = f"{root / LATEST} still names {(root / LATEST).read_text().strip()}"
    except OSError:
        kept = "there is no earlier checkpoint"
    return f"checkpoint {STEP_PREFIX}{step} could not be written: {text}; {kept}"


def _sweep_tmp(root: Path) -> None:
    for p in root.glob(f".tmp-{STEP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Keep ``keep`` (the checkpoint just committed, which ``latest`` names) and the newest
    ``keep_last - 1`` others: a run restarted from an earlier step saves lower step numbers
    than the folders already there, and must not prune what ``latest`` names."""
    if keep_last <= 0:
        return
    others = [p for p in list_checkpoints(root) if p.name != keep.name]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder, a ``checkpoints/`` folder or a run folder -> the checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    for root in (p, p / "checkpoints"):
        latest = root / LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            target = root / name
            if not target.is_dir():
                raise UserError(f"{latest} names {name}, which does not exist")
            return _check_complete(target)
    if (p / ".metadata").is_file() or (p / "trainer.json").exists():
        return _check_complete(p)
    raise UserError(f"{p} is not a checkpoint (no .metadata, no checkpoints/latest)")


def _check_complete(ckpt: Path) -> Path:
    for name in (".metadata", "config.yaml", "trainer.json"):
        if not (ckpt / name).is_file():
            raise UserError(f"checkpoint {ckpt} is incomplete or corrupt: {name} is missing")
    return ckpt


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "trainer.json").read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise UserError(f"checkpoint {ckpt}: unreadable trainer.json ({err})") from None


def load_checkpoint(
    ckpt: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    tp_mesh: Any = None,
    rng_rank: int | None = None,
    ep_mesh: Any = None,
) -> dict[str, Any]:
    """Load model (and optimizer, RNG) state in place; returns the trainer state. Tensor-parallel
    shards are cut from the stored global tensors, whatever layout saved them. ``rng_rank``:
    whose saved RNG state this rank restores (default its own; the ranks of a TP group share
    one state, so the trainer names the group's first rank, which also holds on a new layout)."""
    ckpt = _check_complete(ckpt)
    try:
        if optimizer is None:
            state = {"model": model.state_dict()}
            originals = _wrap_expert_parallel(state, model, ep_mesh)
            originals |= _wrap_tensor_parallel(state, model, tp_mesh)
            _dcp_load(state, ckpt)
            _unwrap(state, originals)
            model.load_state_dict(state["model"])
        else:
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
            originals = _wrap_expert_parallel(state, model, ep_mesh)
            originals |= _wrap_tensor_parallel(state, model, tp_mesh)
            # Param groups hold this rank's parameter names by group index, and the config's
            # hyperparameters: under another layout (a pipeline stage) the stored lists name
            # other parameters, so the fresh groups are kept and only the state is loaded.
            groups = osd.pop("param_groups", None)
            _dcp_load(state, ckpt)
            if groups is not None:
                osd["param_groups"] = groups
            _unwrap(state, originals)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
                options=StateDictOptions(strict=True),
            )
    except UserError:
        raise
    except (Exception, dcp.api.CheckpointException) as err:
        # DCP raises a zoo of types (its CheckpointException is a BaseException wrapping the
        # per-rank tracebacks); the last line of the text names the real cause.
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        cause = lines[-1] if lines else type(err).__name__
        raise UserError(
            f"checkpoint {ckpt} cannot be loaded (corrupt or mismatched): {cause[:300]}"
        ) from None
    if restore_rng:
        rng_file = ckpt / f"rng_rank{_rank() if rng_rank is None else rng_rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
    return read_trainer_state(ckpt)


def _wrap_tensor_parallel(state: dict[str, Any], model: torch.nn.Module, tp_mesh: Any) -> dict:
    """Replace each tensor-parallel shard (and its Adam moments) in ``state`` by a DTensor view
    of the unpadded global tensor (``sharding.tp_global_view``); returns what to put back after
    a load. Under FSDP2 x TP the entries are DTensors over the data-parallel mesh holding a
    shard of the TP shard, and ``tp_mesh`` is the mesh ``(*dp dims, "tp")`` (tp last)."""
    if tp_mesh is None or tp_mesh.size(tp_mesh.ndim - 1) == 1:
        return {}
    specs = {
        name: (spec, tuple(p.shape))
        for name, p in model.named_parameters()
        # Expert-parallel shards are wrapped (over ep and tp) by _wrap_expert_parallel.
        if (spec := shard_spec(p)) is not None and spec.is_tp_sharded and not spec.is_expert
    }
    return _wrap(state, specs, lambda t, spec: tp_global_view(t, spec.tp, tp_mesh))


def _wrap_expert_parallel(state: dict[str, Any], model: torch.nn.Module, ep_mesh: Any) -> dict:
    """Replace each expert-parallel shard (this ep rank's experts of a stacked ``[E, ...]``
    tensor) and its Adam moments in ``state`` by a DTensor view of the global tensor
    (``sharding.ep_global_view``), so a checkpoint holds all E experts whatever the ep size;
    returns what to put back after a load. ``ep_mesh``: the ``ep`` mesh, or ``("ep", "tp")``
    when the experts are also split over TP, or under FSDP2 ``("edp", "ep")``."""
    if ep_mesh is None:
        return {}
    specs = {
        name: (spec, tuple(p.shape))
        for name, p in model.named_parameters()
        if (spec := shard_spec(p)) is not None and spec.is_expert
    }
    return _wrap(state, specs, lambda t, spec: ep_global_view(t, spec, ep_mesh))


def _wrap(state: dict[str, Any], specs: dict[str, tuple], view: Callable) -> dict:
    """Replace the model entries named in ``specs`` and their same-shaped optimizer states by
    ``view(tensor, spec)``; returns the replaced tensors by position."""
    originals: dict[tuple, torch.Tensor] = {}
    msd = state["model"]
    for name, (spec, _) in specs.items():
        if name in msd:
            originals[("model", name)] = msd[name]
            msd[name] = view(msd[name], spec)
    optim_state = state.get("optim", {}).get("state", {})
    for name, entry in list(optim_state.items()):
        if name not in specs:
            continue
        spec, shape = specs[name]
        # get_state_dict hands out the optimizer's own per-parameter dicts: never edit those.
        entry = optim_state[name] = dict(entry)
        for key, value in list(entry.items()):
            if torch.is_tensor(value) and tuple(value.shape) == shape:
                originals[("optim", name, key)] = value
                entry[key] = view(value, spec)
    return originals


def _unwrap(state: dict[str, Any], originals: dict) -> None:
    """Put the local (padded) tensors back; DCP loaded into them through the DTensor views."""
    for where, tensor in originals.items():
        if where[0] == "model":
            state["model"][where[1]] = tensor
        else:
            state["optim"]["state"][where[1]][where[2]] = tensor


def _dcp_load(state: dict[str, Any], ckpt: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(ckpt)),
            planner=SafeLoadPlanner(),
            no_dist=not _dist(),
        )


def restore_rng_state(ckpt: Path, rank: int) -> None:
    """Restore the RNG states rank ``rank`` saved in ``ckpt`` (if it saved any)."""
    rng_file = Path(ckpt) / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
