"""Measured per-rank memory by data-parallel backend and ZeRO stage, and by activation
checkpointing mode; writes markdown tables (the ones in docs/parallelism.md and
docs/benchmarks.md).

Model-state table: a LLaMA-style model of 7.1 M parameters (vocab 8192, d 256, 4 layers, 4 heads
/ 2 KV heads, SwiGLU 688 -- the CPU benchmark's shape), fp32, AdamW, one training step on
gloo/CPU at each dp size for ddp (stage 0), fsdp2 stages 1/2/3 and, when the DeepSpeed backend is
available (``--deepspeed``), deepspeed stages 1/2/3. The numbers are the trainer's own
``mem_*_bytes`` (``evoformer.engine.memory``) of the busiest rank (rank 0), next to the
estimate of ``evoformer plan``, the share of ddp's model state, and the parameters FSDP2 keeps
gathered between forward and backward (``mem_gathered_params_bytes``).

Activation table (``--activations``): one process, the same model, micro-batch 4 x 256 tokens,
activation checkpointing none / selective / full and full every 2nd block: the measured bytes
the forward keeps for backward, and one training step's time.

    python tools/memory_table.py [--dp 2 4] [--deepspeed] [--activations] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evoformer.config import load_config  # noqa: E402
from evoformer.model.costs import count_params  # noqa: E402
from evoformer.planning.memory import bytes_per_param, estimate  # noqa: E402

MODEL = [
    "model.vocab_size=8192",
    "model.d_model=256",
    "model.n_layers=4",
    "model.attention.n_heads=4",
    "model.attention.n_kv_heads=2",
    "model.mlp.hidden=688",
]
COMMON = [
    "data.source=synthetic",
    "train.seq_len=32",
    "train.max_steps=1",
    "train.log_every=1",
    "run.progress=off",
    "checkpoint.save_final=false",
    "optim.warmup_steps=1",
]
LAYOUTS = {
    "ddp (stage 0)": ["zero.backend=ddp", "zero.stage=0"],
    "fsdp2 stage 1": ["zero.backend=fsdp2", "zero.stage=1"],
    "fsdp2 stage 2": ["zero.backend=fsdp2", "zero.stage=2"],
    "fsdp2 stage 3": ["zero.backend=fsdp2", "zero.stage=3"],
}
DEEPSPEED = {
    f"deepspeed stage {s}": ["zero.backend=deepspeed", f"zero.stage={s}"] for s in (1, 2, 3)
}
CKPT_MODES = {
    "none": ["activation_checkpointing=none"],
    "selective": ["activation_checkpointing=selective"],
    "full every 2nd block": ["activation_checkpointing=full", "activation_checkpointing_every=2"],
    "full": ["activation_checkpointing=full"],
}


def _cfg(out_dir: str, dp: int, *overrides: str):
    batch = [f"train.global_batch_size={dp}", "train.micro_batch_size=1"]
    return load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [*MODEL, *COMMON, *batch, f"run.output_dir={out_dir}", *overrides],
    )


def _measure(rank: int, world: int, root: str, layouts: dict[str, list[str]]) -> dict:
    """Runs on every rank: one step per layout, the trainer's measured bytes (or the error)."""
    from evoformer.engine import Trainer

    out = {}
    for name, overrides in layouts.items():
        try:
            trainer = Trainer(_cfg(f"{root}/{name.replace(' ', '-')}", world, *overrides))
            trainer.train()
            s = trainer.memory.stats
            out[name] = {
                "params": s.params,
                "grads": s.grads,
                "optim": s.optim,
                "gathered": s.gathered_params,
            }
        except Exception as err:  # an optional backend that does not run here: say why
            out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def model_state_table(dps: list[int], deepspeed: bool) -> str:
    """Per-rank model state for each backend/stage and dp size, measured and estimated."""
    from evoformer.distributed.testing import run_distributed

    layouts = {**LAYOUTS, **(DEEPSPEED if deepspeed else {})}
    n = count_params(_cfg("/tmp/x", 1).model)["total"]
    lines = [
        f"Per-rank model state, measured on rank 0 (MiB; {n:,} parameters, fp32, AdamW; "
        "`mem_*_bytes` of the first step):",
        "",
        "| layout | dp | params | grads | optimizer | model state | of ddp | 1/dp | "
        "plan estimate | gathered fwd→bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    failures = []
    for dp in dps:
        with tempfile.TemporaryDirectory() as root:
            ranks = run_distributed(_measure, dp, root, layouts, timeout=600)
        base = ranks[0]["ddp (stage 0)"]
        base_total = base["params"] + base["grads"] + base["optim"]
        for name, overrides in layouts.items():
            got = ranks[0][name]
            if "error" in got:
                lines.append(f"| {name} | {dp} | n/a: {got['error']} | | | | | | | |")
                continue
            total = got["params"] + got["grads"] + got["optim"]
            est = estimate(_cfg("/tmp/x", dp, *overrides), dp).stages[0]
            share = total / base_total
            lines.append(
                f"| {name} | {dp} | {_mib(got['params'])} | {_mib(got['grads'])} | "
                f"{_mib(got['optim'])} | {_mib(total)} | {share:.3f} | {1 / dp:.3f} | "
                f"{_mib(est.model_state)} | {_mib(got['gathered'])} |"
            )
            if name.endswith("stage 3"):
                # 1/dp of the backend's own unsharded bytes per parameter: DeepSpeed keeps an
                # fp32 master copy besides the fp32 weights (4 + 4 + 4 + 8 B vs ddp's 16 B).
                want = sum(bytes_per_param(_cfg("/tmp/x", dp, *overrides))) / 16 / dp
                if abs(share - want) > 0.1 * want + 4096 / base_total:
                    failures.append(f"{name} dp={dp}: {share:.3f} of stage 0, want {want:.3f}")
            # DeepSpeed frees its full-size gradients once reduced into its partition, so what
            # it holds at the step (measured) is below the backward-time peak plan reports.
            ds = name.startswith("deepspeed")
            if not ds and abs(total - est.model_state) > 0.1 * est.model_state + 4096:
                failures.append(f"{name} dp={dp}: measured {total} B, plan {est.model_state} B")
    lines.append("")
    for f in failures:
        lines.append(f"WARNING: {f}")
    return "\n".join(lines)


def activation_table() -> str:
    """One process: activation bytes and step time per checkpointing mode."""
    import torch

    from evoformer.engine import Trainer

    torch.set_num_threads(2)
    rows = [
        "Activations kept for backward, one process, micro-batch 4 x 256 tokens, fp32 "
        "(`mem_activations_bytes`), and the step time (median of steps 2-4):",
        "",
        "| activation_checkpointing | activations (MiB) | of none | plan estimate (MiB) | "
        "step time (s) |",
        "|---|---|---|---|---|",
    ]
    base = None
    for name, overrides in CKPT_MODES.items():
        with tempfile.TemporaryDirectory() as root:
            cfg = _cfg(root, 1, *overrides)
            cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size = 256, 4, 4
            cfg.train.max_steps = 4
            times: list[float] = []
            t0 = [time.perf_counter()]

            def hook(step: int, trainer, times=times, t0=t0) -> None:
                now = time.perf_counter()
                if step > 1:
                    times.append(now - t0[0])
                t0[0] = now

            trainer = Trainer(cfg, step_hook=hook)
            trainer.train()
        act = trainer.memory.stats.activations
        base = base or act
        step = sorted(times)[len(times) // 2]
        est = estimate(cfg, 1).stages[0].activations
        rows.append(f"| {name} | {_mib(act)} | {act / base:.2f} | {_mib(est)} | {step:.3f} |")
    return "\n".join(rows + [""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="dp sizes to measure")
    parser.add_argument("--deepspeed", action="store_true", help="add DeepSpeed stages 1/2/3")
    parser.add_argument("--activations", action="store_true", help="activation table only")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args()
    text = activation_table() if args.activations else model_state_table(args.dp, args.deepspeed)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
