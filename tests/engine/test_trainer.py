"""The training loop on real text: loss falls, resume is bit-exact, signals save and stop."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from evoformer.checkpoint import load_model
from evoformer.config import load_config
from evoformer.config.schema import OptimConfig
from evoformer.engine import Trainer
from evoformer.engine.optim import lr_at
from evoformer.errors import UserError
from tests.conftest import REPO

TINY = str(REPO / "configs/models/tiny/llama.yaml")


def _cfg(overrides, *extra):
    return load_config([TINY], [*overrides, *extra])


def test_loss_falls_and_metrics_are_written(run_overrides):
    cfg = _cfg(run_overrides, "train.max_steps=40", "train.eval_every=20", "train.eval_batches=4")
    result = Trainer(cfg).train()
    assert result.step == 40
    first, last = result.losses[1], sum(result.losses[i] for i in range(36, 41)) / 5
    assert first > 6.0  # ~log(512) at init
    assert last < first - 1.0
    assert result.val_losses[40] < result.val_losses[20] + 0.05 < first
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "val_loss" in x]
    assert [x["step"] for x in train] == list(range(1, 41))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_ms"):
        assert all(isinstance(x[key], float) for x in train)
    assert [x["step"] for x in evals] == [20, 40]
    assert (result.output_dir / "config.yaml").is_file()
    assert (result.output_dir / "checkpoints/latest").read_text().strip() == "step_40"


def test_prefetch_changes_no_number(run_overrides, tmp_path):
    """Batches read ahead on a thread are the batches read inside the step."""
    runs = {}
    for depth in (0, 2):
        out = f"run.output_dir={tmp_path / f'prefetch{depth}'}"
        cfg = _cfg(run_overrides, "train.max_steps=6", f"data.prefetch={depth}", out)
        runs[depth] = Trainer(cfg).train().losses
    assert runs[0] == runs[2]


def _stop_at(step_to_stop):
    def hook(step, trainer):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_signal_is_bit_exact(run_overrides, tmp_path, precision):
    common = [*run_overrides, "train.max_steps=12", "model.dropout=0.1", f"precision={precision}"]
    full = Trainer(_cfg(common, f"run.output_dir={tmp_path / 'full'}")).train()

    out = f"run.output_dir={tmp_path / 'split'}"
    first = Trainer(_cfg(common, out), step_hook=_stop_at(5)).train()
    assert first.interrupted and first.step == 5
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_5"
    status = json.loads((tmp_path / "split/status.json").read_text())
    assert status == {"state": "interrupted", "step": 5, "max_steps": 12}
    second = Trainer(_cfg(common, out, "checkpoint.load=auto")).train()
    assert second.step == 12 and not second.interrupted
    assert json.loads((tmp_path / "split/status.json").read_text())["state"] == "finished"
    for step in range(6, 13):
        assert second.losses[step] == full.losses[step], step  # bit-identical, not approximate
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "split")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 13))


def test_gradient_accumulation_matches_one_big_batch(run_overrides, tmp_path):
    base = [*run_overrides, "train.max_steps=3"]
    accum = Trainer(_cfg(base, "train.micro_batch_size=2", f"run.output_dir={tmp_path}/a")).train()
    whole = Trainer(_cfg(base, "train.micro_batch_size=8", f"run.output_dir={tmp_path}/b")).train()
    for step in (1, 2, 3):
        assert accum.losses[step] == pytest.approx(whole.losses[step], rel=1e-5)


def test_existing_checkpoints_are_not_overwritten_by_accident(run_overrides):
    cfg = _cfg(run_overrides, "train.max_steps=2")
    Trainer(cfg).train()
    with pytest.raises(
        UserError, match="already holds checkpoints; resume with checkpoint.load=auto"
    ):
        Trainer(cfg)
    done = Trainer(_cfg(run_overrides, "train.max_steps=2", "checkpoint.load=auto")).train()
    assert done.step == 2 and done.losses == {}


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 100, wsd) == 1.0 and lr_at(80, 100, wsd) == 1.0
    assert lr_at(90, 100, wsd) == pytest.approx(0.5)
    assert lr_at(50, 100, OptimConfig(lr=2.0, warmup_steps=0, schedule="constant")) == 2.0


def test_wandb_offline_and_tensorboard(run_overrides, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg(run_overrides, "train.max_steps=3", "run.wandb=true", "run.tensorboard=true")
    result = Trainer(cfg).train()
    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    events = list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_banner_names_the_zero_backend_under_every_layout():
    from evoformer.config.schema import ParallelConfig
    from evoformer.distributed import ParallelDims
    from evoformer.engine.trainer import describe_layout

    par = ParallelConfig(tp=2, sequence_parallel=True)
    dims = ParallelDims(world_size=4, rank=0, local_rank=0, tp=2)
    assert describe_layout(dims, par, "fsdp2 stage 3") == (
        "tp 2 x dp 2, sequence parallel, fsdp2 stage 3"
    )
    assert describe_layout(ParallelDims(4, 0, 0), ParallelConfig(), "fsdp2 stage 2") == (
        "dp 4, fsdp2 stage 2"
    )
    pp = ParallelConfig(tp=2, pp=2, pp_schedule="gpipe")
    dims = ParallelDims(world_size=8, rank=0, local_rank=0, tp=2, pp=2)
    assert describe_layout(dims, pp, "deepspeed stage 1") == (
        "pp 2 (gpipe) x tp 2 x dp 2, deepspeed stage 1"
    )


class _GonePipe:
    """A stdout whose reader has gone (``| tee`` killed by the same Ctrl-C)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_console_that_goes_away_loses_only_the_echo(run_overrides, tmp_path, monkeypatch):
    cfg = _cfg(run_overrides, "train.max_steps=6", f"run.output_dir={tmp_path}")

    def hook(step, trainer):
        if step == 2:
            monkeypatch.setattr("sys.stdout", _GonePipe())
        _stop_at(4)(step, trainer)

    result = Trainer(cfg, step_hook=hook).train()
    monkeypatch.undo()
    assert result.interrupted and result.step == 4
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "interrupted"
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_4"
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_rerun_resume_changes_and_config_files(run_overrides, capsys):
    """A rerun into a finished run says there is nothing to train and writes nothing; a resume
    reports what changed and records it beside the untouched config.yaml; a change of the model
    is refused naming the key."""
    first = Trainer(_cfg(run_overrides, "train.max_steps=3")).train()
    out = first.output_dir
    ckpt = out / "checkpoints/step_3"
    stamp = (ckpt / "trainer.json").stat().st_mtime_ns
    config = (out / "config.yaml").read_text()
    capsys.readouterr()

    again = Trainer(_cfg(run_overrides, "train.max_steps=3", "checkpoint.load=auto")).train()
    said = capsys.readouterr().out
    assert again.step == 3 and again.losses == {}
    assert "nothing to train" in said and "finished at step 3" in said
    assert (ckpt / "trainer.json").stat().st_mtime_ns == stamp  # not re-saved

    more = _cfg(run_overrides, "train.max_steps=5", "optim.lr=1e-3", "checkpoint.load=auto")
    resumed = Trainer(more).train()
    said = capsys.readouterr().out
    assert sorted(resumed.losses) == [4, 5]
    assert "changed settings: " in said and "train.max_steps 3 -> 5" in said
    assert "optim.lr 0.003 -> 0.001" in said
    assert (out / "config.yaml").read_text() == config  # the run's first settings stay
    assert "max_steps: 5" in (out / "config.step_3.yaml").read_text()

    wider = _cfg(run_overrides, "train.max_steps=8", "model.d_model=96", "checkpoint.load=auto")
    with pytest.raises(UserError, match=r"changed model\.d_model \(64 -> 96\)"):
        Trainer(wider)


