"""What each block writes into the residual stream: per model, and across models on one depth axis.

The shaded area of a curve is the 95 % band from resampling test speakers within folds
(``band_low``, ``band_high`` of the aggregated table) where the table has it, else ± one std
over runs clipped to the range of the quantity; :func:`curve` draws either and says which,
:func:`shading_legend` names what was drawn in the legend (these helpers serve the lens
figures too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .style import (
    COMPONENT_TITLES,
    DEPTH_LABEL,
    FROZEN_COLOR,
    band,
    collect_legend,
    empty_panel,
    figure_style,
    fold_note,
    lora_methods,
    method_colors,
    method_label,
    method_order,
    n_layers,
    new_subplots,
    rows,
)

BAND = "band"  # the 95 % speaker band of the aggregated table
STD = "std"  # ± one std over runs (no speaker band)
SHADING_LABELS = {
    BAND: "shaded: 95 % band, resampling test speakers within folds",
    STD: "hatched: ± 1 std over runs (no speaker band)",
}
#: The range of each plotted quantity: a ± std band is clipped to it.
RANGES = {
    "norm_ratio": (0.0, None),
    "cosine": (-1.0, 1.0),
    "uar": (0.0, 1.0),
    "war": (0.0, 1.0),
    "agreement": (0.0, 1.0),
    "kl": (0.0, None),
    "fit_kl": (0.0, None),
    "dev_kl": (0.0, None),
    "entropy": (0.0, None),
}


def curve(ax, frame: pd.DataFrame, bounds=(None, None), **line) -> str | None:
    """Mean line of ``frame`` (aggregated rows along ``depth``) with its shaded area.

    The speaker band (filled) where ``band_low`` is finite; else ± ``std`` (hatched, so the
    two cannot be confused) clipped to ``bounds``, since a non-negative quantity's spread
    does not go below 0. Returns :data:`BAND`, :data:`STD`, or None (nothing drawn, or a
    single run: no spread to shade).
    """
    if frame.empty:
        return None
    if "band_low" in frame and np.isfinite(pd.to_numeric(frame["band_low"])).any():
        band(ax, frame, **line)
        return BAND
    frame = frame.sort_values("depth")
    mean = pd.to_numeric(frame["mean"]).to_numpy(float)
    std = pd.to_numeric(frame["std"]).to_numpy(float) if "std" in frame else mean * np.nan
    band(ax, frame.drop(columns=["std", "band_low", "band_high"], errors="ignore"), **line)
    ok = np.isfinite(std)
    if not ok.any():
        return None
    low, high = bounds
    color = ax.get_lines()[-1].get_color()
    ax.fill_between(
        frame["depth"].to_numpy(float)[ok],
        np.clip(mean - std, low, high)[ok],
        np.clip(mean + std, low, high)[ok],
        facecolor="none",
        edgecolor=matplotlib.colors.to_rgba(color, 0.35),
        hatch="////",
        lw=0,
    )
    return STD


def shading_legend(kinds: Iterable[str | None], notes: dict[str, str] | None = None):
    """Legend entries (handles, labels) for the kinds of shading :func:`curve` drew; ``notes``
    adds a few words to a kind's label (e.g. which panels fall back to ± std)."""
    handles, labels = [], []
    kinds = set(kinds)
    if BAND in kinds:
        handles.append(Patch(facecolor="0.45", alpha=0.3, lw=0))
        labels.append(SHADING_LABELS[BAND] + (notes or {}).get(BAND, ""))
    if STD in kinds:
        handles.append(Patch(facecolor="none", edgecolor="0.45", hatch="////", lw=0))
        labels.append(SHADING_LABELS[STD] + (notes or {}).get(STD, ""))
    return handles, labels


