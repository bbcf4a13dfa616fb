"""Representational similarity (CKA) of the frozen and the adapted encoder (LoRA, DoRA, full
fine-tuning).

The aggregated ``cka`` table is melted (``metric`` = ``value``, ``null_mean``, ``null_q95``,
``ci_low``, ``ci_high``; the last four only on the same-layer rows); a table without
``metric`` (one value per row, as before the statistics) still draws, with the ± std band.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .contributions import grid_shape, legend_under
from .style import (
    DEPTH_LABEL,
    annotate_cells,
    band,
    collect_legend,
    empty_panel,
    figure_style,
    lora_methods,
    method_colors,
    method_label,
    model_title,
    new_figure,
    rows,
)

CKA_KINDS = {"linear": "linear CKA", "debiased": "debiased linear CKA", "rbf": "RBF CKA"}
NULL_COLOR = "0.45"


def _metric(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of one metric of the melted table (all rows of an unmelted one for ``value``)."""
    if "metric" not in table.columns:
        return table if metric == "value" else table.iloc[:0]
    return table[table["metric"] == metric]


def _same_layer(table: pd.DataFrame, metric: str) -> pd.Series:
    """Mean over folds of ``metric`` on the diagonal, indexed by depth (sorted)."""
    sel = _metric(table, metric)
    sel = sel[sel["layer_frozen"] == sel["layer_lora"]]
    return sel.groupby("depth_frozen")["mean"].mean().sort_index()


def _diagonal_panel(ax, table: pd.DataFrame, methods, colors) -> None:
    """Observed CKA per method (line, fold std as error bars) in its speaker band (shaded),
    and the permutation null's 95th percentile (dashed grey, the highest over methods)."""
    null = []
    for method in methods:
        sel = rows(table, method=method)
        value = _metric(sel, "value")
        value = value[value["layer_frozen"] == value["layer_lora"]].sort_values("depth_frozen")
        if value.empty:
            continue
        low, high = _same_layer(sel, "ci_low"), _same_layer(sel, "ci_high")
        label = f"frozen vs {method_label(method)}"
        if low.empty or high.empty:  # no speaker band: the old ± std over folds
            band(
                ax,
                value.rename(columns={"depth_frozen": "depth"}),
                color=colors[method],
                label=label,
            )
        else:
            xs = value["depth_frozen"].to_numpy(float)
            mean = value["mean"].to_numpy(float)
            std = value["std"].to_numpy(float) if "std" in value else np.full_like(mean, np.nan)
            ax.errorbar(
                xs,
                mean,
                yerr=np.where(np.isfinite(std), std, 0.0),
                color=colors[method],
                marker="o",
                markersize=3.5,
                lw=1.5,
                elinewidth=0.8,
                capsize=0,
                label=label,
            )
            both = low.index.intersection(high.index)
            ax.fill_between(
                both.to_numpy(float),
                low[both].to_numpy(float),
                high[both].to_numpy(float),
                color=colors[method],
                alpha=0.18,
                lw=0,
            )
        q95 = _same_layer(sel, "null_q95")
        if not q95.empty:
            null.append(q95)
    if null:
        line = pd.concat(null, axis=1).max(axis=1).sort_index()
        ax.plot(
            line.index.to_numpy(float),
            line.to_numpy(float),
            color=NULL_COLOR,
            ls="--",
            lw=1.3,
            label="permutation null, 95th percentile"
            + (" (highest over methods)" if len(null) > 1 else ""),
        )


def _seed_floor(ax, floor: pd.DataFrame | None, kind: str, methods, colors) -> bool:
    """CKA between two seeds of the same LoRA method (``seed_floor``), dotted per method."""
    if floor is None or "measure" not in floor or kind not in ("linear", "debiased"):
        return False
    sel = floor[(floor["measure"] == f"cka_{kind}")]
    if "metric" in sel:
        sel = sel[sel["metric"] == "value"]
    drawn = False
    for method in methods:
        line = rows(sel, method=method).sort_values("depth")
        if line.empty:
            continue
        ax.plot(
            line["depth"].to_numpy(float),
            line["mean"].to_numpy(float),
            color=colors[method],
            ls=":",
            lw=1.6,
            label="seed-to-seed floor (same method, another seed)",
        )
        drawn = True
    return drawn


def _heat_title(method: str) -> str:
    """'frozen vs LoRA r = 8' on one line, or the label's parenthesis on a second one."""
    label = method_label(method)
    head, sep, rest = label.partition(" (")
    return f"frozen vs {head}" + (f"\n({rest}" if sep else "")


