"""The sentencepiece tokenizer: loading one, and training a byte-fallback BPE one for code.

The trained tokenizer round-trips text exactly (indentation, tabs, blank lines, trailing spaces,
any unicode through byte fallback). Two sentencepiece defaults would break that and are turned
off: NFKC normalisation with whitespace collapsing, and the dummy-prefix space. The one text that
does not survive is the character U+2581 itself, which sentencepiece uses to mark spaces.
"""

from __future__ import annotations

import io
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


def _num_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


class Tokenizer:
    """A sentencepiece model: text <-> token ids, plus the special ids the data pipeline needs.

    ``eod_id`` (the sentencepiece eos piece) separates documents in packed sequences.
    """

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
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
        if self._sp.eos_id() < 0:
            raise UserError(
                f"tokenizer {self.path} has no end-of-sentence (eos) piece, which evoformer "
                "needs as the end-of-document token"
            )

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are in [0, vocab_size))."""
        return int(self._sp.get_piece_size())

    @property
    def eod_id(self) -> int:
        """End-of-document id (sentencepiece's eos)."""
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        """Beginning-of-sentence id (-1 if the model has none)."""
        return int(self._sp.bos_id())

    @property
    def pad_id(self) -> int:
        """Padding id (-1 if the model has none)."""
        return int(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded by sentencepiece's thread pool (much faster than a loop
        over :meth:`encode` for many documents)."""
        if not texts:
            return []
        return self._sp.encode(list(texts), out_type=int, num_threads=_num_threads())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (lists, numpy arrays and tensors accepted)."""
        tolist = getattr(ids, "tolist", None)
        if tolist is not None:
            ids = tolist()
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (for inspection)."""
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    # DataLoader workers may be spawned: send the path and reload the model there.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


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