def legend_under(fig, handles, labels, ncols: int | None = None, fontsize=None, **kwargs):
    """One legend under the panels of ``fig`` (a figure or subfigure), repeated labels once:
    ``ncols`` columns (default 4), fewer where the legend, measured as drawn, would be wider
    than ``fig`` (it would be cut at both sides). Returns the legend (None without entries)."""
    unique = dict(zip(labels, handles, strict=True))
    if not unique:
        return None
    root = fig.figure if hasattr(fig, "figure") and fig.figure is not None else fig
    renderer = root.canvas.get_renderer()
    room = fig.bbox.width * 0.98
    for n in range(min(ncols or 4, len(unique)), 0, -1):
        legend = fig.legend(
            list(unique.values()),
            list(unique.keys()),
            loc="outside lower center",
            ncols=n,
            frameon=False,
            fontsize=fontsize,
            **kwargs,
        )
        if n == 1 or legend.get_window_extent(renderer).width <= room:
            return legend
        legend.remove()
    return None


def grid_shape(n: int, most: int = 3) -> tuple[int, int]:
    """(rows, columns) of ``n`` panels, at most ``most`` a row, rows as even as they can be
    (4 -> 2 x 2, 5 -> 2 x 3, 7 -> 3 x 3)."""
    n = max(int(n), 1)
    rows_ = -(-n // most)
    return rows_, -(-n // rows_)


def spread_title(model: str | None, table: pd.DataFrame, what: str) -> str:
    """'model, L = n layers: what' and a second line saying what lines and shading are."""
    size = ""
    if model is not None:
        L = n_layers(table) if len(table) else None
        size = f", L = {L} layers" if L else ""
        what = f"{model}{size}: {what}"
    return f"{what}\nlines: mean over runs ({fold_note(table)})"


def contributions_figure(contributions: pd.DataFrame, model: str):
    """Norm ratio ‖u‖/‖h‖ and cosine cos(u, h) per layer for u = a, m, a + m; then adapted − frozen.

    ``contributions``: the aggregated table (``variant`` base / adapted / delta). Rows 1–2:
    the pre-trained encoder (frozen runs) and each adapted method's encoder (LoRA, DoRA,
    full fine-tuning); rows 3–4: the per-fold difference adapted − base of each such run.
    One colour per method, one legend under the panels.
    """
    table = rows(contributions, model=model)
    methods = method_order(table["method"])
    ranks = lora_methods(methods)
    colors = method_colors(methods)
    base_method = "frozen" if "frozen" in methods else (ranks[0] if ranks else None)
    components = [c for c in COMPONENT_TITLES if c in set(table["component"])]
    metric_labels = {"norm_ratio": "norm ratio ‖u‖ / ‖h‖", "cosine": "cosine cos(u, h)"}
    delta_labels = {"norm_ratio": "Δ norm ratio", "cosine": "Δ cosine"}
    n_rows = 4 if ranks else 2
    kinds: list[str | None] = []
    with figure_style():
        fig, axes = new_subplots(
            n_rows,
            len(components),
            figsize=(3.4 * len(components) + 0.8, 2.5 * n_rows + 0.8),
            squeeze=False,
            sharex=True,
        )
        for c, component in enumerate(components):
            for r, metric in enumerate(("norm_ratio", "cosine")):
                ax = axes[r, c]
                if base_method:
                    sel = rows(
                        table,
                        method=base_method,
                        variant="base",
                        component=component,
                        metric=metric,
                    )
                    kinds.append(
                        curve(
                            ax,
                            sel,
                            RANGES[metric],
                            color=FROZEN_COLOR,
                            label="pre-trained encoder (frozen)",
                        )
                    )
                for method in ranks:
                    sel = rows(
                        table, method=method, variant="adapted", component=component, metric=metric
                    )
                    kinds.append(
                        curve(
                            ax,
                            sel,
                            RANGES[metric],
                            color=colors[method],
                            label=f"adapted, {method_label(method)}",
                        )
                    )
                ax.set_ylabel(metric_labels[metric])
                if ranks:
                    ax_d = axes[r + 2, c]
                    ax_d.axhline(0, color="0.5", lw=0.8)
                    for method in ranks:
                        sel = rows(
                            table,
                            method=method,
                            variant="delta",
                            component=component,
                            metric=metric,
                        )
                        kinds.append(
                            curve(
                                ax_d,
                                sel,
                                color=colors[method],
                                label=f"adapted, {method_label(method)}",
                                ls="--",
                            )
                        )
                    ax_d.set_ylabel(f"{delta_labels[metric]}\n(adapted − frozen)")
            axes[0, c].set_title(COMPONENT_TITLES[component])
            axes[-1, c].set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(axes)
        extra = shading_legend(kinds)
        legend_under(fig, handles + extra[0], labels + extra[1], ncols=4)
        fig.suptitle(
            spread_title(model, table, "what each block writes into the residual stream h")
            + (
                "\nrows 3–4 (dashed): per-fold difference adapted − pre-trained encoder of "
                "the same run"
                if ranks
                else ""
            )
        )
    return fig


#: Line style and marker of each method in :func:`contributions_depth_figure` when the colour
#: is the model's: no two methods alike (line styles repeat after four, markers do not).
METHOD_STYLES = [
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ("-", "v"),
    ("--", "P"),
    (":", "X"),
    ("-.", "*"),
]


def contributions_depth_figure(contributions: pd.DataFrame, models: Sequence[str] | None = None):
    """Adapted − frozen difference of the contributions of every model on one depth axis.

    Several models: colour = model (config order), line style and marker = method (LoRA
    rank, DoRA, full fine-tuning...; :data:`METHOD_STYLES`). One model: colour = method, as
    in the per-model figures. Rows: norm ratio, cosine; columns: attention, MLP, whole block.
    """
    table = rows(contributions, variant="delta")
    models = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    ranks = lora_methods(table["method"])
    components = [c for c in COMPONENT_TITLES if c in set(contributions["component"])] or list(
        COMPONENT_TITLES
    )
    by_model = len(models) > 1
    cmap = matplotlib.colormaps["viridis"]
    model_colors = {m: cmap(i / max(len(models) - 1, 1) * 0.85) for i, m in enumerate(models)}
    colors = method_colors(table["method"]) if len(table) else {}

    def style(model: str, k: int, method: str) -> dict:
        if not by_model:
            return {"color": colors[method], "ls": "-", "marker": "o"}
        ls, marker = METHOD_STYLES[k % len(METHOD_STYLES)]
        return {"color": model_colors[model], "ls": ls, "marker": marker}

    kinds: list[str | None] = []
    with figure_style():
        fig, axes = new_subplots(
            2,
            len(components),
            figsize=(3.6 * len(components) + 0.8, 6.2 + 0.15 * len(ranks)),
            squeeze=False,
            sharex=True,
        )
        if table.empty:
            for ax in axes.ravel():
                empty_panel(ax, "no adapted runs: no adapted − frozen difference")
        for c, component in enumerate(components):
            for r, (metric, label) in enumerate(
                (("norm_ratio", "Δ norm ratio ‖u‖/‖h‖"), ("cosine", "Δ cosine cos(u, h)"))
            ):
                ax = axes[r, c]
                if table.empty:
                    continue
                ax.axhline(0, color="0.5", lw=0.8)
                for model in models:
                    for k, method in enumerate(ranks):
                        sel = rows(
                            table, model=model, method=method, component=component, metric=metric
                        )
                        kinds.append(curve(ax, sel, **style(model, k, method)))
                ax.set_ylabel(f"{label}\n(adapted − frozen)")
            axes[0, c].set_title(COMPONENT_TITLES[component])
            axes[-1, c].set_xlabel(DEPTH_LABEL)
        if by_model:
            handles = [Line2D([], [], color=model_colors[m], lw=2) for m in models]
            labels = list(models)
            handles += [
                Line2D([], [], color="0.3", ls=ls, marker=marker, markersize=4)
                for ls, marker in (METHOD_STYLES[k % len(METHOD_STYLES)] for k in range(len(ranks)))
            ]
        else:
            handles, labels = [], []
            handles += [Line2D([], [], color=colors[m], marker="o", markersize=4) for m in ranks]
        labels += [method_label(m) for m in ranks]
        extra = shading_legend(kinds)
        handles, labels = handles + extra[0], labels + extra[1]
        if handles:
            legend_under(fig, handles, labels, ncols=4)
        what = "adapter effect on layer contributions"
        what += " across models" if by_model else f" ({models[0]})" if models else ""
        fig.suptitle(spread_title(None, table, what[0].upper() + what[1:]))
    return fig
