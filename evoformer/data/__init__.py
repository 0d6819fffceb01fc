"""Data: tokenizer, token store, packed/synthetic datasets, the sampler and the default corpus.

The trainer needs two calls: :func:`build_datasets` (config -> datasets) and
:class:`GlobalBatchSampler` (step -> sample indices), then :func:`get_batch` to fetch them.
"""

import importlib
from typing import TYPE_CHECKING, Any

from evoformer.data.corpus import (
    CorpusFiles,
    cache_root,
    default_corpus_files,
    prepare_default_corpus,
)
from evoformer.data.megatron import MegatronStore
from evoformer.data.preprocess import merge_slices, preprocess, read_documents
from evoformer.data.readers import Skipped, expand_inputs
from evoformer.data.sharded import ShardedStore
from evoformer.data.store import DocumentStore, TokenStore, TokenStoreWriter, write_token_store
from evoformer.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

# The torch-backed parts load on first use, so that importing the rest (the tokenizer, the
# readers, the stores: all a preprocessing worker process needs) does not pull in torch, which
# would cost every worker a few hundred MB of memory and a second of start-up.
_LAZY = {
    "DataBundle": "evoformer.data.build",
    "build_datasets": "evoformer.data.build",
    "ConcatDataset": "evoformer.data.dataset",
    "PackedDataset": "evoformer.data.dataset",
    "SyntheticDataset": "evoformer.data.dataset",
    "get_batch": "evoformer.data.dataset",
    "EvalBatches": "evoformer.data.sampler",
    "GlobalBatchSampler": "evoformer.data.sampler",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from evoformer.data.build import DataBundle, build_datasets
    from evoformer.data.dataset import ConcatDataset, PackedDataset, SyntheticDataset, get_batch
    from evoformer.data.sampler import EvalBatches, GlobalBatchSampler

__all__ = [
    "ConcatDataset",
    "CorpusFiles",
    "DataBundle",
    "DocumentStore",
    "EvalBatches",
    "GlobalBatchSampler",
    "HFTokenizer",
    "MegatronStore",
    "PackedDataset",
    "SentencePieceTokenizer",
    "ShardedStore",
    "Skipped",
    "SyntheticDataset",
    "TokenStore",
    "TokenStoreWriter",
    "Tokenizer",
    "build_datasets",
    "cache_root",
    "default_corpus_files",
    "expand_inputs",
    "get_batch",
    "load_tokenizer",
    "merge_slices",
    "prepare_default_corpus",
    "preprocess",
    "read_documents",
    "train_tokenizer",
    "write_token_store",
]
