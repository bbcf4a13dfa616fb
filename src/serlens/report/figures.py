"""The workflow's figures: one function per figure family, each returning a matplotlib Figure.

Inputs are the tidy tables of :mod:`serlens.report.tables` and :mod:`serlens.report.aggregate`
(``results/tables/*.tsv``) and the runs' ``history*.tsv``; :func:`save` writes a figure as
PNG and SVG. Conventions, so that the figures read alike:

* x = relative depth ``ℓ / L`` wherever a quantity is per layer (0 = the input embedding,
  1 = the last encoder layer), so models of different size share an axis.
* One colour per method (frozen heads grey/black, LoRA ranks from a sequential palette); the
  line is the mean over folds and the band ± one standard deviation (sample std, ddof 1).
* Axis limits are left to matplotlib: nothing is hand-clipped. Colour scales of heat maps
  span the data (and at least their natural range, e.g. 0..1 for recall).
* Matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import hsv_to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

__all__ = [
    "ab_dynamics_figure",
    "cka_figure",
    "confusion_figure",
    "contributions_depth_figure",
    "contributions_figure",
    "history_files",
    "load_histories",
    "logit_lens_figure",
    "performance_figure",
    "probing_figure",
    "rulegraph_figure",
    "build_report",
    "rulegraph_dot",
    "save",
    "spectra_figure",
    "training_curves_figure",
]

DPI = 150
RC = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "serlens",  # stable ids: the same figure gives the same SVG
    "figure.constrained_layout.use": True,
}
DEPTH_LABEL = "relative depth ℓ / L"
FROZEN_COLOR, WSUM_COLOR = "#222222", "#8c8c8c"
RANK_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
]
LINESTYLES = ["-", "--", ":", "-."]
COMPONENT_TITLES = {
    "attn": "attention output a",
    "mlp": "MLP output m",
    "attn+mlp": "block update a + m",
}


# --------------------------------------------------------------------------- helpers


@contextmanager
def figure_style():
    """The shared rc settings (font sizes readable at report width, light grid)."""
    with plt.rc_context(RC):
        yield


def save(fig: plt.Figure, png: Path, svg: Path) -> None:
    """Write ``fig`` as PNG (150 dpi) and SVG, without timestamps, and close it."""
    for path in (png, svg):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=DPI, metadata={"Software": None})
    fig.savefig(svg, metadata={"Date": None})
    plt.close(fig)


def rank_of(method: str) -> int | None:
    match = re.fullmatch(r"lora_r(\d+)", method)
    return int(match[1]) if match else None


def method_order(methods: Iterable[str]) -> list[str]:
    """frozen, frozen_wsum, then LoRA runs by rank."""
    fixed = {"frozen": -2, "frozen_wsum": -1}

    def key(m):
        return (fixed.get(m, rank_of(m) if rank_of(m) is not None else 10**9), m)

    return sorted(dict.fromkeys(methods), key=key)


def method_label(method: str) -> str:
    if method == "frozen":
        return "frozen, last layer"
    if method == "frozen_wsum":
        return "frozen, weighted sum"
    rank = rank_of(method)
    return f"LoRA r = {rank}" if rank is not None else method


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    colors, k = {}, 0
    for method in method_order(methods):
        if method == "frozen":
            colors[method] = FROZEN_COLOR
        elif method == "frozen_wsum":
            colors[method] = WSUM_COLOR
        else:
            colors[method] = RANK_COLORS[k % len(RANK_COLORS)]
            k += 1
    return colors


def lora_methods(methods: Iterable[str]) -> list[str]:
    return [m for m in method_order(methods) if rank_of(m) is not None]


def rows(table: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows of ``table`` whose columns equal the given values (columns absent from the table are ignored)."""
    mask = np.ones(len(table), dtype=bool)
    for column, value in equal.items():
        if column in table.columns:
            mask &= (table[column] == value).to_numpy()
    return table[mask]


def band(ax, frame: pd.DataFrame, x: str = "depth", **line) -> None:
    """Mean line with a ± std band from an aggregated table (columns ``x``, ``mean``, ``std``)."""
    frame = frame.sort_values(x)
    if frame.empty:
        return
    xs, mean = frame[x].to_numpy(float), frame["mean"].to_numpy(float)
    std = frame["std"].to_numpy(float) if "std" in frame else np.full_like(mean, np.nan)
    (handle,) = ax.plot(
        xs, mean, marker=line.pop("marker", "o"), markersize=line.pop("markersize", 3.5), **line
    )
    ok = np.isfinite(std)
    if ok.any():
        ax.fill_between(
            xs[ok], (mean - std)[ok], (mean + std)[ok], color=handle.get_color(), alpha=0.15, lw=0
        )


def annotate_cells(ax, values: np.ndarray, light_text: np.ndarray) -> None:
    """Write each heat-map cell's value in it, white where ``light_text`` (dark cells)."""
    for (i, j), v in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if light_text[i, j] else "black",
        )


