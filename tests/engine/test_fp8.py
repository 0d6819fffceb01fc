"""FP8 training: torchao's Float8Linear on CPU, and the Transformer Engine recipe wiring.

torchao (tiny LLaMA with 4 blocks on the small real corpus, bf16 autocast, lr 3e-3, 30 steps)
against the same bf16 run without FP8; measured max / mean relative per-step loss difference:
tensorwise 2.7e-2 / 2.8e-3, rowwise 2.2e-2 / 1.4e-3 (the maximum is one loss spike at step
17-18 that the runs take slightly differently) -> allowed 6e-2 / 1e-2. Under FSDP2 (dp 2,
bf16 policy) tensorwise FP8 tracks the one-process FP8 run within 3.1e-4 over 10 steps, and
2.4e-4 with the weights all-gathered in FP8 -> allowed 2e-3.

Transformer Engine needs CUDA: its wiring (recipe mapping, ``fp8_autocast`` around the forward,
the kept blocks run with FP8 off) is checked with a fake ``transformer_engine`` module.
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchao.float8.float8_linear import Float8Linear

from evoformer.config import load_config
from evoformer.config.validate import validate
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.engine.fp8 import TE_RECIPES, keeps_high_precision, setup_fp8, te_recipe
from evoformer.errors import UserError
from evoformer.model import build_model
from evoformer.parallel import te_backend
from tests.conftest import REPO
from tests.parallel.test_te_backend import FakeTELinear

TINY = str(REPO / "configs/models/tiny/llama.yaml")
DEEPSEEK = str(REPO / "configs/models/tiny/deepseek-v3.yaml")
FP8_MAX_RTOL, FP8_MEAN_RTOL, FSDP_FP8_RTOL = 6e-2, 1e-2, 2e-3
TORCHAO = ["fp8.enabled=true", "fp8.backend=torchao"]


def _cfg(corpus: dict, out_dir, steps: int, *overrides: str):
    return load_config(
        [TINY],
        [
            "data.source=files",
            f"data.paths=[{corpus['path']}]",
            f"data.tokenizer={corpus['tokenizer']}",
            "data.val_fraction=0.1",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            f"train.max_steps={steps}",
            "train.log_every=1",
            "run.progress=off",
            "optim.warmup_steps=5",
            "optim.lr=3e-3",
            "checkpoint.save_final=false",
            "model.n_layers=4",
            "precision=bf16",
            f"run.output_dir={out_dir}",
            *overrides,
        ],
    )


def _rel(got: dict[int, float], want: dict[int, float]) -> list[float]:
    assert sorted(got) == sorted(want)
    return [abs(got[s] - want[s]) / abs(want[s]) for s in want]


def _linears(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# -- torchao on CPU ----------------------------------------------------------------------------


def test_torchao_fp8_tracks_bf16_and_keeps_the_edges_high_precision(text_corpus, tmp_path):
    bf16 = Trainer(_cfg(text_corpus, tmp_path / "bf16", 30)).train().losses
    assert bf16[30] < bf16[1] - 0.8
    report = []
    for recipe in ("tensorwise", "rowwise"):
        trainer = Trainer(
            _cfg(text_corpus, tmp_path / recipe, 30, *TORCHAO, f"fp8.recipe={recipe}")
        )
        kinds = _linears(trainer.model)
        # Blocks 1 and 2 compute in FP8; blocks 0 and 3 and the LM head stay bf16 linears.
        fp8 = sorted(n for n, k in kinds.items() if k is Float8Linear)
        assert fp8 == sorted(
            f"layers.{i}.{p}"
            for i in (1, 2)
            for p in (
                "attn.q_proj",
                "attn.k_proj",
                "attn.v_proj",
                "attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            )
        )
        assert kinds["head"] is nn.Linear and kinds["layers.0.mlp.up_proj"] is nn.Linear
        assert kinds["layers.3.attn.o_proj"] is nn.Linear
        assert sorted(trainer.strategy.fp8.converted) == fp8
        cast = fp8[0] if recipe == "tensorwise" else fp8[-1]
        config = trainer.model.get_submodule(cast).config
        assert config.cast_config_weight.scaling_granularity.value == (
            "tensorwise" if recipe == "tensorwise" else "axiswise"
        )
        losses = trainer.train().losses
        rel = _rel(losses, bf16)
        report.append(f"{recipe} max {max(rel):.1e} mean {sum(rel) / len(rel):.1e}")
        assert max(rel) <= FP8_MAX_RTOL, (recipe, rel)
        assert sum(rel) / len(rel) <= FP8_MEAN_RTOL, (recipe, rel)
        assert 0 < max(rel)  # FP8 did change the numbers
    print("\nfp8 vs bf16 over 30 steps (relative loss difference): " + "; ".join(report))


def test_router_mtp_head_and_odd_shapes_stay_high_precision():
    # DeepSeek-V3 tiny: MLA, MoE (router + shared experts) in blocks 1 and 2, an MTP module.
    cfg = load_config([DEEPSEEK], TORCHAO)
    assert cfg.model.n_layers == 3 and cfg.model.mtp.depth == 1
    model = build_model(cfg.model)
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp8 = setup_fp8(model, cfg.fp8, fsdp=False)
    kinds = _linears(model)
    want = sorted(
        n
        for n, m in before.items()
        if n.startswith("layers.1.")
        and not n.endswith("router")
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
    )
    assert "layers.1.mlp.shared_experts.up_proj" in want and "layers.1.attn.o_proj" in want
    assert sorted(n for n, k in kinds.items() if k is Float8Linear) == sorted(fp8.converted) == want
    for name in (
        "layers.1.mlp.router",
        "layers.2.mlp.router",
        "mtp.layers.0.block.mlp.router",
        "mtp.layers.0.proj",
        "mtp.layers.0.block.attn.o_proj",
        "head",
        "layers.0.mlp.up_proj",
        "layers.2.attn.o_proj",
    ):
        assert kinds[name] is nn.Linear, name
    assert isinstance(model.embed, nn.Embedding)
    assert keeps_high_precision("layers.4.mlp.router", 8, False)
    assert not keeps_high_precision("layers.0.mlp.up_proj", 5, False)
    assert not keeps_high_precision("layers.2.mlp.head_proj", 5, True)

    # In/out features not multiples of 16 (FP8 GEMMs need them) are skipped by the filter.
    odd = load_config([TINY], ["model.n_layers=3", "model.mlp.hidden=100", *TORCHAO])
    model = build_model(odd.model)
    converted = setup_fp8(model, odd.fp8, fsdp=False).converted
    assert converted == [f"layers.1.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert type(model.get_submodule("layers.1.mlp.up_proj")) is nn.Linear

    # Nothing left to convert: one clear line instead of a silent bf16 run.
    two = load_config([TINY], TORCHAO)
    with pytest.raises(UserError, match="no linear layer can run in FP8.*n_layers=2"):
        setup_fp8(build_model(two.model), two.fp8, fsdp=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp=2"], "torchao FP8 with parallel.tp > 1 is not supported"),
        (["fp8.recipe=delayed"], "fp8.backend=torchao offers tensorwise | rowwise"),
        (["fp8.fsdp_float8_all_gather=true"], "needs zero.backend=fsdp2"),
        (["fp8.backend=te"], "needs model.backend=te"),
        (["fp8.backend=te", "model.backend=te", "fp8.recipe=rowwise"], "rowwise is torchao's"),
        (["fp8.recipe=e4m3"], "must be one of tensorwise, rowwise, delayed, mxfp8, blockwise"),
        (["zero.backend=deepspeed", "zero.stage=2"], "FP8 with zero.backend=deepspeed"),
    ],
)
def test_fp8_settings_are_validated(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(load_config([TINY], [*TORCHAO, *overrides]))


def test_torchao_fp8_checkpoint_resumes_exactly(text_corpus, tmp_path):
    full = Trainer(_cfg(text_corpus, tmp_path / "full", 6, *TORCHAO, "checkpoint.save_every=3"))
    full_losses = full.train().losses
    ckpt = tmp_path / "full/checkpoints/step_3"
    resumed = Trainer(
        _cfg(text_corpus, tmp_path / "resumed", 6, *TORCHAO, f"checkpoint.load={ckpt}")
    )
    assert type(resumed.model.get_submodule("layers.1.mlp.up_proj")) is Float8Linear
    losses = resumed.train().losses
    assert sorted(losses) == [4, 5, 6]
    assert all(losses[s] == full_losses[s] for s in losses), (full_losses, losses)  # bit-exact


# -- FP8 under FSDP2 ---------------------------------------------------------------------------


def _fsdp_fp8(rank: int, world: int, corpus: dict, root: str) -> dict:
    out = {}
    fsdp = ["zero.backend=fsdp2", "zero.stage=3", *TORCHAO]
    for name, extra in (("fsdp2", []), ("fsdp2_fp8_gather", ["fp8.fsdp_float8_all_gather=true"])):
        trainer = Trainer(_cfg(corpus, f"{root}/{name}", 10, *fsdp, *extra))
        weight = trainer.model.layers[1].mlp.up_proj.weight
        assert isinstance(weight, DTensor)
        out[name] = {"losses": trainer.train().losses, "local": type(weight.to_local()).__name__}
    return out


def test_torchao_fp8_composes_with_fsdp2(text_corpus, tmp_path):
    one = Trainer(_cfg(text_corpus, tmp_path / "one", 10, *TORCHAO)).train().losses
    ranks = run_distributed(_fsdp_fp8, 2, text_corpus, str(tmp_path), timeout=240)
    for name in ("fsdp2", "fsdp2_fp8_gather"):
        got = max(_rel(ranks[0][name]["losses"], one))
        print(f"\nfp8 tensorwise {name} (dp 2) vs one process, 10 steps: max relative {got:.1e}")
        assert got <= FSDP_FP8_RTOL
        assert ranks[1][name]["losses"] == ranks[0][name]["losses"]
    # With the FP8 all-gather the sharded weights are torchao's FP8-castable tensor subclass.
    assert ranks[0]["fsdp2"]["local"] == "Tensor"
    assert ranks[0]["fsdp2_fp8_gather"]["local"] == "WeightWithDynamicFloat8CastTensor"


# -- Transformer Engine, through a fake module -------------------------------------------------

FP8_STATE: list[tuple[bool, object]] = []  # the fake fp8_autocast's stack: (enabled, recipe)


class RecordingTELinear(FakeTELinear):
    """The fake ``te.Linear``, recording whether each forward ran with FP8 on, and the recipe."""

    def forward(self, x):
        self.seen = FP8_STATE[-1] if FP8_STATE else (False, None)
        return super().forward(x)


@contextlib.contextmanager
def fake_fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None):
    FP8_STATE.append((enabled, fp8_recipe if enabled else None))
    try:
        yield
    finally:
        FP8_STATE.pop()


@pytest.fixture
def fake_te(monkeypatch):
    pkg = types.ModuleType("transformer_engine")
    mod = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    for cls in TE_RECIPES.values():
        setattr(recipe, cls, type(cls, (), {}))
    mod.Linear, mod.fp8_autocast = RecordingTELinear, fake_fp8_autocast
    pkg.pytorch, pkg.common, common.recipe = mod, common, recipe
    for name, m in [
        ("transformer_engine", pkg),
        ("transformer_engine.pytorch", mod),
        ("transformer_engine.common", common),
        ("transformer_engine.common.recipe", recipe),
    ]:
        monkeypatch.setitem(sys.modules, name, m)
    monkeypatch.setattr(te_backend, "_cuda_available", lambda: True)
    return types.SimpleNamespace(pytorch=mod, recipe=recipe)


@pytest.mark.parametrize("recipe", list(TE_RECIPES))
def test_te_recipes_map_onto_transformer_engine(fake_te, recipe):
    assert type(te_recipe(recipe, fake_te.recipe)).__name__ == TE_RECIPES[recipe]
    assert TE_RECIPES == {
        "delayed": "DelayedScaling",
        "tensorwise": "Float8CurrentScaling",
        "mxfp8": "MXFP8BlockScaling",
        "blockwise": "Float8BlockScaling",
    }


def test_te_fp8_autocast_wraps_the_forward_and_skips_the_edges(fake_te, tmp_path):
    cfg = load_config(
        [TINY],
        [
            "model.backend=te",
            "fp8.enabled=true",
            "fp8.backend=te",
            "fp8.recipe=delayed",
            "model.n_layers=3",
            "data.source=synthetic",
            "train.seq_len=16",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "train.max_steps=2",
            "run.progress=off",
            "checkpoint.save_final=false",
            f"run.output_dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg)
    result = trainer.train()
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor([*result.losses.values()])))
    recipe_cls = fake_te.recipe.DelayedScaling
    seen = {n: m.seen for n, m in trainer.model.named_modules() if isinstance(m, RecordingTELinear)}
    assert seen and not FP8_STATE
    for name, (enabled, recipe) in seen.items():
        middle = name.startswith("layers.1.")
        assert enabled == middle, name
        assert isinstance(recipe, recipe_cls) if middle else recipe is None, name
    want = sorted(n for n in seen if n.startswith("layers.1."))
    assert sorted(trainer.strategy.fp8.converted) == want


def test_te_fp8_without_transformer_engine_is_one_clear_line(tmp_path):
    if "transformer_engine" in sys.modules or torch.cuda.is_available():
        pytest.skip("Transformer Engine / CUDA present: the GPU tests cover it")
    cfg = load_config(
        [TINY],
        [
            "model.backend=te",
            "fp8.enabled=true",
            "fp8.backend=te",
            "data.source=synthetic",
            f"run.output_dir={tmp_path}",
        ],
    )
    with pytest.raises(UserError, match="needs Transformer Engine"):
        Trainer(cfg)
