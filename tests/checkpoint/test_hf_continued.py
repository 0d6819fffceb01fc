"""Continued pretraining from an import-hf checkpoint, and the tokenizer travelling both ways.

A tiny HF LLaMA (random weights) with a byte-level BPE tokenizer is imported; training from the
import's step_0 (weights only) starts at step 0 with a fresh optimizer, on one process and under
DDP, FSDP2 and DeepSpeed ZeRO-3 (dp=2) and TP 2, and its first loss is the loss of the imported
weights. Then import -> train -> export-hf: ``AutoTokenizer`` round-trips text with our ids and
``pipeline(...)`` greedy tokens equal ``evoformer generate``'s; a sentencepiece run exports a
converted tokenizer too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from evoformer.checkpoint import load_model, read_trainer_state, resolve_checkpoint  # noqa: E402
from evoformer.cli import main  # noqa: E402
from evoformer.config import load_config  # noqa: E402
from evoformer.data import default_corpus_files, load_tokenizer, train_tokenizer  # noqa: E402
from evoformer.distributed.testing import run_distributed  # noqa: E402
from evoformer.engine import Trainer  # noqa: E402
from evoformer.model import build_model  # noqa: E402
from evoformer.model.generate import generate  # noqa: E402
from tests.checkpoint.hf_testing import randomise  # noqa: E402

VOCAB = 512
TRAIN = [
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "run.progress=off",
]
TEXTS = [p.read_text(encoding="utf-8") for p in default_corpus_files()[11::113][:6]]
PROMPT = "def f(x):\n    return"


@pytest.fixture(scope="module")
def hf_llama(hf_tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A save_pretrained folder: tiny LLaMA (random weights) + the byte-level BPE tokenizer."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=0,
        bos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(cfg)
    randomise(model, seed=3)
    out = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(out)
    for f in hf_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def imported(hf_llama: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("import") / "run"
    assert main(["import-hf", str(hf_llama), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _cfg(imported: Path, out: Path, *overrides: str):
    return load_config(
        [str(imported / "config.yaml")],
        [
            *TRAIN,
            f"checkpoint.load={imported / 'checkpoints/step_0'}",
            f"run.output_dir={out}",
            *overrides,
        ],
    )


def _first_batch_loss(model, trainer: Trainer) -> float:
    """The mean next-token loss of ``model`` on step 0's global batch of ``trainer``."""
    t = trainer.cfg.train
    ids = trainer.sampler.micro_batches(0, 0, 1, t.global_batch_size)[0]
    batch = torch.stack([torch.as_tensor(trainer.data.train[int(i)]) for i in ids]).long()
    with torch.no_grad():
        logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).item()


def test_import_is_weights_only_and_carries_its_tokenizer(imported: Path) -> None:
    ckpt = resolve_checkpoint(imported)
    assert read_trainer_state(ckpt)["weights_only"] is True
    cfg = load_config([str(imported / "config.yaml")])
    assert cfg.data.tokenizer == str((imported / "tokenizer").resolve())
    assert cfg.data.eod_id is None
    for folder in (imported / "tokenizer", ckpt / "tokenizer"):
        names = sorted(p.name for p in folder.iterdir())
        # generation_config.json (written by save_pretrained) travels for export-hf
        assert names == [
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ], folder
    assert load_tokenizer(ckpt / "tokenizer").eod_id == 0


