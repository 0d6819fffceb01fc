"""The non-finite guard: a step whose gradients are not finite is skipped on every rank at once
with the weights unchanged (fp32, bf16, fp16; one process, tp=2, dp=2, pp=2, DeepSpeed), and
too many in a row stop the run with one line, the newest finite checkpoint intact; loss spikes
are skipped when asked."""

from __future__ import annotations

import json

import pytest
import torch

from evoformer.config import load_config
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.errors import TrainingDiverged
from tests.conftest import REPO

BAD_STEP = 3  # the step whose gradients are poisoned


def _cfg(out_dir, *overrides: str):
    return load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [
            "data.source=synthetic",
            "train.seq_len=16",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.max_steps=5",
            "train.log_every=1",
            "optim.warmup_steps=1",
            "checkpoint.save_final=false",
            "run.progress=off",
            f"run.output_dir={out_dir}",
            *overrides,
        ],
    )


def _local_params(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        t = p.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        out[name] = t.float().clone()
    return out


class Poison:
    """A step hook: after step ``BAD_STEP - 1`` it makes one gradient NaN (once, or on every
    step from then on) on rank ``rank`` only, and records the weights around the bad step."""

    def __init__(self, rank: int = 0, persistent: bool = False) -> None:
        self.rank, self.persistent = rank, persistent
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.later: dict[str, torch.Tensor] = {}

    def __call__(self, step: int, trainer) -> None:
        if step == BAD_STEP - 1:
            self.before = _local_params(trainer)
            if trainer.dims.rank == self.rank:
                param = next(p for p in trainer.model.parameters() if p.requires_grad)
                fired = []

                def poison(grad):
                    if fired and not self.persistent:
                        return grad
                    fired.append(1)
                    return torch.full_like(grad, float("nan"))

                param.register_hook(poison)
        if step == BAD_STEP:
            self.after = _local_params(trainer)
        if step == BAD_STEP + 1:
            self.later = _local_params(trainer)


def _metrics(out_dir) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_nonfinite_step_is_skipped_with_weights_unchanged(tmp_path, precision):
    hook = Poison()
    result = Trainer(_cfg(tmp_path, f"precision={precision}"), step_hook=hook).train()
    assert result.step == 5  # one bad step is not a divergence
    for name, before in hook.before.items():
        assert torch.equal(hook.after[name], before), name
    records = _metrics(tmp_path)
    if precision == "fp16":  # an overflow: the loss scaler skips it and halves the scale
        assert records[BAD_STEP - 1]["skipped_steps"] >= 1
        assert records[BAD_STEP]["loss_scale"] < records[BAD_STEP - 2]["loss_scale"]
    else:
        assert "skipped_nonfinite" not in records[BAD_STEP - 2]
        assert [r["skipped_nonfinite"] for r in records[BAD_STEP - 1 :]] == [1.0, 1.0, 1.0]
    # and the next step trains again
    assert any(not torch.equal(hook.later[n], b) for n, b in hook.after.items())


def test_too_many_in_a_row_stop_with_the_newest_finite_checkpoint(tmp_path, capsys):
    hook = Poison(persistent=True)
    cfg = _cfg(
        tmp_path,
        "train.nonfinite_patience=1",
        "checkpoint.save_every=1",
        "checkpoint.keep_last=1",
    )
    with pytest.raises(TrainingDiverged, match=r"step 4 is the 2th in a row") as err:
        Trainer(cfg, step_hook=hook).train()
    assert "the newest checkpoint is" in str(err.value) and "step_2" in str(err.value)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != "latest")
    assert ckpts == ["step_2"]  # keep_last=1 never pruned it for a non-finite state
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "diverged"
    assert "update skipped on every rank (1 in a row" in capsys.readouterr().out


def test_a_loss_spike_is_skipped(tmp_path):
    """With train.spike_sigma a loss far above the recent ones is not applied."""
    cfg = _cfg(tmp_path, "train.spike_sigma=6", "train.spike_window=4", "train.max_steps=8")

    def spike(step: int, tr) -> None:
        with torch.no_grad():
            if step == 5:  # step 6's loss jumps: the head scaled up
                tr.model.head.weight.mul_(40)
            if step == 6:
                tr.model.head.weight.div_(40)

    Trainer(cfg, step_hook=spike).train()
    spikes = [r.get("skipped_spike", 0.0) for r in _metrics(tmp_path)]
    assert spikes[5] == spikes[4] + 1  # step 6 skipped
    assert spikes[6] == spikes[5]  # step 7 applied again


LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "dp2": [],
    "pp2": ["parallel.pp=2"],
    "ds0": ["zero.backend=deepspeed", "zero.stage=0"],
    "ds2": ["zero.backend=deepspeed", "zero.stage=2"],
}


def _poisoned_layouts(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS.items():
        hook = Poison(rank=0)
        trainer = Trainer(_cfg(f"{root}/{name}", *overrides), step_hook=hook)
        trainer.train()
        unchanged = all(torch.equal(hook.after[n], b) for n, b in hook.before.items())
        out[name] = {"unchanged": unchanged, "skips": dict(trainer.skips)}
    return out


def test_every_rank_skips_the_same_step(tmp_path):
    """The NaN is injected on rank 0 only; both ranks skip that step and keep their weights."""
    ranks = run_distributed(_poisoned_layouts, 2, str(tmp_path), timeout=180)
    for layout in LAYOUTS:
        for rank, got in enumerate(ranks):
            assert got[layout]["unchanged"], (layout, rank)
            assert got[layout]["skips"]["nonfinite"] == 1, (layout, rank, got[layout])
