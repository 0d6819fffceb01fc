"""Context parallelism through the real Trainer trains like one process (gloo, fp32, seq 512).

Layouts against one process, 10 steps, per-step losses (and the final validation loss) within
1e-5 relative, for a dense GQA model (LLaMA-tiny), a sliding-window model (Mistral-tiny, window
100 < a 128-token chunk) and MLA + MoE + MTP (DeepSeek-V3-tiny: the MTP module's shifted
targets cross the chunk borders): cp=2 ring and all-to-all, cp=4 ring, cp=2 x tp=2 with
sequence parallelism, cp=2 x dp=2 under FSDP2 stage 3 and cp=2 x pp=2 (1F1B) for each of them;
cp=2 x tp=2 under all-to-all, cp=2 with activation checkpointing, bf16, fp16 and torchao FP8
(within 2e-3) for the dense model; cp=2 ring with QK-norm (Qwen3-tiny) and ALiBi; ep=2 x cp=2
for the MoE model; document masking (ring and all-to-all); stop/resume at cp=2 and resuming
its checkpoint at cp=1 and cp=4; the planner's cp accounting; refusals. Each group of layouts
is one spawn running them in a row.
"""

from __future__ import annotations

import pytest

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from tests.conftest import REPO
from tests.engine.parity import max_rel, parity_run

STEPS = 10
LOSS_RTOL = 1e-5
SEQ = 512

FP8 = ["fp8.enabled=true", "fp8.backend=torchao", "fp8.keep_first_last=false"]
FAMILIES = {
    "llama": ("llama", []),
    "window": ("mistral", ["model.attention.sliding_window=100"]),
    # MoE routing is a top-k: a near-tie at rounding level (1e-7, the ring's merged blocks vs
    # one process's SDPA) sends one token to another expert, and the sign-based selection-bias
    # update amplifies that into different loads (seed 1234 on one CPU: the first flip at step
    # 3, 2e-5 by step 8). A seed whose routing has no such tie in these 10 steps tests the cp
    # arithmetic itself; the flip is not a cp effect (one process flips the same way with
    # another reduction order).
    "deepseek-v3": ("deepseek-v3", ["run.seed=3"]),
    "qwen3": ("qwen3", []),  # QK-norm per head
    "alibi": ("llama", ["model.position.kind=alibi"]),
    "bf16": ("llama", ["precision=bf16"]),
    "fp16": ("llama", ["precision=fp16"]),  # with dynamic loss scaling
    "chunked": ("llama", ["model.loss_chunk=96"]),  # the fused, chunked head + loss on a chunk
    # torchao FP8 (tensorwise): each cp rank scales its activations by their amax over its own
    # chunks, so the FP8 rounding differs from one process's (2e-5 over 4 steps). 4 steps:
    # torchao's FP8 linears cost ~8 s a step on CPU at seq 512.
    "fp8": ("llama", [*FP8, "train.max_steps=4", "train.eval_every=4"]),
}
# bf16 / fp16 autocast: the ring's fp32 blocks vs one process's 16-bit SDPA differ by rounding
LOW_RTOL = 2e-3
COMMON = [
    *parity_run(STEPS, seq_len=SEQ, global_batch=4),
    f"model.max_seq_len={SEQ}",
    "train.eval_every=10",  # the validation loss at the end: logits gathered over cp
    "train.eval_batches=2",
]
LAYOUTS_2 = {
    ("llama", "cp2-ring"): ["parallel.cp=2"],
    ("llama", "cp2-alltoall"): ["parallel.cp=2", "parallel.cp_kind=alltoall"],
    ("llama", "cp2-ring-ac-full"): ["parallel.cp=2", "activation_checkpointing=full"],
    ("bf16", "cp2-ring"): ["parallel.cp=2"],
    ("fp16", "cp2-ring"): ["parallel.cp=2"],
    ("fp8", "cp2-ring"): ["parallel.cp=2"],
    ("chunked", "cp2-ring"): ["parallel.cp=2"],
}
KINDS_2 = {  # attention kinds, each on the ring (and the window and MLA under all-to-all)
    ("window", "cp2-ring"): ["parallel.cp=2"],
    ("window", "cp2-alltoall"): ["parallel.cp=2", "parallel.cp_kind=alltoall"],
    ("deepseek-v3", "cp2-ring"): ["parallel.cp=2"],
    ("deepseek-v3", "cp2-alltoall"): ["parallel.cp=2", "parallel.cp_kind=alltoall"],
    ("qwen3", "cp2-ring"): ["parallel.cp=2"],
    ("alibi", "cp2-ring"): ["parallel.cp=2"],
}
_LAYOUTS_4 = {
    "cp4-ring": ["parallel.cp=4"],
    "cp2xtp2-sp": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "cp2xdp2-fsdp3": ["parallel.cp=2", "zero.backend=fsdp2", "zero.stage=3"],
    "cp2xpp2": ["parallel.cp=2", "parallel.pp=2"],  # 1F1B
}
# The dense GQA model, the sliding-window model and MLA + MoE + MTP in every 4-rank layout.
LAYOUTS_4 = {
    (family, name): overrides
    for family in ("llama", "window", "deepseek-v3")
    for name, overrides in _LAYOUTS_4.items()
}
LAYOUTS_4["llama", "cp2xtp2-alltoall"] = [
    "parallel.cp=2",
    "parallel.tp=2",
    "parallel.cp_kind=alltoall",
]


