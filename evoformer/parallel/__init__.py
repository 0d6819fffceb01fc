"""Tensor-parallel layers and the autograd-aware collectives they use, each taking its process
group explicitly (``group=None`` = no parallelism). See docs/parallelism.md."""

from evoformer.parallel.collectives import (
    SEQ_DIM,
    copy_to_parallel_region,
    count_collectives,
    gather_from_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_parallel_region,
    scatter_to_sequence_parallel_region,
    sum_across_parallel_region,
)
from evoformer.parallel.context import ParallelContext
from evoformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from evoformer.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelModule,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    gather_full_params,
    gather_vocab_logits,
    sequence_parallel_params,
    sync_sequence_parallel_grads,
    vocab_parallel_logits,
)
from evoformer.parallel.sharding import (
    ShardSpec,
    Split,
    mark_partial_grad,
    mark_sharded,
    shard_spec,
)

__all__ = [
    "SEQ_DIM",
    "ColumnParallelLinear",
    "ParallelContext",
    "RowParallelLinear",
    "ShardSpec",
    "Split",
    "TensorParallelModule",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "copy_to_parallel_region",
    "count_collectives",
    "gather_from_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_full_params",
    "gather_vocab_logits",
    "mark_partial_grad",
    "mark_sharded",
    "reduce_from_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_parallel_region",
    "scatter_to_sequence_parallel_region",
    "sequence_parallel_params",
    "shard_spec",
    "sum_across_parallel_region",
    "sync_sequence_parallel_grads",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_logits",
]