def test_profile_writes_a_trace_of_the_chosen_steps(run_overrides, tmp_path):
    out = tmp_path / "prof"
    cfg = _cfg(run_overrides, "train.max_steps=4", "run.profile=[2,3]", f"run.output_dir={out}")
    trainer = Trainer(cfg)
    trainer.train()
    trace = out / "profile/trace_rank0.json"
    assert trainer.profiler.written == [trace]
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names or "aten::addmm" in names  # the steps' matmuls were recorded
    with pytest.raises(UserError, match=r"run.profile=\[3, 2\]"):
        Trainer(_cfg(run_overrides, "run.profile=[3,2]"))


def test_init_from_starts_a_new_run_from_weights(run_overrides, tmp_path):
    """checkpoint.init_from: the weights of another run, a fresh optimizer, step 0; resumed
    runs continue from their own checkpoints."""
    a = Trainer(_cfg(run_overrides, "train.max_steps=3", f"run.output_dir={tmp_path / 'a'}"))
    a.train()
    ckpt = tmp_path / "a/checkpoints/step_3"
    b_cfg = _cfg(
        run_overrides,
        "train.max_steps=1",
        "optim.lr=0",  # the one step leaves the weights as loaded
        f"checkpoint.init_from={ckpt}",
        "checkpoint.load=auto",
        f"run.output_dir={tmp_path / 'b'}",
    )
    b = Trainer(b_cfg)
    result = b.train()
    assert sorted(result.losses) == [1]  # step 0 of a new run
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    # a fresh optimizer: one AdamW step taken here, not A's three
    assert {float(s["step"]) for s in b.optimizer.state.values()} == {1.0}
    assert {float(s["step"]) for s in a.optimizer.state.values()} == {3.0}
    with pytest.raises(UserError, match="set only one of them"):
        _cfg(run_overrides, f"checkpoint.init_from={ckpt}", f"checkpoint.load={ckpt}")


def test_z_loss_by_hand(run_overrides, tmp_path):
    """optim.z_loss adds w * mean(logsumexp(logits)^2); the logged z_loss is that mean."""
    from evoformer.data import get_batch
    from evoformer.model import build_model

    cfg = _cfg(run_overrides, "train.max_steps=1", "optim.z_loss=0.01")
    trainer = Trainer(cfg)
    model = build_model(cfg.model, seed=cfg.run.seed)
    micro = trainer.sampler.micro_batches(0, 0, 1, cfg.train.micro_batch_size)
    with torch.no_grad():
        zs, ces = [], []
        for ix in micro:
            b = get_batch(trainer.data.train, ix)
            logits = model(b[:, :-1]).float()
            zs.append(torch.logsumexp(logits, -1).square().mean())
            ces.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten()))
    trainer.train()
    row = json.loads((trainer.out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["z_loss"] == pytest.approx(torch.stack(zs).mean().item(), rel=1e-5)
    assert row["loss"] == pytest.approx(torch.stack(ces).mean().item(), rel=1e-5)  # CE alone
