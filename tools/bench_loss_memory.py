"""Peak memory of the LM loss (forward + backward) at a 128K vocabulary: plain vs chunked.

    python tools/bench_loss_memory.py [--tokens 512] [--chunks 256 1024]

Each variant runs in a fresh process (so one's peak does not hide the next's) and reports the
growth of the peak resident set over forward + backward from the rest state, in MB, and their
time (one run, first call: includes page faults, as a training step's does): the plain
path (``F.linear`` to the [N, V] logits, then ``lm_loss``) and ``fused_linear_cross_entropy``
with each chunk size (``model.loss_chunk``). fp32, one thread, d 64 (the hidden width only
sizes dH and dW; the logits dominate).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import resource, sys, time, torch, torch.nn.functional as F
from evoformer.model import lm_loss
from evoformer.parallel.fused_cross_entropy import fused_linear_cross_entropy
torch.set_num_threads(1)
N, C, V, mode = int(sys.argv[1]), 64, 128256, sys.argv[2]
g = torch.Generator().manual_seed(0)
h = torch.randn(N, C, generator=g, requires_grad=True)
w = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)
w.grad, h.grad = torch.zeros_like(w), torch.zeros_like(h)
rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
t0 = time.perf_counter()
if mode == "plain":
    lm_loss(F.linear(h, w), t).backward()
else:
    fused_linear_cross_entropy(h, w, t, chunk=int(mode))[0].backward()
seconds = time.perf_counter() - t0
hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print(int(hwm.split()[1]) * 1024 - rss, seconds)
"""


def peak_bytes(tokens: int, mode: str) -> tuple[int, float]:
    """(peak growth in bytes, seconds of the forward + backward) of one variant."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokens), mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    peak, seconds = out.stdout.split()[-2:]
    return int(peak), float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    args = ap.parse_args()
    logits_mb = args.tokens * 128256 * 4 / 1e6
    print(
        f"{args.tokens} tokens x 128256 vocabulary, fp32: the logits alone are {logits_mb:.0f} MB"
    )
    for mode in ["plain", *map(str, args.chunks)]:
        peak, seconds = peak_bytes(args.tokens, mode)
        label = "plain (full logits)" if mode == "plain" else f"loss_chunk={mode}"
        print(f"{label:>22}: peak +{peak / 1e6:.0f} MB, forward + backward {seconds:.2f} s")


if __name__ == "__main__":
    main()
