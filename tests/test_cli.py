"""The command line as a user meets it: one clear error line, exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from evoformer.cli import COMMANDS, main
from tests.conftest import REPO

TINY = str(REPO / "configs/models/tiny/llama.yaml")


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "evoformer", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=300,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [oops\n")
    (tmp_path / "empty.txt").write_text("")
    out = f"run.output_dir={tmp_path / 'run'}"
    cases = [
        (["train", str(tmp_path / "missing.yaml")], "config file not found"),
        (["train", str(tmp_path / "bad.yaml")], "invalid YAML"),
        (["train", TINY, "train.max_step=3"], "did you mean 'train.max_steps'"),
        (["train", TINY, "train.max_steps=lots"], "bad value for 'train.max_steps'"),
        (
            ["train", TINY, "data.source=files", f"data.paths=[{tmp_path}/nope.txt]", out],
            "nope.txt",
        ),
        (
            [
                "train",
                TINY,
                "data.source=files",
                f"data.paths=[{tmp_path}/empty.txt]",
                "data.tokenizer=" + str(tmp_path / "none.model"),
                out,
            ],
            "none.model",
        ),
        (["generate", str(tmp_path)], "is not a checkpoint"),
        (["bogus"], "unknown command 'bogus'"),
    ]
    for args, fragment in cases:
        assert_clean_error(run_cli(*args), fragment)


def test_help_lists_config_keys():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    assert (
        "train.global_batch_size" in proc.stdout and "Sequences per optimizer step" in proc.stdout
    )


def _exit_status(argv: list[str]) -> int:
    """``evoformer ARGV`` in this process (argparse ends ``--help`` with SystemExit)."""
    try:
        return main(argv)
    except SystemExit as done:
        return int(done.code or 0)


@pytest.mark.parametrize(
    "argv",
    [[name, "--help"] for name in sorted(COMMANDS)]
    + [["tokenizer", "train", "--help"], ["--help"]],
)
def test_every_command_has_help(argv, capsys):
    assert _exit_status(argv) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: evoformer"), out
    assert "error" not in out.err


def test_generate_help_shows_defaults(capsys):
    _exit_status(["generate", "--help"])
    assert "(default: 0.8)" in capsys.readouterr().out


def test_no_file_means_the_quickstart_for_every_config_command(capsys):
    for command in ("inspect", "config"):
        assert _exit_status([command]) == 0
        bare = capsys.readouterr().out
        assert _exit_status([command, "configs/quickstart.yaml"]) == 0
        assert bare == capsys.readouterr().out


def test_train_then_generate_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        TINY,
        "data.source=default",
        "data.tokenizer_vocab_size=512",
        "model.vocab_size=512",
        "train.max_steps=4",
        "train.seq_len=32",
        "train.log_every=2",
        f"run.output_dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "step      4/4" in proc.stdout
    assert (out / "checkpoints/step_4/tokenizer.model").is_file()
    args = [
        "generate",
        str(out),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]
    cached, plain = run_cli(*args), run_cli(*args, "--no-cache")
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.startswith("def ") and len(cached.stdout) > 5
    assert cached.stdout == plain.stdout


@pytest.mark.parametrize("cmd", [["config", TINY, "train.seq_len=64"], ["inspect", TINY]])
def test_config_and_inspect(cmd):
    proc = run_cli(*cmd)
    assert proc.returncode == 0, proc.stderr
    if cmd[0] == "config":
        assert "seq_len: 64" in proc.stdout
    else:
        assert "158,016 total" in proc.stdout


def test_tokenizer_preprocess_and_train_on_files(tmp_path):
    src = tmp_path / "docs.jsonl"
    lib = [p for p in (REPO / "evoformer").rglob("*.py")]
    src.write_text("".join(__import__("json").dumps({"text": p.read_text()}) + "\n" for p in lib))
    proc = run_cli(
        "tokenizer", "train", str(src), "--out", str(tmp_path / "tok"), "--vocab-size", "400"
    )
    assert proc.returncode == 0, proc.stderr
    model = tmp_path / "tok.model"
    assert model.is_file()
    store = tmp_path / "corpus"
    proc = run_cli("preprocess", str(src), "--tokenizer", str(model), "--out", str(store))
    assert proc.returncode == 0, proc.stderr
    shard = store / "shard-00000.tok"
    assert shard.stat().st_size > 1000 and (store / "index.json").is_file()
    out = tmp_path / "run"
    base = [
        TINY,
        "data.source=files",
        f"data.paths=[{store}]",
        "train.seq_len=32",
        "train.max_steps=2",
        f"run.output_dir={out}",
    ]
    proc = run_cli("train", *base)
    assert proc.returncode == 0, proc.stderr
    # An empty corpus is refused with one line.
    (tmp_path / "empty.txt").write_text("")
    empty = [
        "data.source=files",
        f"data.paths=[{tmp_path / 'empty.txt'}]",
        f"data.tokenizer={model}",
        f"run.output_dir={tmp_path / 'run2'}",
    ]
    proc = run_cli("train", TINY, "train.seq_len=32", *empty)
    assert_clean_error(proc, "empty.txt")
    # A truncated token store too.
    shard.write_bytes(shard.read_bytes()[:-64])
    proc = run_cli("train", *base[:-1], f"run.output_dir={tmp_path / 'run3'}")
    assert_clean_error(proc, "shard-00000.tok")


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "evoformer",
            "train",
            TINY,
            "data.source=synthetic",
            "train.seq_len=32",
            "train.max_steps=100000",
            "train.log_every=1",
            f"run.output_dir={out}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step ") and "/100000" in line and "step      3/" in line:
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    latest = (out / "checkpoints/latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert step >= 3
    resumed = run_cli(
        "train",
        TINY,
        "data.source=synthetic",
        "train.seq_len=32",
        f"train.max_steps={step + 2}",
        f"run.output_dir={out}",
        "checkpoint.load=auto",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / latest} at step {step}" in resumed.stdout


def test_inspect_and_plan_size_a_preset_at_its_context_in_bf16(capsys):
    """A preset that names no training length or precision is sized at model.max_seq_len in
    bf16 (not the CPU test defaults, 256 tokens in fp32); what the config says wins."""
    preset = "configs/models/llama3-8b.yaml"
    assert _exit_status(["inspect", preset]) == 0
    out = capsys.readouterr().out
    assert "sized at seq_len = model.max_seq_len in bf16" in out
    assert "FLOPs/token training (seq 8192)" in out
    assert _exit_status(["inspect", preset, "train.seq_len=1024", "precision=fp32"]) == 0
    out = capsys.readouterr().out
    assert "sized at" not in out and "(seq 1024)" in out
    assert _exit_status(["plan", preset, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "precision bf16" in out and "seq 8192" in out
    assert _exit_status(["inspect"]) == 0  # the quickstart says fp32 and 256 itself
    assert "sized at" not in capsys.readouterr().out
