"""Hybrid vs all-attention on CPU: training tokens/s and activation memory against sequence
length, and decoding state against a KV cache.

Three models of the same width and depth (d 256, 4 layers, vocab 8192, SwiGLU 688, fp32):
``attention`` (4 attention layers, 4 heads / 2 KV heads), ``deltanet`` (Qwen3-Next's pattern
GGGA: three Gated DeltaNet layers with 4 value / 2 q-k heads of 64, one attention layer) and
``mamba2`` (MMMA: three Mamba-2 layers of 8 heads x 64, state 64, one attention layer). For
each sequence length one sequence is trained (forward + backward, AdamW-free: the step's cost
is the model's) ``--reps`` times after a warm-up; reported:

- tokens/s: T / the fastest step of ``--reps`` (the models take turns, rep by rep), by the wall
  clock and by the process's CPU time over ``--threads`` (what a quiet machine would take: on
  a shared one the wall clock also waits for the other jobs);
- activations: the bytes autograd saves for the backward (``saved_tensors_hooks``, each
  storage counted once), the activation memory a training step needs beyond the weights;
- decode state at 32K tokens: the bf16 KV cache of the attention layers plus the recurrent
  layers' constant state (``model.costs``), for these models and for the published presets.

The PyTorch paths run (no fla / mamba_ssm kernels on CPU); attention runs SDPA's causal
kernel, whose memory is linear in T too, so the crossover is in time, not memory.

    python tools/bench_hybrid.py [--lengths 512 1024 2048 4096 8192] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from evoformer.config import load_config  # noqa: E402
from evoformer.model import build_model  # noqa: E402
from evoformer.model.costs import count_params, kv_cache_bytes_per_token  # noqa: E402

BASE = [
    "model.vocab_size=8192",
    "model.d_model=256",
    "model.n_layers=4",
    "model.max_seq_len=32768",
    "model.attention.n_heads=4",
    "model.attention.n_kv_heads=2",
    "model.mlp.hidden=688",
]
MODELS = {
    "attention": [],
    "deltanet": [
        "model.mixer_pattern=GGGA",
        "model.deltanet.n_heads=4",
        "model.deltanet.n_key_heads=2",
        "model.deltanet.key_head_dim=64",
        "model.deltanet.value_head_dim=64",
        "model.deltanet.chunk_size=64",
    ],
    "mamba2": [
        "model.mixer_pattern=MMMA",
        "model.mamba.n_heads=8",
        "model.mamba.head_dim=64",
        "model.mamba.state_dim=64",
        "model.mamba.n_groups=1",
        "model.mamba.chunk_size=64",
    ],
}
PRESETS = ["llama3-8b", "qwen3-next-80b-a3b", "nemotron-h-8b"]


def config(name: str):
    return load_config([], [*BASE, *MODELS[name]]).model


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward of one training forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, targets=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out.loss.backward()
    return sum(n for ptr, n in seen.items() if ptr not in params)


def step_time(model, ids) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    model(ids, targets=ids).loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, result = [], {"lengths": args.lengths, "models": {}, "decode_32k": {}}
    models = {name: build_model(config(name), seed=0).train() for name in MODELS}
    for name in MODELS:
        params = count_params(config(name))["total"]
        result["models"][name] = {"params": params, "tokens_per_s": [], "activations": []}
    for T in args.lengths:
        ids = torch.randint(0, 8192, (1, T), generator=torch.Generator().manual_seed(0))
        # The models take turns rep by rep, so a load change on a shared machine hits them
        # alike; the fastest of the reps after a warm-up is kept.
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in MODELS}
        for name, model in models.items():  # the warm-up step also counts saved bytes
            result["models"][name]["activations"].append(saved_bytes(model, ids))
        for _ in range(args.reps):
            for name, model in models.items():
                times[name].append(step_time(model, ids))
        for name in MODELS:
            per = result["models"][name]
            wall = min(w for w, _ in times[name])
            cpu = min(c for _, c in times[name])
            per["tokens_per_s"].append(T / wall)
            # On a machine shared with other jobs the wall clock waits for them; the process's
            # own CPU time over the threads it runs is what a quiet machine would take.
            per.setdefault("tokens_per_cpu_s", []).append(T * args.threads / cpu)
            print(
                f"{name:9} T={T:5}: {per['tokens_per_s'][-1]:8.0f} tok/s wall, "
                f"{per['tokens_per_cpu_s'][-1]:8.0f} tok/s by CPU time, "
                f"activations {per['activations'][-1] / 2**20:7.1f} MiB",
                flush=True,
            )
    for name in [*MODELS, *PRESETS]:
        cfg = (
            config(name)
            if name in MODELS
            else load_config([str(REPO / f"configs/models/{name}.yaml")]).model
        )
        kv = kv_cache_bytes_per_token(cfg, dtype_bytes=2, context_len=32_768)
        result["decode_32k"][name] = {
            "kv_cache": kv["at_context"] - kv["state"],
            "state": kv["state"],
            "total": kv["at_context"],
        }
        rows.append(
            f"{name:20} KV {(kv['at_context'] - kv['state']) / 2**20:10.1f} MiB + state "
            f"{kv['state'] / 2**20:8.1f} MiB = {kv['at_context'] / 2**20:10.1f} MiB at 32K"
        )
    print("\n".join(rows))
    result["host"] = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