def cka_figure(cka: pd.DataFrame, model: str, seed_floor: pd.DataFrame | None = None):
    """Frozen vs adapted encoder: CKA of the same layer (top, per CKA kind) and all layer pairs
    (bottom, linear CKA, a heat map per method, at most four a row); dotted where
    ``seed_floor`` has them: CKA between two seeds of the same method, which a
    frozen-vs-adapted difference must exceed to be more than reseeding."""
    table = rows(cka, model=model)
    floor = rows(seed_floor, model=model) if seed_floor is not None else None
    has_floor = False
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    kinds = [k for k in CKA_KINDS if k in set(table["kind"])]
    n_rows, n_cols = grid_shape(len(ranks), 4)
    top_h = 4.3 + 0.2 * -(-len(ranks) // 3)
    bottom_h = 0.6 + 3.5 * n_rows
    with figure_style():
        fig = new_figure(
            figsize=(max(12.5, 3.5 * n_cols + 1.5, 4.2 * max(len(kinds), 1)), top_h + bottom_h)
        )
        top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])
        ax_top = top.subplots(1, max(len(kinds), 1), squeeze=False, sharey=False)[0]
        has_band = not _metric(table, "ci_low").empty
        for ax, kind in zip(ax_top, kinds, strict=False):
            _diagonal_panel(ax, rows(table, kind=kind), ranks, colors)
            has_floor |= _seed_floor(ax, floor, kind, ranks, colors)
            ax.axhline(1, color="0.5", lw=0.8, ls=":")
            ax.set_title(f"{CKA_KINDS[kind]}, same layer")
            ax.set_xlabel(DEPTH_LABEL)
        ax_top[0].set_ylabel("CKA(frozen layer ℓ, adapted layer ℓ)\n(1 = same representation)")
        if not kinds:
            empty_panel(ax_top[0], "no adapted runs (LoRA, DoRA, full fine-tuning)")
        handles, labels = collect_legend(ax_top)
        # the seed-to-seed floor is dotted in each method's colour: one grey entry says so
        handles = [
            Line2D([], [], color="0.3", ls=":", lw=1.6) if lab.startswith("seed-to-seed") else h
            for h, lab in zip(handles, labels, strict=True)
        ]
        labels = [
            f"dotted, in the method's colour: {lab}" if lab.startswith("seed-to-seed") else lab
            for lab in labels
        ]
        # methods first, then how to read them: the band, the null line
        order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("permutation"))
        handles, labels = [handles[i] for i in order], [labels[i] for i in order]
        if handles and has_band:
            at = next((i for i, lab in enumerate(labels) if lab.startswith("permutation")), None)
            at = len(labels) if at is None else at
            handles.insert(at, Patch(facecolor="0.5", alpha=0.3, lw=0))
            labels.insert(at, "speaker-bootstrap 95 % band (shaded), ± std over folds (bars)")
        if handles:
            legend_under(top, handles, labels, ncols=3)
        grid = bottom.subplots(n_rows, n_cols, squeeze=False)
        ax_bot = list(grid.ravel()[: max(len(ranks), 1)])
        for ax in grid.ravel()[len(ax_bot) :]:
            ax.remove()
        heat = rows(_metric(table, "value"), kind="linear")
        if len(heat):
            lo, hi = min(0.0, float(heat["mean"].min())), max(1.0, float(heat["mean"].max()))
        image = None
        for k, (ax, method) in enumerate(zip(ax_bot, ranks, strict=False)):
            ax.grid(False)
            sel = rows(heat, method=method)
            pairs = (
                sel.pivot(index="layer_frozen", columns="layer_lora", values="mean")
                .sort_index()
                .sort_index(axis=1)
            )
            values = pairs.to_numpy(float)
            image = ax.imshow(values, cmap="viridis", vmin=lo, vmax=hi, origin="lower")
            step = max(1, int(np.ceil(len(pairs.columns) / 9)))
            ax.set_xticks(
                range(0, len(pairs.columns), step), [str(int(v)) for v in pairs.columns[::step]]
            )
            ax.set_yticks(
                range(0, len(pairs.index), step), [str(int(v)) for v in pairs.index[::step]]
            )
            ax.set_xlabel("adapted encoder layer")
            if k % n_cols == 0:
                ax.set_ylabel("frozen encoder layer")
            ax.set_title(_heat_title(method), fontsize=9.5)
            if values.shape[0] <= 13:
                annotate_cells(ax, values, light_text=(values - lo) / (hi - lo) <= 0.6)
        if image is not None:
            bottom.colorbar(image, ax=ax_bot, label="linear CKA (0–1)", shrink=0.9)
            bottom.suptitle(
                "linear CKA of all layer pairs, frozen vs adapted encoder", fontsize=10.5
            )
        elif not ranks:
            empty_panel(ax_bot[0], "no adapted runs (LoRA, DoRA, full fine-tuning)")
        fig.suptitle(
            model_title(
                model,
                _metric(table, "value"),
                "representational similarity, frozen vs adapted encoder",
                "layer_frozen",
                "depth_frozen",
            )
            + "\nlayer 0 = embedding, layer L = final LayerNorm output"
            + (
                ""
                if has_floor
                else "; no seed-to-seed floor drawn (it needs two or more training seeds)"
            )
        )
    return fig
