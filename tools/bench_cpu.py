"""CPU training throughput: evoformer vs HuggingFace ``LlamaForCausalLM``, side by side.

Both models have the identical shape and start from identical weights (ours, converted with the
HF exporter's weight mapping); both see the same synthetic batches and run the same full step:
forward, fp32 cross-entropy (each framework's own), backward, global grad-norm clip, AdamW step
(the trainer's ``build_optimizer`` for both), zero_grad. Blocks of
``--steps`` steps alternate between the two (the order flips every repeat) so drifting machine
load hits both alike; the medians over ``--repeats`` blocks are reported.

FLOP accounting (model FLOPs, not hardware FLOPs): 6 * N * tokens for the weight matmuls, where N
counts every parameter except the input embedding table (a lookup; the untied LM head is a
matmul and is counted), plus causal attention counted once: QK^T and AV over the lower triangle,
2 * T * d_attn FLOPs per token per layer forward, times 3 for forward + backward. Norms,
activations, softmax and the optimizer are not counted. The rate is compared with the measured
fp32 rate of a large square matmul on the same threads.

    python tools/bench_cpu.py [--repeats N] [--steps N] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evoformer.checkpoint.hf import FAMILIES, hf_config_for, hf_state_dict  # noqa: E402
from evoformer.config import Config, load_config  # noqa: E402
from evoformer.engine.optim import build_optimizer, param_groups  # noqa: E402
from evoformer.engine.runtime import tune_glibc_malloc  # noqa: E402
from evoformer.engine.throughput import measured_matmul_peak  # noqa: E402
from evoformer.model import build_model, lm_loss  # noqa: E402

DEFAULT_CONFIG = REPO / "configs/bench/cpu-reference.yaml"


def matmul_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n @ n x n matmul (the machine's practical peak)."""
    torch.set_num_threads(threads)
    return measured_matmul_peak(n, reps) / 1e9


def model_flops_per_token(cfg: Config, n_nonembed: int) -> float:
    """Training FLOPs per token: weight matmuls + causal attention (see the module docstring)."""
    m, t = cfg.model, cfg.train.seq_len
    d_attn = m.attention.n_heads * m.head_dim
    attention_fwd = 2 * t * d_attn * m.n_layers  # QK^T + AV, lower triangle only
    return 6 * n_nonembed + 3 * attention_fwd


def make_optimizer(model: torch.nn.Module, cfg: Config, impl: str) -> torch.optim.Optimizer:
    """The trainer's AdamW (its parameter groups and hyper-parameters) for either model;
    ``impl`` forces torch's foreach / for-loop / fused kernels, ``default`` keeps the trainer's."""
    if impl == "default":
        return build_optimizer(model, cfg.optim)
    o = cfg.optim
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        **kwargs,
    )


