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
from evoformer.data.preprocess import preprocess, read_documents
from evoformer.data.sampler import EvalBatches, GlobalBatchSampler
from evoformer.data.store import TokenStore, TokenStoreWriter, write_token_store
from evoformer.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "ConcatDataset",
    "CorpusFiles",
    "DataBundle",
    "EvalBatches",
    "GlobalBatchSampler",
    "HFTokenizer",
    "PackedDataset",
    "SentencePieceTokenizer",
    "SyntheticDataset",
    "TokenStore",
    "TokenStoreWriter",
    "Tokenizer",
    "build_datasets",
    "cache_root",
    "default_corpus_files",
    "get_batch",
    "load_tokenizer",
    "prepare_default_corpus",
    "preprocess",
    "read_documents",
    "train_tokenizer",
    "write_token_store",
]
