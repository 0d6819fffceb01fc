"""Preprocessing throughput against the tokenizer libraries' own batch encoding, side by side.

One run on one machine measures, on the same documents and cores:

- ``limit_sentencepiece``: sentencepiece's threaded batch encode (``encode(list, num_threads=
  cores)``) over documents already in memory, timing only the encode calls: the physical limit
  of the job for a sentencepiece model;
- ``limit_hf``: HuggingFace ``tokenizers``' ``Tokenizer.encode_batch`` (Rust, Rayon threads =
  cores) of a byte-level BPE trained here, likewise;
- ``preprocess_w1`` / ``preprocess_wN``: ``evoformer.data.preprocess`` end to end (read the
  .jsonl, parse, tokenise in 1 and N worker processes, write and fsync a sharded store) with the
  sentencepiece model, and ``preprocess_hf_wN`` with the HF model behind a small duck-typed
  wrapper (path, vocab_size, eod_id, encode_batch; pickled by path);

plus the peak memory of each preprocess run, which runs in a child process of its own: the
peak RSS of its main process, of its largest worker, and of the sum over the whole tree (sampled
every 0.5 s from outside, so the measured process runs no sampler). Throughput is compared in
tokens/s (the same tokenizer gives the same tokens on the same documents); MB/s is of input
bytes read (for the limits: UTF-8 bytes of the texts).

The input is the default corpus (the Python standard library's source), one JSON line per
file, repeated to ``--size-mb``. Usage::

    python tools/bench_preprocess.py                      # 1000 MB input (a few minutes per run)
    python tools/bench_preprocess.py --size-mb 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from evoformer.data import default_corpus_files, load_tokenizer, preprocess, train_tokenizer
from evoformer.data.preprocess import default_workers


def _texts() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in default_corpus_files()]


def write_input(path: Path, texts: list[str], size_mb: float) -> int:
    """The corpus as JSON lines, repeated until ``size_mb``; returns the bytes written."""
    lines = [(json.dumps({"text": t}) + "\n").encode() for t in texts if t]
    target, written = int(size_mb * 1e6), 0
    with open(path, "wb") as fh:
        while written < target:
            for line in lines:
                fh.write(line)
                written += len(line)
                if written >= target:
                    break
    return written


def train_hf(texts: list[str], vocab: int, out: Path) -> Path:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))
    return out


class TreeMemory:
    """Peak summed RSS of this process's children while active (cheap: /proc/PID/statm, every
    0.5 s; the measured process itself runs no sampler)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak_rss, self.peak_main, self.peak_worker = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = 0
            for p in me.children(recursive=True):
                try:
                    one = p.memory_info().rss
                    is_main = p.ppid() == me.pid
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss += one
                if is_main:
                    self.peak_main = max(self.peak_main, one)
                else:
                    self.peak_worker = max(self.peak_worker, one)
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_idle(max_busy: float, timeout: float = 180.0) -> float:
    """Wait until the machine's CPUs are at most ``max_busy`` percent busy (the machine may be
    shared: a measurement under someone else's load says little); returns the seconds waited."""
    t0 = time.perf_counter()
    while max_busy < 100 and time.perf_counter() - t0 < timeout:
        if psutil.cpu_percent(interval=2.0) <= max_busy:
            break
    return round(time.perf_counter() - t0, 1)


def one_run(spec: dict[str, Any]) -> None:
    """Child mode: one preprocess run; prints its numbers as JSON on the last line."""
    tok = load_tokenizer(spec["tokenizer"])  # a sentencepiece .model or an HF tokenizer.json
    t0 = time.perf_counter()
    store = preprocess([spec["src"]], tok, spec["out"], log=print, workers=spec["workers"])
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "stats": store.meta["stats"]}))


