"""The parallel layout: one ParallelDims object, built once, passed explicitly.

Data-parallel size is derived from the world size: dp = world / (pp * cp * tp). Ranks are laid
out as a ``[pp, dp, cp, tp]`` grid with tp innermost (the Megatron / torchtitan order): adjacent
ranks form a tensor-parallel group, so on a multi-GPU node the bandwidth-hungry TP all-reduces
stay on NVLink and data parallelism spans nodes; pipeline stages are outermost.

Context parallelism (``cp``) sits between dp and tp: a cp group splits each sequence
(``parallel/context_parallel.py``) and exchanges K/V (ring) or heads (all-to-all) in every
attention layer, which is the next most bandwidth-hungry traffic after TP, so cp x tp stays
within a node where it fits. cp ranks read the same micro-batches but hold different tokens, so
for the gradients they are replicas like dp ranks: ``ParallelGroups.dp_group`` is the
*replica* group ``dp x cp`` (DDP averages, FSDP2 shards over it, as torchtitan's ``dp_shard_cp``)
and ``cp_group`` the sequence-splitting one.

Expert parallelism is carved out of data parallelism: ``ep`` divides ``dp``, and the dp index
splits as ``dp_rank = edp_rank * ep + ep_rank`` (ep innermost). The ``ep`` group holds different
experts (tokens travel between its ranks by all-to-all); the ``edp`` group (expert data
parallel, size dp / ep) holds replicas of the same experts. Dense parameters replicate over the
whole dp group as before.

``ParallelDims.build()`` creates the DeviceMesh and its process groups once; the resulting
``ParallelGroups`` is what layers and the trainer receive. Nothing in evoformer keeps
process-group globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

from evoformer.config.schema import DistConfig, ParallelConfig
from evoformer.errors import UserError


@dataclass
class ParallelDims:
    """Sizes of each parallel dimension and this process's place in them."""

    world_size: int
    rank: int
    local_rank: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    cp_kind: str = "ring"  # parallel.cp_kind: how attention runs over the cp group
    dp: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size % model_parallel:
            what = (
                f"tp*pp*cp = {self.tp}*{self.pp}*{self.cp}"
                if self.cp > 1
                else (f"tp*pp = {self.tp}*{self.pp}")
            )
            raise UserError(f"world size {self.world_size} is not divisible by {what}")
        self.dp = self.world_size // model_parallel
        if self.dp % self.ep:
            raise UserError(
                f"parallel.ep={self.ep} must divide the data-parallel size {self.dp} "
                f"(world {self.world_size} / (tp*pp = {model_parallel}))"
            )

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def replicas(self) -> int:
        """Ranks holding the same parameters and reducing gradients together: dp x cp."""
        return self.dp * self.cp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard (dp / ep)."""
        return self.dp // self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, cfg: ParallelConfig) -> ParallelDims:
        """Sizes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and the config."""
        return cls(
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            tp=cfg.tp,
            pp=cfg.pp,
            ep=cfg.ep,
            cp=cfg.cp,
            cp_kind=cfg.cp_kind,
        )

    def build(self, device_type: str = "cpu") -> ParallelGroups:
        """The DeviceMesh (dims ``("pp", "dp", "tp")``, with ``dp`` split into
        ``("edp", "ep")`` when ep > 1) and its process groups, created once.

        Call after ``init_process_group`` on every rank (creating groups is collective). A single
        process needs no process group: its groups are ``None``, which every parallel layer and
        collective reads as "size 1, no communication".
        """
        if not self.distributed:
            return ParallelGroups(self, None, None, None, (0,), (0,))
        if self.cp > 1:
            return self._build_cp(device_type)
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build() needs torch.distributed initialised first")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"ParallelDims says rank {self.rank} of {self.world_size}, torch.distributed says "
                f"rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        from torch.distributed.device_mesh import init_device_mesh

        # init_device_mesh lays ranks out row-major: tp is innermost, then (edp, ep) = dp, then
        # pp, matching the *_rank properties above.
        if self.ep == 1:
            mesh = init_device_mesh(
                device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp")
            )
            submeshes = {name: mesh[name] for name in ("pp", "dp", "tp")}
        else:
            mesh = init_device_mesh(
                device_type,
                (self.pp, self.edp, self.ep, self.tp),
                mesh_dim_names=("pp", "edp", "ep", "tp"),
            )
            submeshes = {name: mesh[name] for name in ("pp", "edp", "ep", "tp")}
            # Keep the flattened mesh itself: slicing a flattened dim from the root is deprecated.
            submeshes["dp"] = mesh["edp", "ep"]._flatten("dp")
        tp_group, dp_group = submeshes["tp"].get_group(), submeshes["dp"].get_group()
        pp_group = submeshes["pp"].get_group()

        def ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
            return tuple(dist.get_process_group_ranks(group))

        ep_group = edp_group = None
        if self.ep > 1:
            ep_group, edp_group = submeshes["ep"].get_group(), submeshes["edp"].get_group()
        return ParallelGroups(
            self,
            mesh,
            tp_group,
            dp_group,
            ranks(tp_group),
            ranks(dp_group),
            pp_group=pp_group,
            pp_ranks=ranks(pp_group),
            ep_group=ep_group,
            ep_ranks=ranks(ep_group) if ep_group else (self.rank,),
            edp_group=edp_group,
            edp_ranks=ranks(edp_group) if edp_group else ranks(dp_group),
            submeshes=submeshes,
        )

    def _build_cp(self, device_type: str) -> ParallelGroups:
        """The mesh ``("pp", "dp", "cp", "tp")`` (``dp`` split into ``("edp", "ep")`` when
        ep > 1) with dp and cp flattened into the replica dimension ``dp_cp`` (what DDP reduces
        over and FSDP2 shards over). With ep > 1 the experts' replicas are edp x cp: that group
        (not adjacent in the mesh) is built from the rank grid."""
        from torch.distributed.device_mesh import init_device_mesh

        dp_dims = ("dp",) if self.ep == 1 else ("edp", "ep")
        sizes = (self.dp,) if self.ep == 1 else (self.edp, self.ep)
        names = ("pp", *dp_dims, "cp", "tp")
        mesh = init_device_mesh(
            device_type, (self.pp, *sizes, self.cp, self.tp), mesh_dim_names=names
        )
        submeshes = {name: mesh[name] for name in names}
        submeshes["dp_cp"] = mesh[(*dp_dims, "cp")]._flatten("dp_cp")
        groups = {name: m.get_group() for name, m in submeshes.items()}

        def ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
            return tuple(dist.get_process_group_ranks(group))

        replica = groups["dp_cp"]
        ep_group: dist.ProcessGroup | None = None
        edp_group: dist.ProcessGroup | None = None
        edp_ranks = ranks(replica)
        if self.ep > 1:
            ep_group = groups["ep"]
            # every rank creates every (edp x cp) group, in the same order
            grid = mesh.mesh.permute(0, 2, 4, 1, 3).reshape(-1, self.edp * self.cp)
            for row in grid.tolist():
                group = dist.new_group(row)
                if self.rank in row:
                    edp_group, edp_ranks = cast(dist.ProcessGroup, group), tuple(row)
        return ParallelGroups(
            self,
            mesh,
            groups["tp"],
            replica,
            ranks(groups["tp"]),
            ranks(replica),
            pp_group=groups["pp"],
            pp_ranks=ranks(groups["pp"]),
            ep_group=ep_group,
            ep_ranks=ranks(ep_group) if ep_group is not None else (self.rank,),
            edp_group=edp_group,
            edp_ranks=edp_ranks,
            cp_group=groups["cp"],
            cp_ranks=ranks(groups["cp"]),
            submeshes=submeshes,
        )


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one layout, built by ``ParallelDims.build``; pass it explicitly.

    Groups are ``None`` in a single process (and ``ep_group`` / ``edp_group`` when ep = 1).
    ``*_ranks`` are the global ranks sharing this rank's group (e.g. world 4, tp 2: rank 1 has
    tp_ranks (0, 1) and dp_ranks (1, 3)). ``submesh(name)`` gives the 1-D DeviceMesh of one
    dimension (``pp``, ``dp``, ``tp``, and ``edp`` / ``ep`` when ep > 1; ``cp`` and the
    flattened replica dimension ``dp_cp`` when cp > 1). Under cp > 1 ``dp_group`` / ``dp_ranks``
    are the replica group dp x cp: every reduction over replicas (gradients, loss metrics, MoE
    loads) spans the cp ranks too, which hold the other tokens of the same sequences.
    """

    dims: ParallelDims
    mesh: DeviceMesh | None  # the root mesh
    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    pp_group: dist.ProcessGroup | None = None
    pp_ranks: tuple[int, ...] = (0,)
    ep_group: dist.ProcessGroup | None = None
    ep_ranks: tuple[int, ...] = (0,)
    edp_group: dist.ProcessGroup | None = None
    edp_ranks: tuple[int, ...] = (0,)
    # Context parallelism: the ranks splitting each sequence (None when cp = 1). dp_group is
    # then the replica group dp x cp (see the module docstring).
    cp_group: dist.ProcessGroup | None = None
    cp_ranks: tuple[int, ...] = (0,)
    submeshes: dict = field(default_factory=dict)

    def submesh(self, name: str):
        """The 1-D DeviceMesh of dimension ``name`` (distributed runs only)."""
        if name not in self.submeshes:
            raise KeyError(f"no {name!r} mesh dimension in this layout ({sorted(self.submeshes)})")
        return self.submeshes[name]

    def hsdp_mesh(self, replicate: int):
        """The root mesh with ``dp`` split into ``("dp_replicate", "dp_shard")`` for HSDP:
        ``replicate`` replicas, each sharding over dp / replicate ranks (``dp_shard`` innermost,
        so a shard group is adjacent dp ranks, on one node where possible). Slice it as
        ``m["dp_replicate", "dp_shard"]`` (what FSDP2 shards over) or with ``"tp"`` added.
        Creates process groups: every rank calls it, once."""
        dp = self.dims.dp
        if replicate < 1 or dp % replicate:
            raise UserError(
                f"config: zero.replicate={replicate} must divide the data-parallel size {dp} "
                f"(world {self.dims.world_size} / (tp*pp = {self.dims.tp * self.dims.pp}))"
            )
        if self.mesh is None or "dp" not in (self.mesh.mesh_dim_names or ()):
            raise UserError(
                "config: zero.replicate > 1 (HSDP) needs a dp mesh dimension "
                "(a distributed run without expert parallelism)"
            )
        return self.mesh._unflatten(
            "dp", (replicate, dp // replicate), ("dp_replicate", "dp_shard")
        )

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def cp(self) -> int:
        return self.dims.cp

    @property
    def tp_rank(self) -> int:
        return self.dims.tp_rank

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank


def pick_device(choice: str, dims: ParallelDims) -> torch.device:
    """``auto`` takes this rank's GPU when CUDA is present, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("run.device=cuda but no CUDA device is available")
        torch.cuda.set_device(dims.local_rank)
        return torch.device("cuda", dims.local_rank)
    return torch.device("cpu")


def init_process_group(
    dims: ParallelDims,
    device: torch.device,
    cfg: DistConfig | None = None,
    run_dir: str | Path | None = None,
) -> None:
    """NCCL on GPU, gloo on CPU; a no-op for a single process (or when already initialised).

    ``cfg.timeout_s`` is every collective's timeout (gloo raises in the waiting call; NCCL's
    watchdog tears the process down, see ``nccl_environment``)."""
    cfg = cfg or DistConfig()
    if dims.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            for key, value in nccl_environment(cfg, run_dir).items():
                os.environ.setdefault(key, value)  # what the user exported wins
        dist.init_process_group(
            backend,
            rank=dims.rank,
            world_size=dims.world_size,
            timeout=timedelta(seconds=cfg.timeout_s),
        )


def nccl_environment(cfg: DistConfig, run_dir: str | Path | None = None) -> dict[str, str]:
    """The ProcessGroupNCCL settings (torch 2.13 names), read when the first NCCL group is
    created: async error handling (a timed-out or failed collective ends the process instead of
    hanging it) and the flight recorder (the last ``cfg.flight_recorder`` collectives of every
    group, dumped per rank on a timeout: ``torch.distributed.flight_recorder`` reads the files)."""
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": str(cfg.async_error_handling)}
    if cfg.flight_recorder > 0:
        size = str(cfg.flight_recorder)
        # TORCH_FR_BUFFER_SIZE is the current name; older releases read the NCCL one.
        env |= {"TORCH_FR_BUFFER_SIZE": size, "TORCH_NCCL_TRACE_BUFFER_SIZE": size}
        env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
        if run_dir is not None:
            prefix = str(Path(run_dir) / "flight_recorder" / "rank_")
            env |= {"TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}
    return env


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