def fold_note(table: pd.DataFrame) -> str:
    """'3 folds' or '2-3 folds' (from ``n_folds``), and the missing ones if any."""
    if table.empty or "n_folds" not in table:
        return "no folds"
    lo, hi = int(table["n_folds"].min()), int(table["n_folds"].max())
    note = f"{hi} fold{'s' if hi != 1 else ''}" if lo == hi else f"{lo}–{hi} folds"
    # read back from TSV, the column is empty (NaN), a fold number (float) or "1,3" (str)
    column = table["missing_folds"].dropna() if "missing_folds" in table else []
    missing = sorted(
        {f"{v:g}" if isinstance(v, float) else str(v) for v in column if str(v).strip()}
    )
    return note + (f"; missing folds {'; '.join(missing)}" if missing else "")


def spread_note(table: pd.DataFrame) -> str:
    return f"mean ± std over {fold_note(table)}"


def n_layers(
    table: pd.DataFrame, layer: str = "layer", depth: str = "depth", offset: int = 0
) -> int | None:
    """L from a table with columns layer and depth = (layer + offset) / L."""
    sel = table[(table[depth] > 0) & table[layer].notna()] if depth in table else table.iloc[:0]
    if sel.empty:
        return None
    return int(round(float(((sel[layer] + offset) / sel[depth]).median())))


def model_title(
    model: str,
    table: pd.DataFrame,
    what: str,
    layer: str = "layer",
    depth: str = "depth",
    offset: int = 0,
) -> str:
    """'model, L = n layers: what (mean ± std over k folds)'. ``offset``: 1 where layers count from 0 and depth = (layer + 1) / L."""
    L = n_layers(table, layer, depth, offset) if len(table) else None
    size = f", L = {L} layers" if L else ""
    return f"{model}{size}: {what} ({spread_note(table)})"


def chance_line(ax, n_classes: int | None) -> None:
    if n_classes:
        ax.axhline(1 / n_classes, color="0.5", ls=":", lw=1, label=f"chance (1/{n_classes})")