def run_preprocess(
    name: str, src: Path, tok_path: Path, out: Path, workers: int, hf: bool = False
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    waited = wait_idle(MAX_BUSY)
    spec = {"src": str(src), "tokenizer": str(tok_path), "out": str(out)}
    spec.update(workers=workers, hf=hf)
    with TreeMemory() as mem:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=True,
        )
    lines = proc.stdout.strip().splitlines()
    print("\n".join(f"  {line}" for line in lines[:-1]))
    got = json.loads(lines[-1])
    stats, secs = got["stats"], got["seconds"]
    result = {
        "workers": workers,
        "seconds": round(secs, 2),
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "input_mb": round(stats["input_bytes"] / 1e6, 1),
        "mb_per_s": round(stats["input_bytes"] / 1e6 / secs, 2),
        "tokens_per_s": round(stats["tokens"] / secs),
        # sampled from outside: ru_maxrss would count the forked image of this (large) process
        "peak_rss_main_mib": round(mem.peak_main / 2**20),
        "peak_rss_worker_mib": round(mem.peak_worker / 2**20),
        "peak_rss_tree_mib": round(mem.peak_rss / 2**20),
        "waited_for_idle_s": waited,
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }
    shutil.rmtree(out, ignore_errors=True)
    print(f"{name}: {result}")
    return result


def limit(name: str, encode: Any, texts: list[str], batch: int = 512) -> dict[str, Any]:
    """Time only the library's batch-encode calls over ``texts`` (already in memory)."""
    waited = wait_idle(MAX_BUSY)
    encode(texts[:8])  # warm up (thread pools)
    tokens, secs = 0, 0.0
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        t0 = time.perf_counter()
        ids = encode(chunk)
        secs += time.perf_counter() - t0
        tokens += sum(len(x) for x in ids)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    result = {
        "seconds": round(secs, 2),
        "text_mb": round(mb, 1),
        "tokens": tokens,
        "mb_per_s": round(mb / secs, 2),
        "tokens_per_s": round(tokens / secs),
        "waited_for_idle_s": waited,
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }
    print(f"{name}: {result}")
    return result


MAX_BUSY = 100.0


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        one_run(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1000, help="input size (1000)")
    ap.add_argument(
        "--w1-mb", type=float, default=None, help="1-worker input (default: size/4, >= 50)"
    )
    ap.add_argument("--limit-mb", type=float, default=100, help="text for the limits (100)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--no-hf", action="store_true", help="skip the HF tokenizers runs")
    ap.add_argument("--workdir", default=None, help="where to write the input (a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--paired",
        type=int,
        default=3,
        help="then R rounds of limit / preprocess-w1 / preprocess-wN on the same --paired-mb of "
        "documents, back to back, so each ratio is taken under the same machine load (3)",
    )
    ap.add_argument("--paired-mb", type=float, default=40, help="text per paired round (40)")
    ap.add_argument("--skip-full", action="store_true", help="only the paired rounds")
    ap.add_argument(
        "--max-busy",
        type=float,
        default=15.0,
        help="before each measurement wait until the CPUs are at most this %% busy (15; 100 = "
        "do not wait)",
    )
    args = ap.parse_args()
    global MAX_BUSY
    MAX_BUSY = args.max_busy
    w1_mb = args.w1_mb or max(50.0, args.size_mb / 4)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    texts = _texts()
    sample = texts[::5]  # tokenizer training sample: a fifth of the corpus
    print(f"training tokenizers ({args.vocab} tokens) on {len(sample)} files ...")
    sp_path = train_tokenizer(sample, work / "sp", args.vocab, seed=0)
    hf_path = train_hf(sample, args.vocab, work / "hf.json")
    big, small = work / "input.jsonl", work / "input-w1.jsonl"
    size = write_input(big, texts, args.size_mb)
    write_input(small, texts, w1_mb)
    print(f"input: {size / 1e6:.0f} MB ({big}); 1-worker input {w1_mb:.0f} MB")
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": default_workers(),
            "python": platform.python_version(),
            "sentencepiece": spm.__version__,
            "tokenizers": sys.modules["tokenizers"].__version__,
        },
        "input_mb": round(size / 1e6, 1),
        "vocab": args.vocab,
    }
    n = args.workers
    if args.paired:
        results["paired"] = paired(args, texts, work, sp_path, hf_path, n)
        print(json.dumps(results["paired"]["median"], indent=1))
    if args.skip_full:
        _finish(args, results, work)
        return
    results["preprocess_w1"] = run_preprocess("preprocess_w1", small, sp_path, work / "o", 1)
    results[f"preprocess_w{n}"] = run_preprocess(f"preprocess_w{n}", big, sp_path, work / "o", n)
    if not args.no_hf:
        results[f"preprocess_hf_w{n}"] = run_preprocess(
            f"preprocess_hf_w{n}", big, hf_path, work / "o", n, hf=True
        )
    # the limits, on the first --limit-mb of the same documents (in memory)
    docs = _docs(texts, args.limit_mb)
    proc = spm.SentencePieceProcessor(model_file=str(sp_path))
    results["limit_sentencepiece"] = limit(
        "limit_sentencepiece",
        lambda b: proc.encode(b, out_type=int, num_threads=n),
        docs,
    )
    if not args.no_hf:
        os.environ["RAYON_NUM_THREADS"] = str(n)
        raw = HFTokenizer.from_file(str(hf_path))
        results["limit_hf"] = limit(
            "limit_hf",
            lambda b: [e.ids for e in raw.encode_batch(b, add_special_tokens=False)],
            docs,
        )
    wn = results[f"preprocess_w{n}"]
    summary = {
        "vs_sentencepiece_limit": round(
            wn["tokens_per_s"] / results["limit_sentencepiece"]["tokens_per_s"], 3
        ),
        "speedup_1_to_n": round(wn["tokens_per_s"] / results["preprocess_w1"]["tokens_per_s"], 3),
        "peak_rss_tree_mib": wn["peak_rss_tree_mib"],
    }
    if not args.no_hf:
        summary["hf_vs_hf_limit"] = round(
            results[f"preprocess_hf_w{n}"]["tokens_per_s"] / results["limit_hf"]["tokens_per_s"], 3
        )
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    _finish(args, results, work)


