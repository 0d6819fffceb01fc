"""GPU throughput side by side: evoformer and torchtitan's Llama-3 on one GPU, in one run.

    python tools/bench_gpu.py --out bench_gpu.json      # one GPU, ~8 minutes, installs nothing
    python tools/bench_gpu.py --cpu-smoke --out x.json  # every case at tiny sizes on CPU, seconds

Cases (run in priority order: bf16 pair at 8192, FP8 tensorwise, MoE, the bf16 pair at 2048,
TE, FP8 rowwise, torchtitan FP8, whole-model compile, CUDA graphs; ``--budget-s`` skips a case
when the slowest one so far would no longer fit, recorded as skipped; a rerun finds inductor's
caches warm and gets further):

1. Llama-3-8B width (d 4096, 32 heads / 8 KV, SwiGLU 14336, vocab 128256), as many layers as
   fit (``--layers``; default: evoformer's memory estimate against the free GPU memory), bf16,
   seq 8192 and 2048 (8192 tokens per micro-batch): evoformer through its own ``Trainer``
   (``train.compile``, ``model.loss_chunk``) and torchtitan 0.3.0's ``Llama3Model`` (vendored
   wheel, its blocks compiled as torchtitan does, causal SDPA = cuDNN/flash) in the script's
   own loop; the same training setup for both (bf16 autocast over fp32 master weights, fused
   AdamW, grad clip 1.0, one optimizer step per micro-batch);
2. FP8 at seq 8192: torchao tensorwise and rowwise (first/last block bf16, evoformer's default),
   torchtitan + torchao tensorwise, Transformer Engine when it imports (``model.backend=te``);
3. an MoE shape: DeepSeek-V3's expert width (2048) at d 2048, 64 routed experts top-6 + 1 shared,
   seq 4096, MFU from active FLOPs;
4. evoformer bf16 at seq 8192 with the whole model compiled (``train.compile_scope=model``)
   instead of each block, and with CUDA graphs of the compiled blocks
   (``train.compile_mode=reduce-overhead``).

Every case reports tokens/s, TFLOP/s per GPU and MFU from one FLOP count written here (weight
matmuls of the active parameters + causal attention, x3 for the backward, no recompute; the
same count for both frameworks; torchtitan's own count, which takes attention as non-causal, is
reported beside it). For evoformer cases the trainer's own ``metrics.jsonl`` line (``mfu``,
``tflops_per_device``, ``tokens_per_s``) is checked against the script's figure: the same
FLOPs per token, and the rate within ``AGREE_TOL``. The JSON holds the environment (GPU, torch,
torchao, TE, torchtitan versions), every case, the ratios the issue asks for, and the goals met.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import json
import re
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
VENDOR = Path(__file__).resolve().parent / "vendor"
AGREE_TOL = 0.05  # trainer's tokens/s within 5 % of the script's clock (GPU)
# CPU smoke: ~20 ms steps on a shared CPU, where one context switch during the trainer's
# logging moves a step by half; only a sanity bound (a wrong unit or window is off by >= 16x).
AGREE_TOL_CPU = 2.0


@dataclasses.dataclass
class Shape:
    """A decoder's widths; ``experts`` > 0 makes every layer an MoE layer."""

    d: int
    heads: int
    kv: int
    hidden: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    expert_hidden: int = 0
    shared: int = 0


LLAMA3_8B_WIDTH = Shape(4096, 32, 8, 14336, 128256)
MOE = Shape(2048, 16, 16, 2048, 128256, experts=64, top_k=6, expert_hidden=2048, shared=1)
SMOKE_DENSE = Shape(64, 4, 2, 176, 512)
SMOKE_MOE = Shape(64, 4, 4, 64, 512, experts=8, top_k=2, expert_hidden=32, shared=1)


def flops_per_token(s: Shape, layers: int, seq: int) -> float:
    """Training FLOPs per token: 3 x forward; forward = 2 x (active weight-matmul parameters)
    + causal attention (QK^T and PV over (T + 1) / 2 keys on average). Written independently
    of ``evoformer.model.costs`` so the trainer's figure is checked, not echoed."""
    hd = s.d // s.heads
    attn_w = s.d * s.heads * hd + 2 * s.d * s.kv * hd + s.heads * hd * s.d
    if s.experts:
        mlp_w = (s.top_k + s.shared) * 3 * s.d * s.expert_hidden + s.d * s.experts  # + router
    else:
        mlp_w = 3 * s.d * s.hidden
    matmul = 2 * (layers * (attn_w + mlp_w) + s.d * s.vocab)
    attention = layers * 2 * s.heads * (2 * hd) * (seq + 1) / 2
    return 3 * (matmul + attention)