def build_pair(cfg: Config):
    """Our model and an HF LlamaForCausalLM of the identical shape, with identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = build_model(cfg.model, seed=cfg.run.seed).train()
    family = FAMILIES["llama"]
    hf_cfg = LlamaConfig(**hf_config_for(family, cfg.model), use_cache=False)
    hf_cfg._attn_implementation = "sdpa"  # HF's fastest CPU attention
    hf = LlamaForCausalLM(hf_cfg).train()
    hf.load_state_dict(hf_state_dict(family, ours), strict=True)
    n_ours = ours.num_params()
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise SystemExit(f"parameter counts differ: evoformer {n_ours:,}, HF {n_hf:,}")
    return ours, hf


def batches(cfg: Config, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` synthetic (inputs, targets) batches of shape [micro_batch, seq_len]."""
    g = torch.Generator().manual_seed(seed)
    b, t, v = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(0, v, (b, t + 1), generator=g)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def make_step(model, loss_fn: Callable, opt: torch.optim.Optimizer, clip: float) -> Callable:
    """One full training step: forward + fp32 loss, backward, clip, AdamW, zero_grad."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _cycle(items: list) -> Iterator:
    while True:
        yield from items


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    malloc_tuned = tune_glibc_malloc() if args.tune_malloc else False
    cfg = load_config([args.config])
    load_before = os.getloadavg()
    peak = matmul_gflops(args.threads)

    ours, hf = build_pair(cfg)
    clip = cfg.optim.grad_clip
    # Each framework computes its own fp32 loss: ours lm_loss, HF its ForCausalLMLoss (given
    # pre-shifted labels, so both average over the same 256 targets per sequence).
    step_ours = make_step(
        ours, lambda x, y: lm_loss(ours(x), y), make_optimizer(ours, cfg, args.optimizer), clip
    )
    step_hf = make_step(
        hf,
        lambda x, y: hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss,
        make_optimizer(hf, cfg, args.optimizer),
        clip,
    )
    steps = {"evoformer": step_ours, "hf": step_hf}

    data = batches(cfg, 4, seed=cfg.run.seed)
    feeds = {name: _cycle(data) for name in steps}
    # Same weights + same batch => the same first loss (a check that the race is fair).
    first = {name: step(*next(feeds[name])) for name, step in steps.items()}
    for _ in range(args.warmup - 1):
        for name, step in steps.items():
            step(*next(feeds[name]))

    tokens = args.steps * cfg.train.micro_batch_size * cfg.train.seq_len
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in list(steps)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name](*next(feeds[name]))
            rates[name].append(tokens / (time.perf_counter() - t0))

    n_nonembed = ours.num_params(exclude_embeddings=True)
    flops_tok = model_flops_per_token(cfg, n_nonembed)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "params": ours.num_params(),
        "params_non_embedding": n_nonembed,
        "model_flops_per_token": flops_tok,
        "matmul_gflops": peak,
        "optimizer_impl": args.optimizer,
        "malloc_tuned": malloc_tuned,
        "steps_per_block": args.steps,
        "repeats": args.repeats,
        "tokens_per_step": cfg.train.micro_batch_size * cfg.train.seq_len,
        "first_loss": first,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
    }
    for name, rs in rates.items():
        med = statistics.median(rs)
        result[name] = {
            "tokens_per_s": med,
            "tokens_per_s_all": rs,
            "model_gflops": med * flops_tok / 1e9,
            "pct_of_matmul": 100 * med * flops_tok / 1e9 / peak,
        }
    result["ratio_evoformer_over_hf"] = (
        result["evoformer"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    )
    return result


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def markdown(r: dict) -> str:
    """The result as the markdown table kept in docs/benchmarks.md."""
    rows = [
        "| model | tokens/s (median) | min-max | model GFLOP/s | % of matmul rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("evoformer", "evoformer"), ("hf", "HF LlamaForCausalLM (sdpa)")):
        x = r[name]
        lo, hi = min(x["tokens_per_s_all"]), max(x["tokens_per_s_all"])
        rows.append(
            f"| {label} | {x['tokens_per_s']:,.0f} | {lo:,.0f}-{hi:,.0f} | "
            f"{x['model_gflops']:.1f} | {x['pct_of_matmul']:.1f} % |"
        )
    la, lb = r["load_avg_before"], r["load_avg_after"]
    rows += [
        "",
        f"- ratio evoformer / HF: **{r['ratio_evoformer_over_hf']:.3f}**",
        f"- fp32 matmul rate (2048^3, {r['threads']} threads): {r['matmul_gflops']:.1f} GFLOP/s",
        f"- parameters: {r['params']:,} ({r['params_non_embedding']:,} non-embedding); "
        f"model FLOPs/token {r['model_flops_per_token'] / 1e6:.2f} M",
        f"- {r['repeats']} repeats x {r['steps_per_block']} steps x {r['tokens_per_step']} tokens "
        f"per model; AdamW implementation: {r['optimizer_impl']}; "
        f"glibc malloc tuned: {'yes' if r['malloc_tuned'] else 'no'}",
        f"- first-step loss: evoformer {r['first_loss']['evoformer']:.6f}, "
        f"HF {r['first_loss']['hf']:.6f}",
        f"- load average before / after: {la[0]:.2f} / {lb[0]:.2f} (1-min)",
        f"- {r['cpu']}, torch {r['torch']}, Python {r['python']}, {r['date']}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="benchmark config YAML")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per model")
    p.add_argument("--steps", type=int, default=4, help="training steps per timed block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--optimizer",
        default="default",
        choices=["default", "foreach", "for-loop", "fused"],
        help="AdamW kernels for both models (default: the trainer's build_optimizer)",
    )
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="reuse freed memory instead of re-mmapping it (see tune_glibc_malloc)",
    )
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    if min(args.repeats, args.steps, args.warmup, args.threads) < 1:
        p.error("--repeats, --steps, --warmup and --threads must be >= 1")
    result = run(args)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
