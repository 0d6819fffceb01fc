"""`evoformer plot`: a PNG of runs' metrics, one line per run in every panel, MoE expert load
where logged, and one-line errors (exit 2) for what is not a run folder."""

from __future__ import annotations

import json
import sys

import pytest

from evoformer import cli
from evoformer.errors import UserError
from evoformer.plot import PANELS, make_figure, read_runs

pytest.importorskip("matplotlib")


def _write_run(path, steps=6, mfu=True, moe_experts=0, val=True):
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {
            "step": s,
            "loss": 6.0 - 0.3 * s,
            "lr": 1e-3 * s / steps,
            "grad_norm": 1.0 / s,
            "tokens_per_s": 1000.0 + s,
            "tokens": 256 * s,
        }
        if mfu:
            rec["mfu"] = 0.4
        if moe_experts:
            share = [1 / moe_experts] * moe_experts
            rec |= {"moe/L1/share": share, "moe/L1/max_over_mean": 1.0, "moe/L2/share": share}
        lines.append(rec)
        if val and s % 3 == 0:
            lines.append({"step": s, "val_loss": 6.1 - 0.3 * s})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _axes(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_runs_are_overlaid_one_line_each(tmp_path):
    a = _write_run(tmp_path / "a")
    b = _write_run(tmp_path / "b", steps=4, mfu=False, val=False)
    fig = make_figure(read_runs([a, b]))
    axes = _axes(fig)
    assert list(axes) == [title for title, _, _ in PANELS]
    labels = [line.get_label() for line in axes["loss vs step"].get_lines()]
    assert labels == ["a", "a val_loss", "b"]
    assert [line.get_label() for line in axes["loss vs tokens"].get_lines()] == labels
    for title in ("learning rate", "grad norm", "tokens/s"):
        assert [line.get_label() for line in axes[title].get_lines()] == ["a", "b"], title
    assert [line.get_label() for line in axes["MFU"].get_lines()] == ["a"]  # b logged none
    # the data are the metrics: loss of run b at its 4 steps, val_loss of a against tokens
    b_loss = axes["loss vs step"].get_lines()[2]
    assert list(b_loss.get_xdata()) == [1, 2, 3, 4]
    assert list(b_loss.get_ydata()) == pytest.approx([5.7, 5.4, 5.1, 4.8])
    val_tokens = axes["loss vs tokens"].get_lines()[1]
    assert list(val_tokens.get_xdata()) == [768, 1536]


def test_moe_runs_get_expert_load_panels(tmp_path):
    dense = _write_run(tmp_path / "dense")
    moe = _write_run(tmp_path / "moe", moe_experts=4)
    axes = _axes(make_figure(read_runs([dense, moe])))
    for layer in (1, 2):
        lines = axes[f"moe: layer {layer} expert load"].get_lines()
        assert len(lines) == 4 + 1  # one per expert, and the even share
        assert list(lines[0].get_xdata()) == list(range(1, 7))
        assert list(lines[-1].get_ydata()) == [0.25, 0.25]
    assert not any("dense: layer" in title for title in axes)


def test_the_command_writes_a_png(tmp_path, capsys):
    runs = [str(_write_run(tmp_path / name)) for name in ("a", "b")]
    out = tmp_path / "curves.png"
    assert cli.main(["plot", *runs, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (2 runs)"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 960)  # 12 x 9.6 inches (3 rows of panels) at 100 dpi


def test_same_named_runs_are_told_apart(tmp_path):
    runs = read_runs([_write_run(tmp_path / "x/run"), _write_run(tmp_path / "y/run")])
    assert [r.name for r in runs] == ["x/run", "y/run"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "is not a run folder (no such directory)"),
        (lambda p: p, "is not a run folder (no metrics.jsonl)"),
    ],
)
def test_a_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    assert cli.main(["plot", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: plot: ") and err[0].endswith(message)


def test_broken_metrics_and_missing_matplotlib_are_one_line(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:9: not JSON"):
        read_runs([run])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match=r"needs matplotlib: pip install 'evoformer\[plot\]'"):
        make_figure(read_runs([_write_run(tmp_path / "ok")]))