# ---------------------------------------------------------------------------------------------
# the environment


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "vendored": sorted(w.name for w in VENDOR.glob("*.whl")),  # torchtitan and its deps
    }
    for name in ("torchao", "transformer_engine"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 -- absent or broken: say which
            env[name] = f"unavailable ({type(e).__name__})"
    return env


def peak_flops(device: torch.device, fp8: bool) -> float:
    """Dense peak FLOP/s of this GPU (bf16, or fp8), or the measured fp32 rate on CPU."""
    from evoformer.engine.throughput import device_peak

    return device_peak(device, "bf16", fp8, None)[0] or float("nan")


def free_memory(device: torch.device) -> float:
    if device.type != "cuda":
        return float("inf")
    return float(torch.cuda.mem_get_info(device)[0])


def release() -> None:
    """Free the previous case's model, optimizer and compiled graphs."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------
# evoformer, through its trainer


def evoformer_overrides(s: Shape, layers: int, seq: int, mb: int, steps: int, out: Path):
    ov = [
        f"model.vocab_size={s.vocab}",
        f"model.d_model={s.d}",
        f"model.n_layers={layers}",
        f"model.max_seq_len={seq}",
        f"model.attention.n_heads={s.heads}",
        f"model.attention.n_kv_heads={s.kv}",
        f"model.mlp.hidden={s.hidden}",
        "data.source=synthetic",
        f"train.seq_len={seq}",
        f"train.micro_batch_size={mb}",
        f"train.global_batch_size={mb}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "optim.warmup_steps=1",
        "run.progress=off",
        "checkpoint.save_final=false",
        f"run.output_dir={out}",
    ]
    if s.experts:
        ov += [
            f"model.moe.num_experts={s.experts}",
            f"model.moe.top_k={s.top_k}",
            f"model.moe.expert_hidden={s.expert_hidden}",
            f"model.moe.num_shared_experts={s.shared}",
            "model.moe.score=sigmoid",
            "model.moe.routed_scaling=2.5",
        ]
    return ov


def fitting_layers(s: Shape, seq: int, mb: int, extra: list[str], device, cap: int) -> int:
    """Most layers (<= cap) whose evoformer memory estimate fits 85 % of the free memory."""
    from evoformer.config import load_config
    from evoformer.planning.memory import estimate

    free = 0.85 * free_memory(device)
    best = 1
    for n in range(1, cap + 1):
        ov = evoformer_overrides(s, n, seq, mb, 1, Path(tempfile.gettempdir())) + extra
        cfg = load_config([str(REPO / "configs/models/llama3-8b.yaml")], ov)
        if estimate(cfg, 1).worst.total > free:
            break
        best = n
    return best


def run_evoformer(name, s: Shape, layers, seq, mb, extra, warmup, steps, device, out: Path):
    from evoformer.config import load_config
    from evoformer.engine import Trainer

    run_dir = out / name
    ov = evoformer_overrides(s, layers, seq, mb, warmup + steps, run_dir) + extra
    ov.append(f"run.device={device.type}")
    cfg = load_config([str(REPO / "configs/models/llama3-8b.yaml")], ov)
    stamps: list[float] = []

    def hook(step: int, trainer) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = Trainer(cfg, step_hook=hook)
    trainer.train()
    tokens = mb * seq
    rate = tokens * steps / (stamps[-1] - stamps[warmup - 1])
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl") if '"loss"' in x]
    late = [r for r in rows if r["step"] > warmup]
    flops = flops_per_token(s, layers, seq)
    fp8 = cfg.fp8.enabled
    result = _figures(name, "evoformer", rate, flops, device, fp8, layers, seq, mb)
    result["first_loss"] = rows[0]["loss"]
    tol = AGREE_TOL if device.type == "cuda" else AGREE_TOL_CPU
    # The trainer logs each step's rate; over the same steps as the script's clock that is the
    # tokens over the summed step times (and the time-weighted mean of its mfu lines).
    step_s = [r["tokens_per_s"] and tokens / r["tokens_per_s"] for r in late]
    trainer_rate = tokens * len(late) / sum(step_s)
    trainer_tflops = sum(r["tflops_per_device"] * t for r, t in zip(late, step_s)) / sum(step_s)
    trainer_mfu = None
    if "mfu" in late[0]:
        trainer_mfu = sum(r["mfu"] * t for r, t in zip(late, step_s)) / sum(step_s)
    script_mfu_trainer_peak = rate * flops / trainer.peak_flops if trainer.peak_flops else None
    result["trainer"] = {
        "tokens_per_s": trainer_rate,
        "tflops_per_device": trainer_tflops,
        "mfu": trainer_mfu,
        "flops_per_token": trainer.flops_per_token,
        "peak_tflops": (trainer.peak_flops or 0) / 1e12,
        "script_mfu_at_trainer_peak": script_mfu_trainer_peak,
        "flops_agree": abs(trainer.flops_per_token - flops) <= 1e-9 * flops,
        "rate_agree": 1 / (1 + tol) <= trainer_rate / rate <= 1 + tol,
        "tolerance": tol,
    }
    result["wall_s"] = time.perf_counter() - t0
    result["first_steps_s"] = stamps[warmup - 1] - t0  # build, compile, warm-up steps
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del trainer
    return result


def _figures(name, impl, rate, flops, device, fp8, layers, seq, mb) -> dict:
    tflops = rate * flops / 1e12
    peak = peak_flops(device, fp8=False)
    out = {
        "name": name,
        "impl": impl,
        "layers": layers,
        "seq_len": seq,
        "micro_batch": mb,
        "tokens_per_s": rate,
        "flops_per_token": flops,
        "tflops_per_device": tflops,
        "mfu": tflops * 1e12 / peak,  # against the bf16 (CPU: measured fp32) peak
    }
    if fp8 and device.type == "cuda":
        out["mfu_fp8_peak"] = tflops * 1e12 / peak_flops(device, fp8=True)
    return out


# ---------------------------------------------------------------------------------------------
# torchtitan, from the vendored wheel


def load_torchtitan():
    """Import torchtitan 0.3.0 from ``tools/vendor`` without installing anything: the wheels
    (torchtitan and the three pure-Python packages it imports at start-up) are unpacked into a
    cache folder on ``sys.path`` (zipimport cannot read torchtitan's namespace subpackages).
    Its expert-parallel Triton kernels module (imported at start-up by its MoE code), which a
    dense Llama never calls and which needs a recent triton (none on CPU), is replaced by one
    that raises when used."""
    cache = Path(tempfile.gettempdir()) / "evoformer-bench-vendor"
    for wheel in sorted(VENDOR.glob("*.whl")):
        target = cache / wheel.stem
        if not (target / ".done").exists():
            with zipfile.ZipFile(wheel) as z:
                z.extractall(target)
            (target / ".done").touch()
        if str(target) not in sys.path:
            sys.path.insert(0, str(target))
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    stub = types.ModuleType(name)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr} needs triton")

        return unavailable

    stub.__getattr__ = missing  # type: ignore[method-assign]
    sys.modules[name] = stub
    import torchtitan.models.llama3 as llama3  # pyright: ignore[reportMissingImports]

    return llama3


def build_torchtitan(s: Shape, layers: int, seq: int, device: torch.device):
    """torchtitan's Llama-3 at shape ``s`` (its own builders and init), attention through its
    causal SDPA module (cuDNN / flash on GPU, the same kernels evoformer's SDPA path uses)."""
    L = load_torchtitan()
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm  # pyright: ignore[reportMissingImports]
    from torchtitan.models.common.attention import ScaledDotProductAttention  # pyright: ignore[reportMissingImports]

    blocks = L._build_llama3_layers(
        n_layers=layers,
        dim=s.d,
        n_heads=s.heads,
        n_kv_heads=s.kv,
        hidden_dim=s.hidden,
        rope=ComplexRoPE.Config(dim=s.d // s.heads, max_seq_len=seq, theta=500000, scaling="llama"),
        attn_backend="flex",
    )
    for block in blocks:
        block.attention.inner_attention = ScaledDotProductAttention.Config()
    cfg = L.Llama3Model.Config(
        dim=s.d,
        vocab_size=s.vocab,
        tok_embeddings=Embedding.Config(
            num_embeddings=s.vocab, embedding_dim=s.d, param_init=L._EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=s.d, param_init=L._NORM_INIT),
        lm_head=Linear.Config(
            in_features=s.d, out_features=s.vocab, param_init=L._output_linear_init(s.d)
        ),
        layers=blocks,
    )
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device=device)
    torch.manual_seed(0)  # its init draws from the global generator
    with torch.no_grad():
        model.init_states(buffer_device=device)
    return model, cfg


def run_torchtitan(name, s, layers, seq, mb, fp8, compile_blocks, warmup, steps, device):
    t0 = time.perf_counter()
    load_torchtitan()
    from torchtitan.models.utils import get_dense_model_nparams_and_flops  # pyright: ignore[reportMissingImports]

    model, cfg = build_torchtitan(s, layers, seq, device)
    if fp8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model,
            config=Float8LinearConfig.from_recipe_name(fp8),
            module_filter_fn=lambda m, fqn: fqn != "lm_head",  # as torchtitan's converter
        )
    if compile_blocks:  # torchtitan's apply_compile: each block in one graph, then the loss
        for block in model.layers.values():
            block.compile(fullgraph=True)
    loss_fn = torch.compile(_titan_loss) if compile_blocks else _titan_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, s.vocab, (mb, seq + 1), generator=g).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    stamps, losses = [], []
    # torchtitan's apply_compile sets this dynamo flag; scoped here to its own run
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for _ in range(warmup + steps):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(inputs)
            loss = loss_fn(logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            stamps.append(time.perf_counter())
            if not losses:
                losses.append(loss.item())
    rate = mb * seq * steps / (stamps[-1] - stamps[warmup - 1])
    flops = flops_per_token(s, layers, seq)
    result = _figures(name, "torchtitan", rate, flops, device, bool(fp8), layers, seq, mb)
    _, titan_flops = get_dense_model_nparams_and_flops(
        model,
        n_layers=layers,
        n_heads=s.heads,
        head_dims=2 * (s.d // s.heads),
        seq_len=seq,
        enable_weight_tying=False,
    )
    result["first_loss"] = losses[0]
    result["torchtitan_own_flops_per_token"] = titan_flops  # non-causal attention
    result["torchtitan_own_mfu"] = rate * titan_flops / peak_flops(device, fp8=False)
    result["wall_s"] = time.perf_counter() - t0
    result["first_steps_s"] = stamps[warmup - 1] - t0
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del model, opt, cfg
    return result


def _titan_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # torchtitan's cross_entropy_loss: fp32 logits, mean over tokens
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


# ---------------------------------------------------------------------------------------------
# the plan


def cases(smoke: bool, device, layers_arg: int | None, cap: int) -> list[dict]:
    """The measurements in priority order (each a dict of run_* arguments): the side-by-side
    bf16 pair at the long sequence, FP8, MoE, then the short sequence and the rest."""
    dense = SMOKE_DENSE if smoke else LLAMA3_8B_WIDTH
    moe = SMOKE_MOE if smoke else MOE
    long, short = (32, 16) if smoke else (8192, 2048)
    compile_on = not smoke  # inductor on a 2-core CPU would take minutes
    evo = [
        f"train.compile={str(compile_on).lower()}",
        f"model.loss_chunk={16 if smoke else 2048}",
        "precision=bf16",
    ]
    if layers_arg:
        n = layers_arg
    elif smoke:
        n = 3  # FP8 keeps the first and last blocks in bf16: leave one in FP8
    else:
        n = fitting_layers(dense, long, 1, evo, device, cap)
    moe_seq = 16 if smoke else 4096
    moe_n = layers_arg or (2 if smoke else fitting_layers(moe, moe_seq, 2, evo, device, cap))
    ao = ["fp8.enabled=true", "fp8.backend=torchao"]
    te = ["model.backend=te", "fp8.enabled=true", "fp8.backend=te", "fp8.recipe=tensorwise"]

    def evo_case(name: str, extra: list[str], seq: int = long, s: Shape = dense, layers=n):
        mb = long // seq if s is dense else 2
        return dict(kind="evo", name=name, s=s, layers=layers, seq=seq, mb=mb, extra=evo + extra)

    def titan_case(name: str, fp8: str | None, seq: int = long):
        return dict(
            kind="titan",
            name=name,
            s=dense,
            layers=n,
            seq=seq,
            mb=long // seq,
            fp8=fp8,
            compile_blocks=compile_on,
        )

    plan = [
        evo_case(f"evoformer_bf16_T{long}", []),
        titan_case(f"torchtitan_bf16_T{long}", None),
        evo_case(f"evoformer_fp8_tensorwise_T{long}", ao + ["fp8.recipe=tensorwise"]),
        evo_case(f"evoformer_moe_bf16_T{moe_seq}", [], seq=moe_seq, s=moe, layers=moe_n),
        evo_case(f"evoformer_bf16_T{short}", [], seq=short),
        titan_case(f"torchtitan_bf16_T{short}", None, seq=short),
    ]
    if _has_te():
        plan.append(evo_case(f"evoformer_fp8_te_T{long}", te))
    plan += [
        evo_case(f"evoformer_fp8_rowwise_T{long}", ao + ["fp8.recipe=rowwise"]),
        titan_case(f"torchtitan_fp8_tensorwise_T{long}", "tensorwise"),
        # Whole-model compile (one graph incl. head and chunked loss) against per-block
        # compile: last, since its compile time grows with the layers.
        evo_case(f"evoformer_bf16_T{long}_compile_model", ["train.compile_scope=model"]),
        # CUDA graphs of the compiled blocks: do they pay at this size?
        evo_case(f"evoformer_bf16_T{long}_cudagraphs", ["train.compile_mode=reduce-overhead"]),
    ]
    return plan


def _has_te() -> bool:
    with contextlib.suppress(Exception):
        importlib.import_module("transformer_engine.pytorch")
        return torch.cuda.is_available()
    return False


def summary(results: list[dict]) -> dict:
    """The ratios and goals of issue 19 from the measured cases (the bf16 ones: the
    ``evoformer_bf16_T<seq>`` cases with per-block compile; variants are compared to them)."""
    by = {r["name"]: r for r in results if "tokens_per_s" in r}
    out: dict = {"ratios": {}, "goals": {}}
    plain = {
        int(m[1]): r for k, r in by.items() if (m := re.fullmatch(r"evoformer_bf16_T(\d+)", k))
    }
    for seq, r in plain.items():
        titan = by.get(f"torchtitan_bf16_T{seq}")
        if titan:
            ratio = r["tokens_per_s"] / titan["tokens_per_s"]
            out["ratios"][f"evoformer_vs_torchtitan_bf16_T{seq}"] = ratio
            out["goals"][f"ahead_1.1x_torchtitan_T{seq}"] = ratio >= 1.1
        out["goals"][f"mfu_50pct_bf16_T{seq}"] = r["mfu"] >= 0.5
    for key, r in by.items():
        base = plain.get(r["seq_len"])
        if key.startswith("evoformer_fp8") and base:
            ratio = r["tflops_per_device"] / base["tflops_per_device"]
            out["ratios"][f"{key}_vs_bf16"] = ratio
            out["goals"][f"{key}_1.3x_bf16"] = ratio >= 1.3
        elif key.startswith("evoformer_bf16_T") and base is not None and r is not base:
            # the variants (whole-model compile, CUDA graphs) against per-block compile
            out["ratios"][f"{key}_vs_blocks"] = r["tokens_per_s"] / base["tokens_per_s"]
    agree = [
        r["trainer"]["flops_agree"] and r["trainer"]["rate_agree"]
        for r in by.values()
        if "trainer" in r
    ]
    out["goals"]["trainer_mfu_agrees"] = bool(agree) and all(agree)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default="bench_gpu.json", help="the JSON to write")
    ap.add_argument("--cpu-smoke", action="store_true", help="every case, tiny, on CPU")
    ap.add_argument("--layers", type=int, default=None, help="layers (default: as many as fit)")
    ap.add_argument("--max-layers", type=int, default=32, help="cap of the automatic choice")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the clock starts")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per case")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what would end later")
    ap.add_argument("--only", default="", help="comma-separated case names to run")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.warmup, args.steps = 1, 1
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        ap.error("no GPU: run with --cpu-smoke, or on a machine with one")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="evoformer-bench-gpu-"))
    results: list[dict] = []
    only = {x for x in args.only.split(",") if x}
    for case in cases(args.cpu_smoke, device, args.layers, args.max_layers):
        name = case["name"]
        if only and name not in only:
            continue
        slowest = max((r.get("wall_s", 0.0) for r in results), default=0.0)
        if time.perf_counter() - start + slowest > args.budget_s:
            results.append({"name": name, "skipped": "would end past --budget-s"})
            continue
        kind = case.pop("kind")
        print(f"[bench_gpu] {name} ({case['layers']} layers) ...", flush=True)
        try:
            if kind == "evo":
                r = run_evoformer(
                    **case, warmup=args.warmup, steps=args.steps, device=device, out=work
                )
            else:
                r = run_torchtitan(**case, warmup=args.warmup, steps=args.steps, device=device)
        except Exception as e:  # noqa: BLE001 -- one failed case must not lose the others
            if args.cpu_smoke:
                raise
            r = {"name": name, "error": f"{type(e).__name__}: {e}"[:2000]}
        release()
        if device.type == "cuda":  # what the case left behind (0 unless something leaked)
            r["leftover_memory_gb"] = torch.cuda.memory_allocated(device) / 1e9
        results.append(r)
        print(f"[bench_gpu] {json.dumps(r)}", flush=True)
    report = {
        "environment": environment(device),
        "smoke": args.cpu_smoke,
        "cases": results,
        **summary(results),
        "total_s": time.perf_counter() - start,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[bench_gpu] wrote {args.out} in {report['total_s']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