def _finish(args: argparse.Namespace, results: dict[str, Any], work: Path) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _hf_ids(tok: HFTokenizer, batch: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]


def _docs(texts: list[str], mb: float) -> list[str]:
    """The corpus's documents, repeated, up to ``mb`` of text."""
    docs: list[str] = []
    total = 0
    while total < mb * 1e6:
        for t in texts:
            if t:
                docs.append(t)
                total += len(t)
                if total >= mb * 1e6:
                    break
    return docs


def paired(
    args: argparse.Namespace, texts: list[str], work: Path, sp_path: Path, hf_path: Path, n: int
) -> dict[str, Any]:
    """Rounds of (limit, preprocess w1, preprocess wN) on the same documents, back to back."""
    docs = _docs(texts, args.paired_mb)
    src = work / "paired.jsonl"
    with open(src, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    proc = spm.SentencePieceProcessor(model_file=str(sp_path))
    os.environ["RAYON_NUM_THREADS"] = str(n)
    raw = HFTokenizer.from_file(str(hf_path))
    global MAX_BUSY
    busy, MAX_BUSY = MAX_BUSY, 100.0  # wait once per round, then measure back to back
    rounds = []
    for r in range(args.paired):
        waited = wait_idle(busy)
        print(f"paired round {r + 1}/{args.paired} (waited {waited} s for an idle machine)")
        sp_lim = limit("  limit_sentencepiece", lambda b: proc.encode(b, num_threads=n), docs)
        w1 = run_preprocess("  preprocess_w1", src, sp_path, work / "o", 1)
        wn = run_preprocess(f"  preprocess_w{n}", src, sp_path, work / "o", n)
        row = {
            "vs_sentencepiece_limit": wn["tokens_per_s"] / sp_lim["tokens_per_s"],
            "speedup_1_to_n": wn["tokens_per_s"] / w1["tokens_per_s"],
            "limit_sp_tokens_per_s": sp_lim["tokens_per_s"],
            "w1_tokens_per_s": w1["tokens_per_s"],
            "wn_tokens_per_s": wn["tokens_per_s"],
        }
        if not args.no_hf:
            hf_lim = limit("  limit_hf", lambda b: _hf_ids(raw, b), docs)
            hfn = run_preprocess(f"  preprocess_hf_w{n}", src, hf_path, work / "o", n, hf=True)
            row["hf_vs_hf_limit"] = hfn["tokens_per_s"] / hf_lim["tokens_per_s"]
            row["limit_hf_tokens_per_s"] = hf_lim["tokens_per_s"]
            row["hf_wn_tokens_per_s"] = hfn["tokens_per_s"]
        row["loadavg_1min"] = round(os.getloadavg()[0], 2)
        rounds.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    MAX_BUSY = busy
    keys = [k for k in rounds[0] if k != "loadavg_1min"]
    median = {k: round(float(statistics.median(r[k] for r in rounds)), 3) for k in keys}
    return {"text_mb": args.paired_mb, "documents": len(docs), "rounds": rounds, "median": median}


if __name__ == "__main__":
    main()