def _cfg(family: str, out_dir, *overrides: str):
    name, extra = FAMILIES[family]
    return load_config(
        [str(REPO / f"configs/models/tiny/{name}.yaml")],
        [*COMMON, *extra, f"run.output_dir={out_dir}", *overrides],
    )


def _train(rank: int, world: int, layouts: dict, root: str) -> dict:
    out = {}
    for (family, name), overrides in layouts.items():
        result = Trainer(_cfg(family, f"{root}/{family}-{name}", *overrides)).train()
        out[(family, name)] = (result.losses, result.val_losses)
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cp-one")
    runs = {f: Trainer(_cfg(f, root / f)).train() for f in FAMILIES}
    return {f: (r.losses, r.val_losses) for f, r in runs.items()}


EP_4 = {("deepseek-v3", "ep2xcp2"): ["parallel.cp=2", "parallel.ep=2"]}  # DDP; dp 2 = edp 1 x ep 2


@pytest.mark.parametrize(
    "world,layouts",
    [(2, LAYOUTS_2), (2, KINDS_2), (4, LAYOUTS_4), (4, EP_4)],
    ids=["w2", "w2-kinds", "w4", "w4-ep"],
)
def test_cp_layouts_train_like_one_process(world, layouts, single_runs, tmp_path):
    got = run_distributed(_train, world, layouts, str(tmp_path), timeout=300)
    report = {}
    for key in layouts:
        losses, val = got[0][key]
        ref_losses, ref_val = single_runs[key[0]]
        report[key] = max(max_rel(losses, ref_losses), max_rel(val, ref_val))
        for rank_out in got[1:]:  # every rank logs the same (global) losses
            assert rank_out[key] == got[0][key], key
    print("\nmax relative loss difference vs one process:", report)
    low = {k: v for k, v in report.items() if k[0] in ("bf16", "fp16", "fp8")}
    assert all(v <= LOW_RTOL for v in low.values()), low
    assert max(v for k, v in report.items() if k not in low) <= LOSS_RTOL, report


# -- document masking ---------------------------------------------------------------------


def _docs_cfg(short_docs, out_dir, *overrides: str):
    return _cfg(
        "llama",
        out_dir,
        "data.source=files",
        f"data.paths=[{short_docs['path']}]",
        f"data.tokenizer={short_docs['tokenizer']}",
        "data.val_fraction=0",
        "data.document_masking=true",
        *overrides,
    )


def _train_docs(rank: int, world: int, short_docs, root: str) -> dict:
    return {
        kind: Trainer(
            _docs_cfg(short_docs, f"{root}/{kind}", "parallel.cp=2", f"parallel.cp_kind={kind}")
        )
        .train()
        .losses
        for kind in ("ring", "alltoall")
    }


def test_cp_with_document_masking_trains_like_one_process(short_docs, tmp_path):
    """Windows of 512 tokens hold dozens of short documents, so many cross the chunk borders:
    their positions restart at the document's first token on whichever rank it lies."""
    ref = Trainer(_docs_cfg(short_docs, tmp_path / "one")).train().losses
    got = run_distributed(_train_docs, 2, short_docs, str(tmp_path), timeout=300)[0]
    report = {kind: max_rel(losses, ref) for kind, losses in got.items()}
    print("\ndocument masking, max relative loss difference vs one process:", report)
    assert max(report.values()) <= LOSS_RTOL, report


# -- checkpoints ----------------------------------------------------------------------------


def _stop_and_resume(rank: int, world: int, root: str) -> dict:
    cp2 = ["parallel.cp=2"]
    full = Trainer(_cfg("llama", f"{root}/full", *cp2, "checkpoint.save_every=5")).train()
    ckpt = f"{root}/full/checkpoints/step_5"
    resumed = Trainer(_cfg("llama", f"{root}/resumed", *cp2, f"checkpoint.load={ckpt}")).train()
    return {"full": full.losses, "resumed": resumed.losses}