def test_training_from_an_import_starts_fresh(imported: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg(imported, tmp_path / "run", "data.source=synthetic", "train.max_steps=3")
    trainer = Trainer(cfg)
    want = _first_batch_loss(load_model(imported), trainer)
    result = trainer.train()
    out = capsys.readouterr().out
    assert (
        f"loaded weights from {imported / 'checkpoints/step_0'} (no optimizer state): starting "
        "at step 0 with a fresh optimizer" in out
    )
    assert sorted(result.losses) == [1, 2, 3]
    assert result.losses[1] == pytest.approx(want, rel=1e-5)
    # not what the config's own initialisation would give: the imported weights were used
    fresh = _first_batch_loss(build_model(cfg.model, seed=cfg.run.seed).eval(), trainer)
    assert abs(fresh - want) > 1e-2
    # the new run's checkpoints are ordinary ones: they resume (optimizer state and all)
    state = read_trainer_state(resolve_checkpoint(tmp_path / "run"))
    assert state["step"] == 3 and "weights_only" not in state


LAYOUTS = {
    "ddp": [],
    "fsdp2": ["zero.backend=fsdp2", "zero.stage=3"],
    "deepspeed": ["zero.backend=deepspeed", "zero.stage=3"],
    "tp2": ["parallel.tp=2"],
}


def _train_dp2(rank: int, world: int, imported: str, root: str) -> dict[str, dict[int, float]]:
    losses = {}
    for name, overrides in LAYOUTS.items():
        cfg = _cfg(
            Path(imported),
            Path(root) / name,
            "data.source=synthetic",
            "train.max_steps=2",
            "checkpoint.save_final=false",
            *overrides,
        )
        losses[name] = Trainer(cfg).train().losses
    return losses


def test_training_from_an_import_under_dp2(imported: Path, tmp_path: Path) -> None:
    cfg = _cfg(imported, tmp_path / "one", "data.source=synthetic", "train.max_steps=2")
    one = Trainer(cfg)
    want = _first_batch_loss(load_model(imported), one)
    ref = one.train().losses
    ranks = run_distributed(_train_dp2, 2, str(imported), str(tmp_path), timeout=120)
    for name in LAYOUTS:
        got = ranks[0][name]
        assert got[1] == pytest.approx(want, rel=1e-5), name
        assert got[2] == pytest.approx(ref[2], rel=1e-5), name  # and the fresh optimizer agrees
        assert ranks[1][name] == got


def _greedy_hf(out: Path, prompt: str, n: int) -> list[int]:
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    eos = pipe.model.generation_config.eos_token_id
    res = pipe(prompt, do_sample=False, max_new_tokens=n, return_tensors=True)
    ids = [int(i) for i in res[0]["generated_token_ids"]]
    prompt_ids = pipe.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    new = ids[len(prompt_ids) :]
    return new[:-1] if new and new[-1] == eos else new


def _greedy_ours(run: Path, prompt: str, n: int, capsys) -> list[int]:
    ckpt = resolve_checkpoint(run)
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    tok = tok or load_tokenizer(ckpt / "tokenizer.model")
    model = load_model(ckpt)
    new = generate(model, tok.encode(prompt), n, temperature=0.0, stop_id=tok.eod_id)
    new = [t for t in new if t != tok.eod_id]
    # and the command prints the same continuation
    argv = ["generate", str(run), "--prompt", prompt, "--temperature", "0"]
    capsys.readouterr()
    assert main([*argv, "--max-new-tokens", str(n)]) == 0
    assert capsys.readouterr().out == prompt + tok.decode(new) + "\n"
    return new


def test_import_train_export_round_trip(imported: Path, docs: Path, tmp_path: Path, capsys):
    # generate works on the import itself
    assert len(_greedy_ours(imported, PROMPT, 6, capsys)) > 0
    run, out = tmp_path / "run", tmp_path / "hf"
    cfg = _cfg(imported, run, "data.source=files", f"data.paths=[{docs}]", "train.max_steps=20")
    result = Trainer(cfg).train()
    assert result.losses[20] < result.losses[1] - 0.5  # it trained on the text
    assert (run / "tokenizer/tokenizer.json").is_file()
    assert (run / "checkpoints/step_20/tokenizer/tokenizer_config.json").is_file()
    assert main(["export-hf", str(run), str(out)]) == 0
    hf_cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (hf_cfg["eos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 0, 2)
    ours = load_tokenizer(run / "tokenizer")
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS[:3] + ["  x\n\n\t y  ", "café 漢字 🐍"]:
        ids = auto(text, add_special_tokens=True)["input_ids"]
        assert ids == ours.encode(text)
        assert auto.decode(ids) == text
    assert auto.eos_token_id == 0
    hf_new = _greedy_hf(out, PROMPT, 16)
    assert len(hf_new) > 3
    assert hf_new == _greedy_ours(run, PROMPT, 16, capsys)


def test_sentencepiece_run_exports_an_hf_tokenizer(docs: Path, tmp_path: Path, capsys) -> None:
    files = default_corpus_files()[::40][:30]
    model = train_tokenizer(files, tmp_path / "sp", VOCAB, seed=0)
    run, out = tmp_path / "run", tmp_path / "hf"
    cfg = load_config(
        [str(Path(__file__).parents[2] / "configs/models/tiny/llama.yaml")],
        [
            *TRAIN,
            "data.source=files",
            f"data.paths=[{docs}]",
            f"data.tokenizer={model}",
            f"model.vocab_size={VOCAB}",
            "train.max_steps=2",
            f"run.output_dir={run}",
        ],
    )
    Trainer(cfg).train()
    assert main(["export-hf", str(run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    sp = load_tokenizer(model)
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    samples = [p.read_text(encoding="utf-8") for p in default_corpus_files()[5::61][:12]]
    samples += ["\tdef f():\n\n        return  1  \n", "  lead", "trail  ", "café 漢字 🐍 \x00"]
    n_tokens = 0
    for text in samples:
        ids = auto(text, add_special_tokens=True)["input_ids"]
        assert ids == sp.encode(text)
        assert auto.decode(ids) == text
        n_tokens += len(ids)
    assert n_tokens > 20_000
    assert _greedy_hf(out, PROMPT, 8) == _greedy_ours(run, PROMPT, 8, capsys)


def test_import_tokenizer_errors_and_generation_config_eos(hf_llama: Path, tmp_path: Path, capsys):
    # a corrupt tokenizer.json: one line naming the user's file, exit status 2
    bad = tmp_path / "bad"
    shutil.copytree(hf_llama, bad)
    (bad / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    assert main(["import-hf", str(bad), str(tmp_path / "out-bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad / 'tokenizer.json'} is not a HuggingFace" in err
    # no eos in the tokenizer itself: generation_config.json's eos_token_id becomes data.eod_id
    noeos = tmp_path / "noeos"
    shutil.copytree(hf_llama, noeos)
    data = json.loads((noeos / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        t["content"] = t["content"].replace("<|endoftext|>", "<|doc|>")
    data["model"]["vocab"] = {
        k.replace("<|endoftext|>", "<|doc|>"): v for k, v in data["model"]["vocab"].items()
    }
    (noeos / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((noeos / "tokenizer_config.json").read_text())
    (noeos / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    gen = json.loads((noeos / "generation_config.json").read_text())
    (noeos / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [0, 1]}))
    out = tmp_path / "out"
    assert main(["import-hf", str(noeos), str(out)]) == 0
    assert load_config([str(out / "config.yaml")]).data.eod_id == 0
