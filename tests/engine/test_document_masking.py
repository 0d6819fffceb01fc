"""``data.document_masking`` through the real Trainer: the step loss is the loss of the model
run on the documents of each window (derived from the EOD tokens), and every parallel layout
(tp=2 + SP, pp=2, ep=2, FSDP2 with activation checkpointing, DeepSpeed ZeRO-2) trains to the
losses of one process (gloo, fp32, 6 steps).

The corpus is short documents (a few lines each), so a 32-token window holds several and the
masking changes the numbers (checked: off and on differ).
"""

from __future__ import annotations

import pytest
import torch

from evoformer.config import load_config
from evoformer.data import get_batch
from evoformer.data.dataset import document_ids_from_eod
from evoformer.distributed.testing import run_distributed
from evoformer.engine import Trainer
from evoformer.errors import UserError
from evoformer.model import build_model, lm_loss
from tests.conftest import REPO
from tests.engine.parity import max_rel

STEPS = 6
LOSS_RTOL = 1e-5


def _cfg(short_docs, out_dir, *overrides: str, family: str = "llama"):
    return load_config(
        [str(REPO / f"configs/models/tiny/{family}.yaml")],
        [
            "data.source=files",
            f"data.paths=[{short_docs['path']}]",
            f"data.tokenizer={short_docs['tokenizer']}",
            "data.val_fraction=0",
            "data.document_masking=true",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            f"train.max_steps={STEPS}",
            "train.log_every=1",
            "optim.warmup_steps=2",
            "optim.lr=3e-3",
            "checkpoint.save_final=false",
            "run.progress=off",
            f"run.output_dir={out_dir}",
            *overrides,
        ],
    )


def test_step_loss_is_the_documents_loss(short_docs, tmp_path):
    """The first step's loss is the model's loss with each window split at its EOD tokens; with
    masking off it is the plain causal loss, and the two differ."""
    trainer = Trainer(_cfg(short_docs, tmp_path / "on", "train.max_steps=1"))
    model = build_model(trainer.cfg.model, seed=trainer.cfg.run.seed)
    eod = trainer.data.train.eod_id
    assert eod is not None
    micro = trainer.sampler.micro_batches(0, 0, 1, 2)
    batches = [get_batch(trainer.data.train, ix) for ix in micro]
    assert sum(int((b[:, :-1] == eod).sum()) for b in batches) >= 4  # several documents
    with torch.no_grad():
        masked = [
            lm_loss(model(b[:, :-1], document_ids=document_ids_from_eod(b[:, :-1], eod)), b[:, 1:])
            for b in batches
        ]
        plain = [lm_loss(model(b[:, :-1]), b[:, 1:]) for b in batches]
    want_on = torch.stack(masked).mean().item()
    want_off = torch.stack(plain).mean().item()
    assert abs(want_on - want_off) > 1e-3
    got_on = trainer.train().losses[1]
    off = Trainer(
        _cfg(short_docs, tmp_path / "off", "train.max_steps=1", "data.document_masking=false")
    )
    got_off = off.train().losses[1]
    assert got_on == pytest.approx(want_on, rel=1e-6)
    assert got_off == pytest.approx(want_off, rel=1e-6)


def test_synthetic_data_has_no_documents(short_docs, tmp_path):
    with pytest.raises(UserError, match="data.document_masking needs documents"):
        Trainer(_cfg(short_docs, tmp_path, "data.source=synthetic"))


LAYOUTS = {
    "llama": {
        "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
        "pp2": ["parallel.pp=2"],
        "fsdp2-ac": ["zero.backend=fsdp2", "zero.stage=3", "activation_checkpointing=full"],
        "ds2": ["zero.backend=deepspeed", "zero.stage=2"],
    },
    # MLA, MoE (aux-loss-free bias) and MTP, experts split over two ranks
    "deepseek-v3": {"ep2": ["parallel.ep=2"], "tp2-sp": ["parallel.tp=2"]},
}


def _train_layouts(rank: int, world: int, short_docs, family: str, root: str) -> dict:
    out = {}
    for name, overrides in LAYOUTS[family].items():
        cfg = _cfg(short_docs, f"{root}/{family}-{name}", *overrides, family=family)
        out[name] = Trainer(cfg).train().losses
    return out


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_layouts_train_like_one_process(short_docs, family, tmp_path):
    ref = Trainer(_cfg(short_docs, tmp_path / "one", family=family)).train().losses
    got = run_distributed(_train_layouts, 2, short_docs, family, str(tmp_path), timeout=180)[0]
    report = {name: max_rel(losses, ref) for name, losses in got.items()}
    print(f"\n{family} with document masking, max relative loss difference: {report}")
    assert max(report.values()) <= LOSS_RTOL, report