def _resume_cp4(rank: int, world: int, root: str) -> dict:
    ckpt = f"{root}/full/checkpoints/step_5"
    cfg = _cfg("llama", f"{root}/cp4", "parallel.cp=4", f"checkpoint.load={ckpt}")
    return Trainer(cfg).train().losses


def test_cp2_resumes_exactly_and_on_cp1_and_cp4(single_runs, tmp_path):
    got = run_distributed(_stop_and_resume, 2, str(tmp_path), timeout=300)[0]
    full, resumed = got["full"], got["resumed"]
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)  # bit-exact
    ckpt = tmp_path / "full/checkpoints/step_5"
    one = Trainer(_cfg("llama", tmp_path / "one", f"checkpoint.load={ckpt}")).train().losses
    four = run_distributed(_resume_cp4, 4, str(tmp_path), timeout=300)[0]
    ref = single_runs["llama"][0]
    for layout, losses in (("cp1", one), ("cp4", four)):
        assert sorted(losses) == list(range(6, STEPS + 1)), layout
        for s in losses:
            assert losses[s] == pytest.approx(full[s], rel=LOSS_RTOL), (layout, s)
            assert losses[s] == pytest.approx(ref[s], rel=LOSS_RTOL), (layout, s)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.seq_len=510"], "train.seq_len=510: must be divisible by 2\\*cp = 4"),
        (
            ["parallel.cp_kind=alltoall", "parallel.cp=8", "train.seq_len=512"],
            "cp_kind=alltoall needs the 4 attention heads of a tp rank divisible by cp",
        ),
        (["zero.backend=deepspeed"], "zero.backend=deepspeed does not run with parallel.cp > 1"),
        (["model.attention.dropout=0.1"], "attention dropout does not run with parallel.cp > 1"),
        (["zero.backend=fsdp2", "zero.replicate=2"], "HSDP \\(zero.replicate > 1\\) does not"),
        (["train.compile=true"], "train.compile does not run with parallel.cp > 1"),
        (["model.moe.num_experts=4", "model.moe.capacity_factor=1.5"], "an MoE expert capacity"),
        (["model.attention.sinks=true"], "attention sinks do not run with parallel.cp > 1"),
        (["model.mixer_pattern=GA"], "Gated DeltaNet / Mamba-2 layers do not run with parallel.cp"),
    ],
)
def test_impossible_cp_layouts_fail_with_one_line(overrides, message, tmp_path):
    from evoformer.errors import UserError

    with pytest.raises(UserError, match=message):
        _cfg("llama", tmp_path, "parallel.cp=2", *overrides)


def test_plan_divides_activations_by_cp_and_adds_the_exchange_buffers(tmp_path):
    from evoformer.errors import UserError
    from evoformer.planning.memory import cp_buffer_bytes, estimate

    one = estimate(_cfg("llama", tmp_path), 1).stages[0]
    cfg = _cfg("llama", tmp_path, "parallel.cp=2", "zero.backend=fsdp2", "zero.stage=3")
    two = estimate(cfg, 2).stages[0]
    # 2 x 512 tokens / cp 2 per rank; K and V of 2 heads x 16 dims; ring: sent + received
    # (fp32) and the fp32 gradients sent + received in the backward
    assert cp_buffer_bytes(cfg) == 512 * (2 * 32) * (2 * 4 + 2 * 4)
    assert two.activations == int(one.activations / 2 + cp_buffer_bytes(cfg))
    assert two.params <= one.params / 2 + 1024  # FSDP2 shards over dp x cp
    with pytest.raises(UserError, match="multiple of parallel.tp \\* parallel.pp \\* parallel.cp"):
        estimate(cfg, 3)


def test_long_context_recipe_fits_its_8_gpus(capsys):
    """The 128K recipe's documented plan (docs/parallelism.md §16), and `inspect` of a cp
    config (sized as one process)."""
    from evoformer.cli import main

    recipe = str(REPO / "configs/llama3.1-8b-128k-cp.yaml")
    assert main(["plan", recipe, "--gpus", "8", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = tp 2 x pp 1 x dp 1 x cp 4 (alltoall)" in out
    assert "fits (busiest rank: pp rank 0, 28.16 GiB of 80.00 GiB, 35 %)" in out
    assert main(["inspect", recipe]) == 0
    assert "memory activations (1x131072)" in capsys.readouterr().out
