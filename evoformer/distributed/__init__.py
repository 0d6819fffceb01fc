"""Parallel layout, process groups and device selection."""

from evoformer.distributed.dims import (
    ParallelDims,
    destroy_process_group,
    init_process_group,
    pick_device,
)

__all__ = ["ParallelDims", "destroy_process_group", "init_process_group", "pick_device"]
