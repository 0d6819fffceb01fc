"""A weighted blend through the real Trainer: the batches follow the sampler's blend, the
per-source tokens seen and validation losses reach ``metrics.jsonl``, and a stopped run resumes
bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evoformer.config import load_config
from evoformer.engine import Trainer
from evoformer.errors import UserError
from tests.conftest import REPO

STEPS = 6


@pytest.fixture(scope="module")
def two_sources(short_docs, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("blend")
    lines = Path(short_docs["path"]).read_text().splitlines(keepends=True)
    a, b = root / "lines.jsonl", root / "more.lines.jsonl"
    a.write_text("".join(lines[:300]))
    b.write_text("".join(lines[300:]))
    return [str(a), str(b)]


def _cfg(short_docs, sources, out_dir, *overrides: str):
    return load_config(
        [str(REPO / "configs/models/tiny/llama.yaml")],
        [
            "data.source=files",
            f"data.paths=[{','.join(sources)}]",
            "data.weights=[0.25,0.75]",
            f"data.tokenizer={short_docs['tokenizer']}",
            "data.val_fraction=0.2",
            "train.seq_len=16",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            f"train.max_steps={STEPS}",
            "train.log_every=1",
            f"train.eval_every={STEPS}",
            "train.eval_batches=2",
            "optim.warmup_steps=2",
            "checkpoint.save_final=false",
            "run.progress=off",
            f"run.output_dir={out_dir}",
            *overrides,
        ],
    )


def _records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_blend_metrics_and_exact_resume(short_docs, two_sources, tmp_path):
    full = Trainer(_cfg(short_docs, two_sources, tmp_path / "full", "checkpoint.save_every=3"))
    sampler = full.sampler
    sizes = [s.samples for s in full.data.sources]
    assert [s.name for s in full.data.sources] == ["lines", "more"]
    # the batches of each step hold 2 and 6 samples of the two sources (8 * 0.25, 8 * 0.75)
    for step in range(STEPS):
        got = np.bincount(np.searchsorted(np.cumsum(sizes), sampler.global_batch(step), "right"))
        assert got.tolist() == [2, 6]
    losses = full.train().losses
    records = _records(tmp_path / "full")
    last = [r for r in records if r.get("step") == STEPS and "loss" in r][0]
    assert last["tokens/lines"] == 2 * STEPS * 16 and last["tokens/more"] == 6 * STEPS * 16
    val = [r for r in records if "val_loss" in r][0]
    assert set(val) >= {"val_loss", "val_loss/lines", "val_loss/more"}
    assert val["val_loss/lines"] != val["val_loss/more"]

    ckpt = tmp_path / "full/checkpoints/step_3"
    resumed = Trainer(_cfg(short_docs, two_sources, tmp_path / "res", f"checkpoint.load={ckpt}"))
    again = resumed.train().losses
    assert sorted(again) == list(range(4, STEPS + 1))
    assert all(again[s] == losses[s] for s in again)  # bit-exact
    # another blend cannot resume this order
    other = _cfg(
        short_docs, two_sources, tmp_path / "other", f"checkpoint.load={ckpt}", "data.weights=[1,1]"
    )
    with pytest.raises(UserError, match="data.weights"):
        Trainer(other).train()


def test_weights_must_match_the_paths(short_docs, two_sources, tmp_path):
    with pytest.raises(UserError, match="one weight per data.paths entry"):
        _cfg(short_docs, two_sources, tmp_path, "data.weights=[1]")
