"""``evoformer plot RUN_DIR [RUN_DIR ...] [--out FILE.png]``: a run's curves in one PNG.

Reads each run's ``metrics.jsonl`` (training lines: ``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``tokens``, ``mfu``; eval lines: ``step``, ``val_loss``) and draws, with the runs
overlaid under their names: loss and val_loss against steps and against tokens, the learning
rate, the gradient norm, tokens/s and MFU; then, for each MoE run, one panel per MoE layer with
each expert's share of the routed tokens over the steps (``moe/L<i>/share``, the even share
dashed: what ``tools/plot_expert_load.py`` draws as SVG). matplotlib (the ``plot`` extra) draws
off-screen (Agg); ``make_figure`` returns the figure before it is saved, for tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evoformer.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SHARE = re.compile(r"^moe/L(\d+)/share$")
# (panel title, x key, y key): the metric panels, in order; val_loss joins the loss panels.
PANELS = [
    ("loss vs step", "step", "loss"),
    ("loss vs tokens", "tokens", "loss"),
    ("learning rate", "step", "lr"),
    ("grad norm", "step", "grad_norm"),
    ("tokens/s", "step", "tokens_per_s"),
    ("MFU", "step", "mfu"),
]


@dataclass
class Run:
    """One run folder's metrics: its training and eval lines, oldest first."""

    name: str
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def series(self, x: str, y: str, lines: str = "train") -> tuple[list, list]:
        rows = self.train if lines == "train" else self.evals
        pts = [(r[x], r[y]) for r in rows if x in r and isinstance(r.get(y), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    def tokens_at(self, step: int) -> float | None:
        """Tokens seen by ``step`` (from the training lines), for val_loss against tokens."""
        per_step = next((r["tokens"] / r["step"] for r in self.train if r.get("tokens")), None)
        return None if per_step is None else per_step * step


def read_run(path: str | Path) -> Run:
    """The metrics of the run folder ``path``; one-line UserError when it is not one."""
    p = Path(path)
    metrics = p / "metrics.jsonl"
    if not p.is_dir():
        raise UserError(f"plot: {p} is not a run folder (no such directory)")
    if not metrics.is_file():
        raise UserError(f"plot: {p} is not a run folder (no metrics.jsonl)")
    run = Run(p.resolve().name, p)
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"plot: {metrics}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            continue
        if "loss" in record:
            run.train.append(record)
        elif "val_loss" in record:
            run.evals.append(record)
    if not run.train:
        raise UserError(f"plot: {metrics} has no training lines (step and loss)")
    return run


def read_runs(paths: list[str | Path]) -> list[Run]:
    runs = [read_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:  # the same folder name twice: say which parent each is in
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    return runs


def read_loads(records: list[dict[str, Any]]) -> dict[int, dict]:
    """``{layer: {"steps": [...], "share": [[per expert] per step], "last": {metric: value}}}``
    from training lines carrying ``moe/L<i>/share`` (MoE runs)."""
    layers: dict[int, dict] = {}
    for rec in records:
        for key, value in rec.items():
            m = SHARE.match(key)
            if not m:
                continue
            layer = layers.setdefault(int(m.group(1)), {"steps": [], "share": [], "last": {}})
            layer["steps"].append(rec["step"])
            layer["share"].append(value)
            prefix = f"moe/L{m.group(1)}/"
            layer["last"] = {k[len(prefix) :]: v for k, v in rec.items() if k.startswith(prefix)}
    return dict(sorted(layers.items()))


def make_figure(runs: list[Run]) -> Figure:
    """The figure (not yet saved): the metric panels, one line per run in each (plus a dashed
    val_loss line per run in the loss panels), then the expert-load panels of MoE runs. Each
    axes' title names its panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # off-screen: no display on a cluster node
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "evoformer plot needs matplotlib: pip install 'evoformer[plot]' (or matplotlib)"
        ) from None
    moe = [(run, layer, data) for run in runs for layer, data in read_loads(run.train).items()]
    cols = 2
    rows = -(-len(PANELS) // cols) + -(-len(moe) // cols)
    fig = Figure(figsize=(12, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, x, y) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel(x)
        for run, colour in zip(runs, colours):
            xs, ys = run.series(x, y)
            if xs:
                ax.plot(xs, ys, color=colour, label=run.name, linewidth=1.2)
            if y == "loss" and run.evals:
                steps, vals = run.series("step", "val_loss", "evals")
                if x == "tokens":
                    steps = [run.tokens_at(s) for s in steps]
                if steps and None not in steps:
                    style = {"linestyle": "--", "marker": "o", "markersize": 3}
                    ax.plot(steps, vals, color=colour, label=f"{run.name} val_loss", **style)
        if y in ("lr", "grad_norm", "mfu") or ax.get_lines():
            ax.set_ylabel(y)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {y} logged", ha="center", va="center", transform=ax.transAxes)
    for ax, (run, layer, data) in zip(axes[len(PANELS) :], moe):
        n_experts = len(data["share"][0]) if data["share"] else 0
        ax.set_title(f"{run.name}: layer {layer} expert load")
        ax.set_xlabel("step")
        ax.set_ylabel("share of routed tokens")
        for e in range(n_experts):
            ax.plot(data["steps"], [s[e] for s in data["share"]], linewidth=1.0)
        if n_experts:
            ax.axhline(1 / n_experts, color="black", linestyle="--", linewidth=0.8)
    for ax in axes[len(PANELS) + len(moe) :]:
        ax.set_visible(False)
    return fig


def plot(paths: list[str | Path], out: str | Path) -> Path:
    """Write the PNG of the runs at ``paths`` to ``out``; returns ``out``."""
    fig = make_figure(read_runs(paths))
    out = Path(out)
    try:
        fig.savefig(out, dpi=100)
    except OSError as err:
        raise UserError(f"plot: cannot write {out}: {err.strerror}") from None
    return out


def main(argv: list[str]) -> int:
    """``evoformer plot RUN_DIR [RUN_DIR ...] [--out FILE.png]``; returns the exit status."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="evoformer plot",
        description="Draw runs' loss, val_loss, lr, grad norm, tokens/s, MFU (and MoE expert "
        "load) from their metrics.jsonl into one PNG, runs overlaid.",
    )
    parser.add_argument("run_dirs", nargs="+", help="run folders (run.output_dir)")
    parser.add_argument("--out", default="plot.png", help="PNG to write (default: plot.png)")
    args = parser.parse_args(argv)
    out = plot(args.run_dirs, args.out)
    print(f"wrote {out} ({len(args.run_dirs)} run{'s' if len(args.run_dirs) > 1 else ''})")
    return 0