def empty_panel(ax, message: str) -> None:
    ax.text(
        0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.3"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def legend_below(fig, handles, labels, ncols: int | None = None) -> None:
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(
        list(unique.values()),
        list(unique.keys()),
        loc="outside lower center",
        ncols=ncols or min(len(unique), 5),
        frameon=False,
    )


def collect_legend(axes) -> tuple[list, list]:
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    return handles, labels


def plain_log_axis(ax, axis: str = "y") -> None:
    """Log scale with ticks written as plain numbers (0.4, 2, 30) instead of 4×10⁻¹.

    Minor ticks at 2× and 5× a power of ten are labelled too when the axis spans under two decades.
    """
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    limits = ax.get_ylim if axis == "y" else ax.get_xlim

    def minor(value, _):
        lo, hi = sorted(limits())
        if lo <= 0 or np.log10(hi / lo) >= 2:
            return ""
        mantissa = value / 10 ** np.floor(np.log10(value) + 1e-9)
        return (
            f"{value:g}"
            if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6
            else ""
        )

    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(FuncFormatter(minor))


def module_type(module: str) -> str:
    """``layers.3.self_attn.v_proj`` -> ``self_attn.v_proj``."""
    return re.sub(r"^(?:.*\.)?layers\.\d+\.", "", str(module))


# --------------------------------------------------------------------------- performance


def performance_figure(
    performance: pd.DataFrame, models: Sequence[str] | None = None, n_classes: int | None = None
):
    """UAR and WAR per model (x, in config order = by size) and method: per-fold points, mean ± std.

    ``performance``: ``model, method, fold, uar, war`` (``results/tables/performance.tsv``).
    """
    models = list(models) if models else list(dict.fromkeys(performance["model"]))
    models = [m for m in models if m in set(performance["model"])]
    methods = method_order(performance["method"])
    colors = method_colors(methods)
    width = 0.8 / max(len(methods), 1)
    with figure_style():
        if len(models) <= 2:  # side by side
            fig, axes = plt.subplots(1, 2, figsize=(max(7.5, 3.0 + 2.5 * len(models)), 4.2))
        else:  # stacked, so that many models stay readable at report width
            fig, axes = plt.subplots(
                2, 1, figsize=(max(7.5, 1.5 + 0.32 * len(models) * len(methods)), 7.6), sharex=True
            )
        for ax, metric, name in zip(
            axes,
            ("uar", "war"),
            ("UAR: unweighted average recall", "WAR: weighted average recall (accuracy)"),
            strict=True,
        ):
            for i, method in enumerate(methods):
                for j, model in enumerate(models):
                    sel = rows(performance, model=model, method=method).sort_values("fold")
                    if sel.empty:
                        continue
                    x0 = j - 0.4 + width * (i + 0.5)
                    values = sel[metric].to_numpy(float)
                    jitter = (
                        np.linspace(-0.28, 0.28, len(values)) * width
                        if len(values) > 1
                        else np.zeros(1)
                    )
                    ax.scatter(
                        x0 + jitter,
                        values,
                        s=16,
                        facecolors="none",
                        edgecolors=colors[method],
                        lw=0.9,
                        alpha=0.8,
                        zorder=2,
                    )
                    std = values.std(ddof=1) if len(values) > 1 else 0.0
                    ax.errorbar(
                        x0,
                        values.mean(),
                        yerr=std,
                        fmt="_",
                        markersize=14,
                        mew=2.2,
                        capsize=4,
                        elinewidth=1.6,
                        color=colors[method],
                        zorder=3,
                    )
            chance_line(ax, n_classes)
            ax.set_xticks(range(len(models)), models)
            ax.tick_params(axis="x", labelbottom=True)
            ax.set_xlabel("Whisper model (config order, smallest first)")
            ax.set_title(name)
            ax.set_ylabel(f"{metric.upper()} on the test fold (0–1)")
            ax.grid(axis="x", visible=False)
        handles = [
            Line2D([], [], color=colors[m], marker="s", ls="", markersize=8) for m in methods
        ]
        labels = [method_label(m) for m in methods]
        handles += [
            Line2D([], [], color="0.3", marker="o", ls="", markerfacecolor="none"),
            Line2D([], [], color="0.3", marker="_", ls="", markersize=14, mew=2.2),
        ]
        labels += ["one test fold", "mean ± std over folds"]
        if n_classes:
            handles.append(Line2D([], [], color="0.5", ls=":"))
            labels.append(f"chance (1/{n_classes})")
        legend_below(fig, handles, labels, ncols=min(len(labels), 4))
        n = performance.groupby(["model", "method"])["fold"].nunique()
        folds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
        fig.suptitle(f"Test-fold performance, leave-one-session-out ({folds} folds per bar)")
    return fig


def confusion_figure(
    confusion: pd.DataFrame,
    models: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
):
    """Confusion matrices summed over folds, one panel per model (row) x method (column).

    ``confusion``: ``model, method, label, pred, count, n_folds`` (``results/tables/confusion.tsv``).
    Colour = share of the true class (row-normalised, i.e. per-class recall on the diagonal);
    each cell prints the count and that share.
    """
    models = list(models) if models else list(dict.fromkeys(confusion["model"]))
    models = [m for m in models if m in set(confusion["model"])]
    methods = method_order(confusion["method"])
    classes = list(classes) if classes else list(dict.fromkeys(confusion["label"]))
    k = len(classes)
    with figure_style():
        fig, axes = plt.subplots(
            len(models),
            len(methods),
            figsize=(0.6 + (1.0 + 0.55 * k) * len(methods), 0.9 + (0.9 + 0.5 * k) * len(models)),
            squeeze=False,
        )
        image = None
        for r, model in enumerate(models):
            for c, method in enumerate(methods):
                ax = axes[r, c]
                ax.grid(False)
                sel = rows(confusion, model=model, method=method)
                if sel.empty:
                    empty_panel(ax, f"{model}\n{method_label(method)}\nno runs")
                    continue
                counts = sel.pivot(index="label", columns="pred", values="count").reindex(
                    index=classes, columns=classes, fill_value=0
                )
                counts = counts.to_numpy(float)
                totals = counts.sum(axis=1, keepdims=True)
                share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
                image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
                for i in range(k):
                    for j in range(k):
                        ax.text(
                            j,
                            i,
                            f"{int(counts[i, j])}\n{share[i, j]:.0%}",
                            ha="center",
                            va="center",
                            fontsize=7.5,
                            color="white" if share[i, j] > 0.55 else "black",
                        )
                ax.set_xticks(range(k), classes)
                ax.set_yticks(range(k), classes)
                if r == len(models) - 1:
                    ax.set_xlabel("predicted emotion")
                if c == 0:
                    ax.set_ylabel(f"{model}\ntrue emotion")
                n_folds = int(sel["n_folds"].iloc[0])
                ax.set_title(
                    f"{method_label(method)}\n{n_folds} folds, n = {int(counts.sum())} utt.",
                    fontsize=9,
                )
        if image is not None:
            fig.colorbar(
                image, ax=axes, shrink=0.8, label="share of the true class (row-normalised)"
            )
        fig.suptitle("Confusion matrices, test utterances summed over folds (count and row share)")
    return fig


# --------------------------------------------------------------------------- training curves


def history_files(train_root: Path, model: str, methods: Sequence[str], folds: Iterable) -> dict:
    """``{(method, fold): history.tsv}`` of one model; frozen runs also give ``frozen_wsum`` (history_wsum.tsv)."""
    files = {}
    for method in methods:
        for fold in folds:
            run = Path(train_root) / model / method / f"fold{fold}"
            files[(method, int(fold))] = run / "history.tsv"
            if method == "frozen":
                files[("frozen_wsum", int(fold))] = run / "history_wsum.tsv"
    return files


def load_histories(files: Mapping[tuple[str, int], Path]) -> dict[tuple[str, int], pd.DataFrame]:
    """Read ``{(method, fold): path}`` (see :func:`history_files`); absent files are left out."""
    return {
        (str(method), int(fold)): pd.read_csv(path, sep="\t")
        for (method, fold), path in files.items()
        if Path(path).is_file()
    }


def selected_epoch(history: pd.DataFrame) -> int | None:
    """The epoch whose checkpoint was kept: the last one flagged ``best`` (dev UAR improved)."""
    if "best" not in history:
        return None
    best = history[history["best"].astype(str).str.lower() == "true"]
    return int(best["epoch"].iloc[-1]) if len(best) else None


def training_curves_figure(
    histories: Mapping[tuple[str, int], pd.DataFrame], model: str, n_classes: int | None = None
):
    """Dev UAR (top) and training loss (bottom) per epoch; one column per method, one line per fold.

    A star marks the epoch whose checkpoint was kept (best dev UAR).
    """
    methods = method_order(m for m, _ in histories)
    folds = sorted({f for _, f in histories})
    fold_colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(folds)}
    with figure_style():
        fig, axes = plt.subplots(
            2, len(methods), figsize=(2.2 + 2.7 * len(methods), 5.6), squeeze=False
        )
        for c, method in enumerate(methods):
            for fold in folds:
                history = histories.get((method, fold))
                if history is None:
                    continue
                color = fold_colors[fold]
                best = selected_epoch(history)
                for r, column in enumerate(("dev_uar", "train_loss")):
                    ax = axes[r, c]
                    ax.plot(
                        history["epoch"],
                        history[column],
                        color=color,
                        lw=1.4,
                        label=f"test fold {fold}",
                    )
                    if best is not None:
                        y = history.loc[history["epoch"] == best, column]
                        ax.plot(
                            [best],
                            y,
                            marker="*",
                            color=color,
                            markersize=10,
                            ls="",
                            mec="black",
                            mew=0.5,
                        )
            axes[0, c].set_title(method_label(method))
            chance_line(axes[0, c], n_classes)
            axes[1, c].set_xlabel("epoch")
            for ax in axes[:, c]:
                ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0, 0].set_ylabel("dev UAR (0–1)")
        axes[1, 0].set_ylabel("training loss\n(cross-entropy, nats)")
        handles, labels = collect_legend(axes)
        handles.append(
            Line2D([], [], marker="*", color="0.4", mec="black", mew=0.5, ls="", markersize=10)
        )
        labels.append("kept checkpoint (best dev UAR)")
        legend_below(fig, handles, labels, ncols=min(len(labels), 4))
        fig.suptitle(f"{model}: training curves per test fold")
    return fig


