"""The workflow's rule graph: ``snakemake --rulegraph`` parsed, laid out and drawn without graphviz.

Also the helpers that run this environment's snakemake (:func:`snakemake_command`), for the
rule graph's dot text (:func:`rulegraph_dot`) and the HTML report (:func:`build_report`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import hsv_to_rgb
from matplotlib.patches import FancyArrowPatch
from matplotlib.path import Path as MplPath

from .style import figure_style, new_figure

NODE = re.compile(r'^\s*(\d+)\s*\[\s*label\s*=\s*"([^"]*)"(?:\s*,\s*color\s*=\s*"([^"]*)")?')
EDGE = re.compile(r"^\s*(\d+)\s*->\s*(\d+)")


def snakemake_command(*args: str, workdir: Path | str = ".") -> subprocess.CompletedProcess:
    """Run this environment's snakemake with ``args`` in ``workdir``; raise with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"snakemake {' '.join(args)} failed in {workdir}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def rulegraph_dot(
    snakefile: Path | str, config: Mapping | None = None, workdir: Path | str = "."
) -> str:
    """The dot text of ``snakemake --rulegraph`` for ``snakefile`` under ``config`` (the running config).

    Runs without the working-directory lock (``--nolock``): it only reads the DAG, and the
    workflow that asks for it holds the lock.
    """
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "--snakefile",
            str(Path(snakefile).resolve()),
            "--rulegraph",
            "--nolock",
            "--cores",
            "1",
        ]
        if config is not None:
            path = Path(tmp) / "config.json"
            path.write_text(json.dumps(dict(config), default=str))
            args += ["--configfile", str(path)]
        out = snakemake_command(*args, workdir=workdir).stdout
    start, end = out.find("digraph"), out.rfind("}")
    if start < 0 or end < start:
        raise RuntimeError(f"snakemake --rulegraph printed no graph:\n{out[-2000:]}")
    return out[start : end + 1] + "\n"


def build_report(report: Path | str, *snakemake_args: str, workdir: Path | str = ".") -> Path:
    """``snakemake --report report`` (a self-contained HTML file) with extra arguments such as ``--configfile``.

    Run it after the workflow: the report collects the figures and tables that exist. The
    rules read ``workflow.cores`` when parsed, so ``--cores 1`` is added unless given.
    """
    report = Path(report).resolve()
    args = list(snakemake_args)
    if not any(a.startswith("--cores") or a.startswith("-c") for a in args):
        args += ["--cores", "1"]
    snakemake_command("--report", str(report), *args, workdir=workdir)
    if not report.is_file() or report.stat().st_size == 0:
        raise RuntimeError(f"snakemake --report did not write {report}")
    return report


def parse_rulegraph(dot: str) -> tuple[dict[str, tuple[str, str | None]], list[tuple[str, str]]]:
    """Nodes ``{id: (label, colour)}`` and edges ``[(src, dst)]`` of ``snakemake --rulegraph``'s dot text."""
    nodes, edges = {}, []
    for line in dot.splitlines():
        if match := EDGE.match(line):
            edges.append((match[1], match[2]))
        elif match := NODE.match(line):
            nodes[match[1]] = (match[2], match[3])
    if not nodes:
        raise ValueError(
            "no nodes in the rule graph: is this the output of `snakemake --rulegraph`?"
        )
    return nodes, edges


def layered_layout(
    nodes: Iterable[str], edges: Sequence[tuple[str, str]], sweeps: int = 6
) -> dict[str, tuple[int, float]]:
    """``{node: (layer, position)}``: layer = longest path from a source, order by barycentre sweeps.

    A small Sugiyama-style layout (no graphviz needed); raises on a cycle.
    """
    nodes = list(dict.fromkeys(nodes))
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    succs: dict[str, list[str]] = {n: [] for n in nodes}
    for src, dst in edges:
        if src in preds and dst in preds:
            succs[src].append(dst)
            preds[dst].append(src)
    # Kahn's topological order, then longest-path layering
    indegree = {n: len(preds[n]) for n in nodes}
    ready = [n for n in nodes if indegree[n] == 0]
    layer: dict[str, int] = {}
    while ready:
        node = ready.pop(0)
        layer[node] = max((layer[p] + 1 for p in preds[node]), default=0)
        for nxt in succs[node]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if len(layer) != len(nodes):
        raise ValueError(f"the rule graph has a cycle through {sorted(set(nodes) - set(layer))}")
    for node in nodes:  # sources sit just before their first consumer: shorter edges
        if not preds[node] and succs[node]:
            layer[node] = min(layer[s] for s in succs[node]) - 1
    layers: dict[int, list[str]] = {}
    for node in nodes:
        layers.setdefault(layer[node], []).append(node)
    pos = {n: float(i) for members in layers.values() for i, n in enumerate(members)}
    for sweep in range(sweeps):
        downward = sweep % 2 == 0
        for k in sorted(layers, reverse=not downward):
            neighbours = preds if downward else succs
            bary = {
                n: np.mean([pos[m] for m in neighbours[n]]) if neighbours[n] else pos[n]
                for n in layers[k]
            }
            layers[k].sort(key=lambda n: bary[n])
            for i, n in enumerate(layers[k]):
                pos[n] = float(i)
    widest = max(len(m) for m in layers.values())  # centre every layer on the widest one
    return {n: (layer[n], pos[n] + (widest - len(layers[layer[n]])) / 2) for n in nodes}


