"""Performance figures: UAR/WAR per model and method, and confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from .style import (
    chance_line,
    empty_panel,
    figure_style,
    legend_below,
    method_colors,
    method_label,
    method_order,
    new_subplots,
    rows,
)


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
            fig, axes = new_subplots(1, 2, figsize=(max(7.5, 3.0 + 2.5 * len(models)), 4.2))
        else:  # stacked, so that many models stay readable at report width
            fig, axes = new_subplots(
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
        labels += ["one run (test fold × seed)", "mean ± std over runs"]
        if n_classes:
            handles.append(Line2D([], [], color="0.5", ls=":"))
            labels.append(f"chance (1/{n_classes})")
        legend_below(fig, handles, labels, ncols=min(len(labels), 4))
        n = performance.groupby(["model", "method"])["fold"].nunique()
        folds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
        seeds = performance["seed"].nunique() if "seed" in performance else 1
        fig.suptitle(
            "Test-fold performance, speaker-independent folds "
            f"({folds} folds × {seeds} seed{'s' if seeds != 1 else ''} per bar)"
        )
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
        fig, axes = new_subplots(
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
                n_seeds = int(sel["n_seeds"].iloc[0]) if "n_seeds" in sel else 1
                runs = f"{n_folds} folds" + (f" × {n_seeds} seeds" if n_seeds > 1 else "")
                ax.set_title(
                    f"{method_label(method)}\n{runs}, n = {int(counts.sum())} utt.",
                    fontsize=9,
                )
        if image is not None:
            fig.colorbar(
                image, ax=axes, shrink=0.8, label="share of the true class (row-normalised)"
            )
        fig.suptitle("Confusion matrices, test utterances summed over folds (count and row share)")
    return fig
