"""Per-layer expert-load plot from a run's ``metrics.jsonl`` (MoE models).

One panel per MoE layer: each expert's share of the layer's routed token copies at every
logged step (``moe/L<i>/share``), one line per expert, with the even share 1/E dashed; the
panel title gives the last step's max/mean load and, with a capacity limit, the dropped copies.
Written as a self-contained SVG (no plotting dependency), viewable in any browser;
`evoformer plot RUN_DIR` draws the same panels (with matplotlib) beside the loss curves.

    python tools/plot_expert_load.py RUN_DIR/metrics.jsonl [-o expert_load.svg]
"""

from __future__ import annotations

import argparse
import json
import sys
from html import escape
from pathlib import Path

from evoformer import plot

PANEL_W, PANEL_H, MARGIN = 640, 200, 48
# Tableau 10: distinguishable lines for up to 10 experts, then repeating.
COLOURS = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]


def read_loads(path: Path) -> dict[int, dict]:
    """``{layer: {"steps": [...], "share": [[per expert] per step], "last": {metric: value}}}``
    from the training lines of ``metrics.jsonl`` (``evoformer.plot.read_loads``)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return plot.read_loads(records)


def render_svg(layers: dict[int, dict], title: str = "") -> str:
    """The SVG document: one ``<g class="panel">`` per layer, one ``<polyline class="series">``
    per expert."""
    height = MARGIN + len(layers) * (PANEL_H + MARGIN)
    width = PANEL_W + 2 * MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{MARGIN}" y="{MARGIN // 2}" font-size="14">{escape(title)}</text>',
    ]
    for i, (layer, data) in enumerate(layers.items()):
        top = MARGIN + i * (PANEL_H + MARGIN)
        steps, shares = data["steps"], data["share"]
        n_experts = len(shares[0]) if shares else 0
        y_max = max([max(s) for s in shares] + [1e-9]) * 1.1
        lo, hi = steps[0], max(steps[-1], steps[0] + 1)

        def xy(step, share, top=top, lo=lo, hi=hi, y_max=y_max):
            x = MARGIN + (step - lo) / (hi - lo) * PANEL_W
            y = top + PANEL_H - share / y_max * PANEL_H
            return f"{x:.1f},{y:.1f}"

        last = data["last"]
        note = f"max/mean {last.get('max_over_mean', float('nan')):.2f}"
        if "dropped_tokens" in last:
            note += f", dropped {last['dropped_tokens']}"
        out.append(f'<g class="panel" id="layer{layer}">')
        out.append(
            f'<rect x="{MARGIN}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" '
            'fill="none" stroke="#888"/>'
        )
        out.append(
            f'<text x="{MARGIN}" y="{top - 6}">layer {layer}: token share per expert '
            f"({n_experts} experts, steps {steps[0]}-{steps[-1]}; {note})</text>"
        )
        out.append(f'<text x="4" y="{top + 10}">{y_max:.2f}</text>')
        out.append(f'<text x="4" y="{top + PANEL_H}">0</text>')
        if n_experts:
            even = f"{xy(lo, 1 / n_experts)} {xy(hi, 1 / n_experts)}"
            out.append(
                f'<polyline class="even" points="{even}" fill="none" stroke="#000" '
                'stroke-dasharray="4 3"/>'
            )
        for e in range(n_experts):
            pts = " ".join(xy(step, share[e]) for step, share in zip(steps, shares))
            colour = COLOURS[e % len(COLOURS)]
            out.append(
                f'<polyline class="series" data-expert="{e}" points="{pts}" fill="none" '
                f'stroke="{colour}" stroke-width="1.5"><title>expert {e}</title></polyline>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    ap.add_argument("-o", "--out", type=Path, default=Path("expert_load.svg"))
    args = ap.parse_args(argv)
    if not args.metrics.is_file():
        print(f"error: {args.metrics} not found", file=sys.stderr)
        return 1
    layers = read_loads(args.metrics)
    if not layers:
        print(
            f"error: {args.metrics} has no moe/L<i>/share metrics (not an MoE run?)",
            file=sys.stderr,
        )
        return 1
    args.out.write_text(render_svg(layers, f"expert load: {args.metrics}"))
    print(f"wrote {args.out} ({len(layers)} MoE layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
