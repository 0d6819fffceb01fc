"""Data: tokenizer, token store, packed/synthetic datasets, the sampler and the default corpus.

The trainer needs two calls: :func:`build_datasets` (config -> datasets) and
:class:`GlobalBatchSampler` (step -> sample indices), then :func:`get_batch` to fetch them.
"""

from evoformer.data.build import DataBundle, build_datasets
from evoformer.data.corpus import (
    CorpusFiles,
    cache_root,
    default_corpus_files,
    prepare_default_corpus,
)
from evoformer.data.dataset import ConcatDataset, PackedDataset, SyntheticDataset, get_batch
from evoformer.data.megatron import MegatronStore
from evoformer.data.preprocess import merge_slices, preprocess, read_documents
from evoformer.data.readers import Skipped, expand_inputs
from evoformer.data.sampler import EvalBatches, GlobalBatchSampler
from evoformer.data.sharded import ShardedStore
from evoformer.data.store import DocumentStore, TokenStore, TokenStoreWriter, write_token_store
from evoformer.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "ConcatDataset",
    "CorpusFiles",
    "DataBundle",
    "DocumentStore",
    "EvalBatches",
    "GlobalBatchSampler",
    "MegatronStore",
    "PackedDataset",
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
    "merge_slices",
    "prepare_default_corpus",
    "preprocess",
    "read_documents",
    "train_tokenizer",
    "write_token_store",
]
