"""What attention sinks cost: one attention layer's forward + backward with and without sinks.

The sink path (``model/sinks.py``) runs SDPA with one extra zero key and an additive bias of
H x T x (T + 1) where the plain causal path builds no mask; this times both on the same inputs,
interleaved round by round (the median of ``--rounds``), for a few sequence lengths, plus the
sink path under document masking (two documents per row).

    python tools/bench_sinks.py [--threads 2] [--seq 256 1024] [--rounds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from evoformer.config.schema import ModelConfig  # noqa: E402
from evoformer.model.attention import build_attention  # noqa: E402
from evoformer.model.layout import layer_spec  # noqa: E402
from evoformer.model.positions import RotaryEmbedding  # noqa: E402


def _layer(sinks: bool, d: int, heads: int, kv: int):
    cfg = ModelConfig(d_model=d)
    cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.attention.sinks = heads, kv, sinks
    attn = build_attention(cfg, layer_spec(cfg, 0))
    torch.manual_seed(0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    rope = RotaryEmbedding(cfg.head_dim, 4096, cfg.position)
    rope.reset_parameters()
    return attn, rope


def _time(attn, x, rope_T, docs) -> float:
    start = time.perf_counter()
    out = attn(x, rope_T, None, docs)
    out.square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from evoformer.model.documents import Documents

    plain, rope = _layer(False, args.d_model, args.heads, args.kv_heads)
    sink, _ = _layer(True, args.d_model, args.heads, args.kv_heads)
    rows = []
    for T in args.seq:
        x = torch.randn(args.batch, T, args.d_model, generator=torch.Generator().manual_seed(1))
        ids = torch.zeros(args.batch, T, dtype=torch.long)
        ids[:, T // 3 :] = 1
        cases = {
            "plain": (plain, None),
            "sinks": (sink, None),
            "plain+docs": (plain, ids),
            "sinks+docs": (sink, ids),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (layer, doc_ids) in cases.items():
                docs = Documents(doc_ids) if doc_ids is not None else None
                rope_T = rope(torch.arange(T)) if docs is None else rope(docs.positions)
                t = _time(layer, x, rope_T, docs)
                if r:
                    times[name].append(t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append({"T": T, **{f"{k}_ms": round(v, 2) for k, v in med.items()}})
        print(
            f"T={T}: plain {med['plain']:.1f} ms, sinks {med['sinks']:.1f} ms "
            f"({med['sinks'] / med['plain']:.2f}x); with documents: plain "
            f"{med['plain+docs']:.1f} ms, sinks {med['sinks+docs']:.1f} ms "
            f"({med['sinks+docs'] / med['plain+docs']:.2f}x)"
        )
    result = {
        "what": "one attention layer, forward + backward, fp32",
        "shape": vars(args) | {"json": None},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
