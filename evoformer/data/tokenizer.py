"""Tokenizers: one interface over sentencepiece and HuggingFace ones, and training a
byte-fallback BPE sentencepiece model for code.

:func:`load_tokenizer` reads a sentencepiece ``.model``, an HF ``tokenizer.json`` or an HF folder
into a :class:`Tokenizer` (vocab size, eod/bos/pad ids, encode/decode, a content digest, the files
a run folder keeps).

The trained tokenizer round-trips text exactly (indentation, tabs, blank lines, trailing spaces,
any unicode through byte fallback). Two sentencepiece defaults would break that and are turned
off: NFKC normalisation with whitespace collapsing, and the dummy-prefix space. The one text that
does not survive is the character U+2581 itself, which sentencepiece uses to mark spaces.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from evoformer.data.preprocess import read_documents
from evoformer.errors import UserError

# sentencepiece trains on "sentences"; lines are the natural unit for code. Longer lines are
# cut into chunks so they still count (sentencepiece silently drops over-long sentences).
_MAX_LINE_CHARS = 4096
# Lines sampled for training: the whole default corpus (about 260k lines) fits, and a larger
# corpus is sub-sampled so training stays near a minute on two cores.
_MAX_SENTENCES = 1_000_000
# Where a run folder and its checkpoints keep the tokenizer they were trained with.
SP_FILE = "tokenizer.model"
HF_DIR = "tokenizer"


def _num_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


class Tokenizer(abc.ABC):
    """What the data pipeline, ``evoformer generate`` and the run folder need of a tokenizer.

    Two kinds implement it: :class:`SentencePieceTokenizer` (a ``.model``) and
    :class:`HFTokenizer` (a HuggingFace ``tokenizer.json``, alone or in a folder with
    ``tokenizer_config.json``); :func:`load_tokenizer` picks the kind from the path. ``eod_id``
    separates documents in packed sequences: the tokenizer's eos unless overridden
    (``data.eod_id``). A tokenizer pickles as its path (and override), so DataLoader and
    multiprocessing workers reload it rather than copy it.
    """

    path: Path

    def __init__(self, path: str | Path, eod_id: int | None = None) -> None:
        self.path = Path(path)
        self._eod_override = eod_id
        self._load()
        if eod_id is not None and not 0 <= eod_id < self.vocab_size:
            raise UserError(
                f"data.eod_id={eod_id} is not a token of {self.path} "
                f"(ids are 0..{self.vocab_size - 1})"
            )
        if self.eod_id < 0:
            raise UserError(self._no_eos_message())

    @abc.abstractmethod
    def _load(self) -> None:
        """Read ``self.path``, raising a UserError naming it when it is not of this kind."""

    @abc.abstractmethod
    def _no_eos_message(self) -> str:
        """The one-line error for a tokenizer with no end-of-document token."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (ids are in [0, vocab_size))."""

    @property
    @abc.abstractmethod
    def _eos_id(self) -> int:
        """The tokenizer's own end-of-sequence id (-1: none)."""

    @property
    def eod_id(self) -> int:
        """End-of-document id: ``data.eod_id`` when given, else the tokenizer's eos."""
        return self._eos_id if self._eod_override is None else self._eod_override

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 if the tokenizer has none)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Padding id (-1 if the tokenizer has none)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos or other special tokens added)."""

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in the library's thread pool (much faster than a loop
        over :meth:`encode` for many documents)."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (lists, numpy arrays and tensors accepted)."""
        tolist = getattr(ids, "tolist", None)
        if tolist is not None:
            ids = tolist()
        return self._decode([int(i) for i in ids])

    @property
    @abc.abstractmethod
    def files(self) -> dict[str, Path]:
        """The files a run folder and its checkpoints keep a copy of: name there -> this file.
        A sentencepiece model is ``tokenizer.model``; an HF tokenizer is a ``tokenizer/`` folder
        (:data:`HF_DIR`) that :func:`load_tokenizer` reads back as the same tokenizer."""

    @property
    def _content_files(self) -> list[Path]:
        """The files whose bytes decide the token ids (what :attr:`digest` hashes)."""
        return [self.path]

    @property
    def digest(self) -> str:
        """sha256 (hex) of the tokenizer's content files, independent of where they lie (the
        ``data.eod_id`` override is not part of it)."""
        h = hashlib.sha256()
        for f in self._content_files:  # in a fixed order; names left out (copies rename them)
            data = f.read_bytes()
            h.update(f"{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"

    # DataLoader workers may be spawned: send the path and reload the tokenizer there.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "eod_id": self._eod_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state.get("eod_id"))  # type: ignore[misc]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model: its eos piece is the end of document."""

    def _load(self) -> None:
        if not self.path.is_file():
            raise UserError(f"tokenizer file {self.path} not found")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(self.path))
        except (RuntimeError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"tokenizer file {self.path} is not a sentencepiece model ({reason})"
            ) from None

    def _no_eos_message(self) -> str:
        return (
            f"tokenizer {self.path} has no end-of-sentence (eos) piece, which evoformer "
            "needs as the end-of-document token (or set data.eod_id)"
        )

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def _eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        """The unknown piece's id (-1 if the model has none)."""
        return int(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self._sp.encode(list(texts), out_type=int, num_threads=_num_threads())

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (for inspection)."""
        return self._sp.id_to_piece(int(i))

    @property
    def files(self) -> dict[str, Path]:
        return {SP_FILE: self.path}


# Special tokens that end a document, in priority order, for a tokenizer.json without a
# tokenizer_config.json naming its eos: GPT-2, Qwen (base), OLMo, Phi; Llama 3; Llama 2,
# Mistral, our sentencepiece export; Gemma; DeepSeek. Turn ends (Qwen's <|im_end|>, Llama 3's
# <|eot_id|>, Gemma's <end_of_turn>) are chat markers, not document ends, and never chosen.
DOCUMENT_END_TOKENS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)
BEGIN_TOKENS = (
    "<|begin_of_text|>",
    "<s>",
    "<bos>",
    "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
    "<|startoftext|>",
)
PAD_TOKENS = ("<pad>", "<|pad|>")
HF_JSON = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
# The files of an HF tokenizer folder that travel with it (import-hf, run folders, export-hf);
# generation_config.json carries the eos ids and sampling defaults export-hf writes back.
HF_FILES = (
    HF_JSON,
    HF_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


class HFTokenizer(Tokenizer):
    """A HuggingFace tokenizer (``tokenizer.json``), run by the ``tokenizers`` library.

    ``path`` is a ``tokenizer.json`` or a folder holding one (and usually
    ``tokenizer_config.json``). The end of document is the eos: the folder's
    ``tokenizer_config.json`` ``eos_token``; without one, the first of
    :data:`DOCUMENT_END_TOKENS` among the special tokens. ``bos_id`` and ``pad_id`` follow the
    same rule (``bos_token``/``pad_token``, else :data:`BEGIN_TOKENS`/:data:`PAD_TOKENS`).
    Ids are exactly those of ``tokenizers`` with ``add_special_tokens=False``: no template
    (e.g. Llama 3's leading ``<|begin_of_text|>``) is applied.
    """

    def _load(self) -> None:
        import tokenizers

        folder = self.path.is_dir()
        self.json_path = self.path / HF_JSON if folder else self.path
        if folder and not self.json_path.is_file():
            raise UserError(f"tokenizer folder {self.path} has no {HF_JSON}")
        if not self.json_path.is_file():
            raise UserError(f"tokenizer file {self.path} not found")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.json_path))
        except Exception as exc:  # the library raises plain Exceptions (serde messages)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "unreadable"
            raise UserError(
                f"tokenizer file {self.json_path} is not a HuggingFace tokenizer.json ({reason})"
            ) from None
        self.config_path = self.path / HF_CONFIG if folder else None
        self._config: dict[str, Any] = {}
        if self.config_path is not None and self.config_path.is_file():
            try:
                config = json.loads(self.config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{self.config_path}: invalid JSON ({exc})") from None
            if not isinstance(config, dict):
                raise UserError(f"{self.config_path}: expected a JSON object")
            self._config = config
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        self._ids = {
            "eos": self._special_id("eos_token", DOCUMENT_END_TOKENS, specials),
            "bos": self._special_id("bos_token", BEGIN_TOKENS, specials),
            "pad": self._special_id("pad_token", PAD_TOKENS, specials),
        }

    def _special_id(self, key: str, known: Sequence[str], specials: list[str]) -> int:
        """The id of tokenizer_config.json's ``key`` (a string or an AddedToken dict), else of
        the first ``known`` token among the special tokens; -1 if neither."""
        value = self._config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found = self._tok.token_to_id(value)
            if found is None:
                raise UserError(f"{self.config_path}: {key} {value!r} is not in the vocabulary")
            return found
        for token in known:
            if token in specials and (found := self._tok.token_to_id(token)) is not None:
                return found
        return -1

    def _no_eos_message(self) -> str:
        where = f"{HF_CONFIG} names no eos_token and " if self._config else ""
        return (
            f"tokenizer {self.path}: {where}none of its special tokens is a known end of "
            f"document ({', '.join(DOCUMENT_END_TOKENS[:4])}, ...); set data.eod_id "
            "(or --eod-id) to the id that separates documents"
        )

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def _eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    def token(self, i: int) -> str | None:
        """The vocabulary entry of id ``i`` (None if there is none)."""
        return self._tok.id_to_token(int(i))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        # encode_batch_fast skips the offsets (the same ids, less work); older releases lack it
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def _content_files(self) -> list[Path]:
        config = self.config_path
        return [self.json_path] + ([config] if config is not None and config.is_file() else [])

    @property
    def files(self) -> dict[str, Path]:
        if not self.path.is_dir():
            return {f"{HF_DIR}/{HF_JSON}": self.path}
        return {f"{HF_DIR}/{n}": self.path / n for n in HF_FILES if (self.path / n).is_file()}


def load_tokenizer(path: str | Path, eod_id: int | None = None) -> Tokenizer:
    """The tokenizer at ``path``: a sentencepiece ``.model``, a HuggingFace ``tokenizer.json``,
    or a folder holding one (with ``tokenizer_config.json``); a folder with only a
    ``tokenizer.model`` is that sentencepiece model. ``eod_id`` overrides the end-of-document id
    (``data.eod_id``). Anything else is a UserError naming the file."""
    p = Path(path)
    if p.is_dir():
        if not (p / HF_JSON).is_file() and (p / SP_FILE).is_file():
            return SentencePieceTokenizer(p / SP_FILE, eod_id)
        return HFTokenizer(p, eod_id)
    if not p.is_file():
        raise UserError(f"tokenizer file {p} not found")
    if p.suffix == ".json" or _starts_like_json(p):
        return HFTokenizer(p, eod_id)
    return SentencePieceTokenizer(p, eod_id)


def _starts_like_json(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(64).lstrip()[:1] == b"{"


def _texts(inputs: Iterable[str | Path]) -> Iterator[str]:
    """Documents from a mix of file paths (read with :func:`read_documents`) and texts."""
    for item in inputs:
        if isinstance(item, Path):
            yield from read_documents(item)
        else:
            yield item


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_LINE_CHARS):
                yield line[start : start + _MAX_LINE_CHARS]


def _sample(sentences: Iterable[str], k: int, seed: int) -> list[str]:
    """Reservoir sample of at most ``k`` sentences, in input order when all fit.

    Done here rather than by sentencepiece so the choice is ours and reproducible.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    for n, s in enumerate(sentences):
        if n < k:
            sample.append(s)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = s
    return sample


def train_tokenizer(
    files: Iterable[str | Path],
    out_prefix: str | Path,
    vocab_size: int,
    seed: int = 0,
) -> Path:
    """Train a byte-fallback BPE sentencepiece model; returns the path of ``<out_prefix>.model``.

    ``files`` holds :class:`~pathlib.Path` objects (text or .jsonl files, read with
    :func:`read_documents`) and/or document texts given as ``str``. The result depends only on
    the input and ``seed``. ``<out_prefix>.model`` (and a human-readable ``.vocab``) appear
    atomically, so a killed run leaves no half-written model behind.
    """
    out_prefix = Path(out_prefix)
    if out_prefix.name.endswith(".model"):
        out_prefix = out_prefix.with_name(out_prefix.name[: -len(".model")])
    sentences = _sample(_sentences(_texts(files)), _MAX_SENTENCES, seed)
    if not any(s.strip() for s in sentences):
        raise UserError("no text to train the tokenizer on: the inputs are empty")
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9999,
            # exact round trip of code: no NFKC, keep every space, no dummy leading space
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            # indentation runs become single pieces; digits are split so numbers generalise
            allow_whitespace_only_pieces=True,
            split_digits=True,
            # training sentences are lines, so "\n" never occurs in them: declare it as a piece
            user_defined_symbols=["\n"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=4 * _MAX_LINE_CHARS,
            num_threads=_num_threads(),
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if small:
            raise UserError(
                f"cannot train the tokenizer: vocab_size {small[1]} is too small, this corpus "
                f"needs at least {small[2]} (special pieces, 256 bytes and its characters)"
            ) from None
        if "Vocabulary size too high" in msg:
            msg = msg[msg.index("Vocabulary size too high") :]
            raise UserError(f"cannot train the tokenizer: {msg} (corpus too small)") from None
        raise UserError(f"tokenizer training failed: {msg}") from None
    model = buf.getvalue()
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=model)
    # escaped so the "\n" piece does not break the one-piece-per-line listing
    pieces = (sp.id_to_piece(i).replace("\n", "\\n").replace("\t", "\\t") for i in range(len(sp)))
    vocab = "".join(f"{p}\t{sp.get_score(i):g}\n" for i, p in enumerate(pieces))
    _atomic_write(out_prefix.with_name(out_prefix.name + ".vocab"), vocab.encode("utf-8"))
    return _atomic_write(out_prefix.with_name(out_prefix.name + ".model"), model)


def _atomic_write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