def rulegraph_figure(dot: str, title: str = "Rule graph of the workflow (snakemake --rulegraph)"):
    """The rule graph drawn left to right (inputs on the left, ``all`` on the right), without graphviz."""
    nodes, edges = parse_rulegraph(dot)
    layout = layered_layout(nodes, edges)
    n_layers = max(lay for lay, _ in layout.values()) + 1
    widest = max(sum(1 for lay, _ in layout.values() if lay == k) for k in range(n_layers))
    # Columns as wide as their longest label (inches at 8.5 pt), with room for the edges between them.
    char_in, gap_in, row_in = 0.072, 0.75, 0.36
    col_w = [
        char_in * max((len(lab) for n, (lab, _) in nodes.items() if layout[n][0] == k), default=4)
        + 0.25
        for k in range(n_layers)
    ]
    centre = np.cumsum(
        [0.0, *[(col_w[k] + col_w[k + 1]) / 2 + gap_in for k in range(n_layers - 1)]]
    )
    width_in = float(centre[-1] + (col_w[0] + col_w[-1]) / 2) + 0.3
    height_in = row_in * widest + 0.3
    with figure_style():
        # A fixed axes box in inches (no constrained layout): box extents measured in data units stay valid when saved.
        fig = new_figure(figsize=(max(width_in, 4.0), height_in + 0.45), layout="none")
        ax = fig.add_axes((0, 0, 1, height_in / (height_in + 0.45)))
        ax.set_axis_off()
        ax.set_xlim(-(col_w[0] / 2 + 0.15), max(width_in, 4.0) - (col_w[0] / 2 + 0.15))
        ax.set_ylim(
            row_in * (widest - 0.5) + 0.15, -(row_in * 0.5 + 0.15)
        )  # the canvas, in inches: all nodes inside
        fig.suptitle(title, y=1 - 0.1 / (height_in + 0.45), va="top")
        texts = {}
        for node, (label, color) in nodes.items():
            lay, y = layout[node]
            rgb = (
                hsv_to_rgb([float(v) for v in color.split()])
                if color and len(color.split()) == 3
                else (0.3, 0.3, 0.3)
            )
            texts[node] = ax.text(
                centre[lay],
                row_in * y,
                label,
                ha="center",
                va="center",
                fontsize=8.5,
                zorder=3,
                bbox={
                    "boxstyle": "round,pad=0.3",
                    "facecolor": "white",
                    "edgecolor": rgb,
                    "linewidth": 1.8,
                },
            )
        fig.canvas.draw()
        to_data = ax.transData.inverted()
        boxes = {
            n: t.get_bbox_patch().get_window_extent().transformed(to_data) for n, t in texts.items()
        }
        for src, dst in edges:
            if src not in boxes or dst not in boxes:
                continue
            a, b = boxes[src], boxes[dst]
            x0, y0 = a.x1, (a.y0 + a.y1) / 2
            x1, y1 = b.x0, (b.y0 + b.y1) / 2
            bend = 0.45 * (x1 - x0)  # horizontal tangents at both ends: a smooth S from box to box
            path = MplPath(
                [(x0, y0), (x0 + bend, y0), (x1 - bend, y1), (x1, y1)],
                [MplPath.MOVETO] + [MplPath.CURVE4] * 3,
            )
            ax.add_patch(
                FancyArrowPatch(
                    path=path,
                    arrowstyle="-|>",
                    mutation_scale=8,
                    color="0.5",
                    lw=0.8,
                    alpha=0.6,
                    zorder=1,
                )
            )
    return fig