# --------------------------------------------------------------------------- contributions


def contributions_figure(contributions: pd.DataFrame, model: str):
    """Norm ratio ‖u‖/‖h‖ and cosine cos(u, h) per layer for u = a, m, a + m; then LoRA − frozen.

    ``contributions``: the aggregated table (``variant`` base / adapted / delta). Rows 1–2:
    the pre-trained encoder (frozen runs) and each rank's adapted encoder; rows 3–4: the
    per-fold difference adapted − base of each LoRA run.
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
    with figure_style():
        fig, axes = plt.subplots(
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
                    band(ax, sel, color=FROZEN_COLOR, label="pre-trained encoder (frozen)")
                for method in ranks:
                    sel = rows(
                        table, method=method, variant="adapted", component=component, metric=metric
                    )
                    band(ax, sel, color=colors[method], label=f"adapted, {method_label(method)}")
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
                        band(
                            ax_d,
                            sel,
                            color=colors[method],
                            label=f"adapted, {method_label(method)}",
                            ls="--",
                        )
                    ax_d.set_ylabel(f"{delta_labels[metric]}\n(LoRA − frozen)")
            axes[0, c].set_title(COMPONENT_TITLES[component])
            axes[-1, c].set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(axes)
        legend_below(fig, handles, labels)
        fig.suptitle(
            model_title(model, table, "what each block writes into the residual stream h")
            + (
                "\nrows 3–4: per-fold difference adapted − pre-trained of the same LoRA run"
                if ranks
                else ""
            )
        )
    return fig


def contributions_depth_figure(contributions: pd.DataFrame, models: Sequence[str] | None = None):
    """LoRA − frozen difference of the contributions of every model on one depth axis.

    Colour = model (config order), line style = LoRA rank. Rows: norm ratio, cosine; columns:
    attention, MLP, whole block.
    """
    table = rows(contributions, variant="delta")
    models = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    ranks = lora_methods(table["method"])
    components = [c for c in COMPONENT_TITLES if c in set(contributions["component"])] or list(
        COMPONENT_TITLES
    )
    cmap = plt.get_cmap("viridis")
    model_colors = {m: cmap(i / max(len(models) - 1, 1) * 0.85) for i, m in enumerate(models)}
    with figure_style():
        fig, axes = plt.subplots(
            2,
            len(components),
            figsize=(3.4 * len(components) + 0.8, 5.8),
            squeeze=False,
            sharex=True,
        )
        if table.empty:
            for ax in axes.ravel():
                empty_panel(ax, "no LoRA runs: no LoRA − frozen difference")
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
                        band(ax, sel, color=model_colors[model], ls=LINESTYLES[k % len(LINESTYLES)])
                ax.set_ylabel(f"{label}\n(LoRA − frozen)")
            axes[0, c].set_title(COMPONENT_TITLES[component])
            axes[-1, c].set_xlabel(DEPTH_LABEL)
        handles = [Line2D([], [], color=model_colors[m], lw=2) for m in models]
        labels = list(models)
        handles += [
            Line2D([], [], color="0.3", ls=LINESTYLES[k % len(LINESTYLES)])
            for k in range(len(ranks))
        ]
        labels += [method_label(m) for m in ranks]
        if handles:
            legend_below(fig, handles, labels, ncols=min(len(labels), 6))
        fig.suptitle(f"Adapter effect on layer contributions across models ({spread_note(table)})")
    return fig


# --------------------------------------------------------------------------- logit lens


def logit_lens_figure(logit_lens: pd.DataFrame, model: str, n_classes: int | None = None):
    """Per-layer UAR, agreement with the final prediction and KL(p_L ‖ p_ℓ): frozen against each rank.

    One row per lens (logit lens; tuned lens when fitted). Each run is read with its own head
    on the encoder it classifies with (``base`` for frozen runs, ``adapted`` for LoRA runs).
    """
    table = rows(logit_lens, model=model)
    methods = [m for m in method_order(table["method"])]
    colors = method_colors(methods)
    lenses = [lens for lens in ("logit", "tuned") if lens in set(table["lens"])]
    metrics = [
        ("uar", "UAR of argmax p_ℓ (0–1)", "UAR against the labels"),
        (
            "agreement",
            "agreement with final prediction\n(share of utterances)",
            "agreement with the run's output",
        ),
        ("kl", "KL(p_L ‖ p_ℓ) (nats)", "KL divergence from the run's output"),
    ]
    with figure_style():
        fig, axes = plt.subplots(
            max(len(lenses), 1),
            3,
            figsize=(11.5, 0.9 + 3.0 * max(len(lenses), 1)),
            squeeze=False,
            sharex=True,
        )
        for r, lens in enumerate(lenses):
            for c, (metric, label, title) in enumerate(metrics):
                ax = axes[r, c]
                for method in methods:
                    variant = "adapted" if rank_of(method) is not None else "base"
                    sel = rows(table, lens=lens, method=method, variant=variant, metric=metric)
                    band(ax, sel, color=colors[method], label=method_label(method))
                if metric == "uar":
                    chance_line(ax, n_classes)
                ax.set_ylabel(label)
                ax.set_title(title)
            axes[r, 0].annotate(
                f"{lens} lens",
                xy=(0, 0.5),
                xycoords="axes fraction",
                xytext=(-62, 0),
                textcoords="offset points",
                rotation=90,
                va="center",
                ha="center",
                fontweight="bold",
            )
        for ax in axes[-1]:
            ax.set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(axes)
        legend_below(fig, handles, labels)
        fig.suptitle(model_title(model, table, "reading the trained head off every layer"))
    return fig


# --------------------------------------------------------------------------- probing


def probing_figure(probing: pd.DataFrame, model: str, n_classes: int | None = None):
    """Linear-probe UAR per layer for emotion (solid) and the control task (dotted), and selectivity."""
    table = rows(probing, model=model)
    methods = method_order(table["method"])
    colors = method_colors(methods)
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.3), sharex=True)
        for method in methods:
            band(
                axes[0],
                rows(table, method=method, task="emotion", metric="uar"),
                color=colors[method],
                label=method_label(method),
            )
            band(
                axes[0],
                rows(table, method=method, task="control", metric="uar"),
                color=colors[method],
                ls=":",
                marker="x",
            )
            band(
                axes[1],
                rows(table, method=method, task="emotion", metric="selectivity_uar"),
                color=colors[method],
            )
        chance_line(axes[0], n_classes)
        axes[1].axhline(0, color="0.5", lw=0.8)
        axes[0].set_ylabel("probe UAR on the test fold (0–1)")
        axes[0].set_title("emotion task (solid) and control task (dotted, ×)")
        axes[1].set_ylabel("selectivity = UAR(emotion) − UAR(control)")
        axes[1].set_title("selectivity")
        for ax in axes:
            ax.set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(axes)
        handles += [
            Line2D([], [], color="0.3", ls="-", marker="o", markersize=3.5),
            Line2D([], [], color="0.3", ls=":", marker="x", markersize=3.5),
        ]
        labels += ["emotion labels", "control: labels permuted within speaker"]
        legend_below(fig, handles, labels, ncols=3)
        fig.suptitle(model_title(model, table, "linear probes on pooled layer states"))
    return fig


# --------------------------------------------------------------------------- spectra


def _by_layer(frame: pd.DataFrame, x: str = "depth") -> pd.DataFrame:
    """Collapse several modules of one layer type into mean over layers of ``x`` (keeps mean/std)."""
    return frame.groupby(x, as_index=False)[["mean", "std"]].mean()


def spectra_figure(
    svd: pd.DataFrame, subspace: pd.DataFrame, model: str, intruder_epsilon: float | None = None
):
    """Spectra of the LoRA update ΔW = (α/r)·B·A per adapted module, and the cross-rank subspace similarity.

    Top: singular values σ_i of ΔW, one line per layer (colour = depth), one panel per rank.
    Middle: effective rank, stable rank and 90 %-energy rank of ΔW, and the intruder count of
    the merged weight, per layer. Bottom: φ(A_r1, A_r2, i, j) heat maps (Hu et al. 2021, §7),
    averaged over adapted modules and folds.
    """
    table = rows(svd, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    types = sorted({module_type(m) for m in table["module"]}) if len(table) else []
    styles = {t: LINESTYLES[i % len(LINESTYLES)] for i, t in enumerate(types)}
    sub = rows(subspace, model=model) if subspace is not None and len(subspace) else pd.DataFrame()
    pairs = (
        sorted({(int(a), int(b)) for a, b in zip(sub["rank_a"], sub["rank_b"], strict=True)})
        if len(sub)
        else []
    )
    n_top = max(len(ranks), 1)
    n_bottom = max(len(pairs), 1)
    width = max(13.0, 3.2 * max(n_top, n_bottom + 1))  # about 3 inches a panel
    depth_cmap = plt.get_cmap("viridis")
    with figure_style():
        bottom_height = (
            1.15 if pairs else 0.2
        )  # no cross-rank heat maps with one rank: a one-line note
        fig = plt.figure(figsize=(width, 7.0 + 3.5 * bottom_height))
        top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.0, 1.05, bottom_height])
        # singular values of ΔW
        ax_top = top.subplots(1, n_top, squeeze=False)[0]
        for ax, method in zip(ax_top, ranks, strict=False):
            sel = rows(table, method=method, matrix="delta_w", quantity="sigma")
            for (module, depth), group in sel.groupby(["module", "depth"]):
                group = group.sort_values("index")
                ax.plot(
                    group["index"],
                    group["mean"],
                    color=depth_cmap(depth),
                    lw=1.2,
                    marker="o",
                    markersize=2.5,
                    ls=styles.get(module_type(module), "-"),
                )
            plain_log_axis(ax)
            ax.set_title(f"{method_label(method)}: singular values of ΔW")
            ax.set_xlabel("index i (descending σ)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_top[0].set_ylabel("σ_i of ΔW (weight units, log scale)")
        if not ranks:
            empty_panel(ax_top[0], "no LoRA runs")
        else:
            mappable = plt.cm.ScalarMappable(cmap=depth_cmap, norm=plt.Normalize(0, 1))
            top.colorbar(mappable, ax=ax_top, label="layer depth ℓ / L", shrink=0.9)
        if len(types) > 1:
            top.legend(
                [Line2D([], [], color="0.3", ls=styles[t]) for t in types],
                types,
                loc="outside right upper",
            )
        # ranks per layer and intruders
        ax_mid = middle.subplots(1, 4)
        quantities = [
            ("effective_rank", "effective rank of ΔW\n(exp entropy of σ/‖σ‖₁)"),
            ("stable_rank", "stable rank of ΔW\n(‖ΔW‖²_F / σ₁²)"),
            ("energy_rank", "directions holding 90 % of\nΣσ² of ΔW (count)"),
        ]
        for ax, (quantity, label) in zip(ax_mid, quantities, strict=False):
            for method in ranks:
                for t in types:
                    sel = rows(table, method=method, matrix="delta_w", quantity=quantity)
                    sel = sel[sel["module"].map(module_type) == t]
                    band(
                        ax,
                        _by_layer(sel),
                        color=colors[method],
                        ls=styles[t],
                        label=method_label(method) + (f" {t}" if len(types) > 1 else ""),
                    )
            ax.set_ylabel(label)
            ax.set_xlabel(DEPTH_LABEL)
        ax = ax_mid[3]
        for method in ranks:
            for t in types:
                sel = rows(table, method=method, matrix="merged", quantity="intruder_count")
                sel = sel[sel["module"].map(module_type) == t]
                band(ax, _by_layer(sel), color=colors[method], ls=styles[t])
        eps = f" (max |cos| < {intruder_epsilon:g})" if intruder_epsilon else ""
        ax.set_ylabel(f"intruder dimensions of W₀ + ΔW\n(count{eps})")
        ax.set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(ax_mid)
        if handles:
            middle.legend(
                handles,
                labels,
                loc="outside lower center",
                ncols=min(len(labels), 5),
                frameon=False,
            )
        # subspace similarity between ranks: heat maps per pair of ranks, then φ per layer
        ax_bot = bottom.subplots(
            1, n_bottom + 1, squeeze=False, width_ratios=[1.0] * n_bottom + [1.1]
        )[0]
        image = None
        for ax, (ra, rb) in zip(ax_bot, pairs, strict=False):
            ax.grid(False)
            sel = sub[(sub["rank_a"] == ra) & (sub["rank_b"] == rb)]
            grid = sel.groupby(["i", "j"])["mean"].mean().unstack("j")
            values = grid.to_numpy(float)
            image = ax.imshow(values, cmap="YlGnBu", vmin=0, vmax=max(1.0, np.nanmax(values)))
            ax.set_xticks(range(grid.shape[1]), [str(int(j)) for j in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [str(int(i)) for i in grid.index])
            ax.set_xlabel(f"j: top-j directions of A, r = {rb}")
            ax.set_ylabel(f"i: top-i directions of A, r = {ra}")
            ax.set_title(
                f"φ(A_r={ra}, A_r={rb}, i, j),\nmean of {sel['module'].nunique()} modules",
                fontsize=9.5,
            )
            if values.size <= 64:
                annotate_cells(ax, values, light_text=values > 0.6)
        if image is not None:
            bottom.colorbar(
                image,
                ax=ax_bot[:n_bottom],
                label="φ (0 = orthogonal, 1 = same subspace)",
                shrink=0.9,
            )
        ax = ax_bot[-1]
        for k, (ra, rb) in enumerate(pairs):
            sel = sub[(sub["rank_a"] == ra) & (sub["rank_b"] == rb)]
            color = RANK_COLORS[k % len(RANK_COLORS)]
            for (i, j), ls, what in (
                ((1, 1), "-", "top direction, i = j = 1"),
                ((ra, rb), "--", f"whole, i = {ra}, j = {rb}"),
            ):
                cell = sel[(sel["i"] == i) & (sel["j"] == j)]
                if len(cell):
                    band(ax, _by_layer(cell), color=color, ls=ls, label=f"r = {ra} vs {rb}: {what}")
        if pairs:
            ax.set_ylabel("φ(A_r1, A_r2, i, j) (0–1)")
            ax.set_xlabel(DEPTH_LABEL)
            ax.set_title("subspace similarity per layer", fontsize=9.5)
            ax.legend(fontsize=8, loc="best")
        else:
            empty_panel(ax_bot[0], "subspace similarity needs two or more LoRA ranks")
            ax.set_axis_off()
        fig.suptitle(
            model_title(model, table, "spectra of the LoRA update ΔW = (α/r)·B·A", offset=1)
        )
    return fig


# --------------------------------------------------------------------------- A/B dynamics


def ab_dynamics_figure(ab_dynamics: pd.DataFrame, model: str, energy_fraction: float = 0.9):
    """Energy ranks of A/B activations and gradients, trained (solid) against untrained (dashed), per layer.

    Top: A code a = A x, B output b = B a, weight-gradient norm ratio ‖∂L/∂B‖_F / ‖∂L/∂A‖_F.
    Bottom: ∂L/∂a, ∂L/∂b, and the cosine between the ΔW-space updates s²BBᵀG and s²GAᵀA.
    """
    table = rows(ab_dynamics, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    pct = f"{energy_fraction:.0%}"
    panels = [
        ("a_out", f"A code a = A·x:\ndirections holding {pct} energy"),
        ("b_out", f"B output b = B·a:\ndirections holding {pct} energy"),
        ("grad_norm_ratio_B_A", "weight-gradient norm ratio\n‖∂L/∂B‖_F / ‖∂L/∂A‖_F"),
        ("a_out_grad", f"gradient ∂L/∂a:\ndirections holding {pct} energy"),
        ("b_out_grad", f"gradient ∂L/∂b:\ndirections holding {pct} energy"),
        ("dW_cos", "cos(s²·B·Bᵀ·G, s²·G·Aᵀ·A)\n(ΔW-space updates via A and via B)"),
    ]
    with figure_style():
        fig, axes = plt.subplots(2, 3, figsize=(12.5, 7.4), sharex=True)
        for ax, (quantity, label) in zip(axes.ravel(), panels, strict=True):
            for method in ranks:
                for state, ls in (("trained", "-"), ("untrained", "--")):
                    sel = _by_layer(rows(table, method=method, quantity=quantity, state=state))
                    band(
                        ax,
                        sel,
                        color=colors[method],
                        ls=ls,
                        label=method_label(method) if state == "trained" else None,
                    )
            if quantity == "dW_cos":
                ax.axhline(0, color="0.5", lw=0.8)
            if quantity == "grad_norm_ratio_B_A":
                ax.axhline(1, color="0.5", lw=0.8)
                plain_log_axis(ax)
            ax.set_ylabel(label)
        for ax in axes[-1]:
            ax.set_xlabel(DEPTH_LABEL)
        if not ranks:
            empty_panel(axes[0, 0], "no LoRA runs")
        handles, labels = collect_legend(axes)
        handles += [Line2D([], [], color="0.3", ls="-"), Line2D([], [], color="0.3", ls="--")]
        labels += ["trained adapter and head", "untrained (fresh A, small random B, fresh head)"]
        legend_below(fig, handles, labels, ncols=min(len(labels), 4))
        fig.suptitle(
            model_title(
                model, table, "LoRA A/B activations and gradients on the training sample", offset=1
            )
        )
    return fig


# --------------------------------------------------------------------------- CKA


CKA_KINDS = {"linear": "linear CKA", "debiased": "debiased linear CKA", "rbf": "RBF CKA"}


def cka_figure(cka: pd.DataFrame, model: str):
    """Frozen vs LoRA encoder: CKA of the same layer (top, per CKA kind) and all layer pairs (bottom, linear CKA)."""
    table = rows(cka, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    kinds = [k for k in CKA_KINDS if k in set(table["kind"])]
    n_bottom = max(len(ranks), 1)
    with figure_style():
        fig = plt.figure(figsize=(max(11.5, 3.6 * n_bottom + 1.5), 8.6))
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.25])
        ax_top = top.subplots(1, max(len(kinds), 1), squeeze=False, sharey=False)[0]
        for ax, kind in zip(ax_top, kinds, strict=False):
            for method in ranks:
                sel = rows(table, method=method, kind=kind)
                sel = sel[sel["layer_frozen"] == sel["layer_lora"]].rename(
                    columns={"depth_frozen": "depth"}
                )
                band(ax, sel, color=colors[method], label=f"frozen vs {method_label(method)}")
            ax.axhline(1, color="0.5", lw=0.8, ls=":")
            ax.set_title(f"{CKA_KINDS[kind]}, same layer")
            ax.set_xlabel(DEPTH_LABEL)
        ax_top[0].set_ylabel("CKA(frozen layer ℓ, LoRA layer ℓ)\n(1 = same representation)")
        if not kinds:
            empty_panel(ax_top[0], "no LoRA runs")
        handles, labels = collect_legend(ax_top)
        if handles:
            top.legend(
                handles,
                labels,
                loc="outside lower center",
                ncols=min(len(labels), 4),
                frameon=False,
            )
        ax_bot = bottom.subplots(1, n_bottom, squeeze=False)[0]
        heat = rows(table, kind="linear")
        if len(heat):
            lo, hi = min(0.0, float(heat["mean"].min())), max(1.0, float(heat["mean"].max()))
        image = None
        for ax, method in zip(ax_bot, ranks, strict=False):
            ax.grid(False)
            sel = rows(heat, method=method)
            grid = (
                sel.pivot(index="layer_frozen", columns="layer_lora", values="mean")
                .sort_index()
                .sort_index(axis=1)
            )
            values = grid.to_numpy(float)
            image = ax.imshow(values, cmap="viridis", vmin=lo, vmax=hi, origin="lower")
            step = max(1, int(np.ceil(len(grid.columns) / 9)))
            ax.set_xticks(
                range(0, len(grid.columns), step), [str(int(v)) for v in grid.columns[::step]]
            )
            ax.set_yticks(
                range(0, len(grid.index), step), [str(int(v)) for v in grid.index[::step]]
            )
            ax.set_xlabel(f"LoRA encoder layer ({method_label(method)})")
            ax.set_ylabel("frozen encoder layer")
            ax.set_title(
                f"linear CKA, all layer pairs: frozen vs {method_label(method)}", fontsize=9.5
            )
            if values.shape[0] <= 13:
                annotate_cells(ax, values, light_text=(values - lo) / (hi - lo) <= 0.6)
        if image is not None:
            bottom.colorbar(image, ax=ax_bot, label="linear CKA (0–1)", shrink=0.9)
        elif not ranks:
            empty_panel(ax_bot[0], "no LoRA runs")
        fig.suptitle(
            model_title(
                model,
                table,
                "representational similarity, frozen vs LoRA",
                "layer_frozen",
                "depth_frozen",
            )
            + "\nlayer 0 = embedding, layer L = final LayerNorm output"
        )
    return fig


# --------------------------------------------------------------------------- rule graph


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
        fig = plt.figure(figsize=(max(width_in, 4.0), height_in + 0.45), layout="none")
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
