"""Training throughput with document masking on vs off, side by side in one run.

The CPU reference model (``configs/bench/cpu-reference.yaml``: LLaMA-style, 7.1M parameters) at
``--seq-len`` (default 2048) trains full steps -- forward, cross-entropy, backward, AdamW --
on packed windows whose documents have the lengths of a real corpus: a geometric distribution
of mean ``--mean-doc`` tokens (web text: ~500-1000), EOD tokens between them. The same windows
run with ``document_ids`` (per-document attention, positions restarting) and without (plain
causal), in alternating blocks so drifting machine load hits both alike; medians are reported.

    python tools/bench_documents.py [--seq-len 2048] [--mean-doc 600] [--repeats 5] [--json OUT]

On a GPU (``--device cuda``) the same comparison measures the per-document kernels there.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evoformer.config import load_config  # noqa: E402
from evoformer.data.dataset import document_ids_from_eod  # noqa: E402
from evoformer.engine.optim import build_optimizer  # noqa: E402
from evoformer.engine.runtime import tune_glibc_malloc  # noqa: E402
from evoformer.model import build_model, lm_loss  # noqa: E402

EOD = 2


def packed_windows(
    n: int, batch: int, seq_len: int, vocab: int, mean_doc: float, seed: int
) -> list[torch.Tensor]:
    """``n`` batches [batch, seq_len + 1] of random tokens with EODs at geometric gaps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(3, vocab, (batch, seq_len + 1), generator=g)
        # an EOD with probability 1/mean_doc at each position: geometric document lengths
        x[torch.rand(batch, seq_len + 1, generator=g) < 1.0 / mean_doc] = EOD
        out.append(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/bench/cpu-reference.yaml"))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mean-doc", type=float, default=600.0)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_glibc_malloc()  # as the trainer does on CPU: freed activations stay mapped
    cfg = load_config([args.config], [f"model.max_seq_len={args.seq_len}"])
    device = torch.device(args.device)
    model = build_model(cfg.model, device=device, seed=0)
    opt = build_optimizer(model, cfg.optim)
    data = [
        b.to(device)
        for b in packed_windows(
            4, args.batch, args.seq_len, cfg.model.vocab_size, args.mean_doc, seed=0
        )
    ]
    docs_per_window = statistics.mean(
        float((b[:, :-1] == EOD).sum(1).float().mean()) + 1 for b in data
    )

    def step(batch: torch.Tensor, masked: bool) -> None:
        x, y = batch[:, :-1], batch[:, 1:]
        ids = document_ids_from_eod(x, EOD) if masked else None
        loss = lm_loss(model(x, document_ids=ids), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def block(masked: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(data[i % len(data)], masked)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch * args.seq_len / (time.perf_counter() - t0)

    for _ in range(2):  # warm-up: the allocator's first steps are several times slower
        block(False), block(True)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.repeats):
        for masked in (r % 2 == 0, r % 2 == 1):
            rates["on" if masked else "off"].append(block(masked))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    result = {
        "what": "training tokens/s, document masking off vs on",
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "documents_per_window": round(docs_per_window, 2),
        "tokens_per_s_off": round(off, 1),
        "tokens_per_s_on": round(on, 1),
        "slowdown": round(1 - on / off, 4),
        "repeats": args.repeats,
        "steps_per_block": args.steps,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
