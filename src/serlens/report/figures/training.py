"""Training curves per test fold, from the runs' ``history*.tsv``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.lines import Line2D

from .style import (
    chance_line,
    collect_legend,
    figure_style,
    legend_below,
    method_label,
    method_order,
    new_subplots,
)


def load_histories(
    files: Mapping[tuple[str, int, int], Path],
) -> dict[tuple[str, int, int], pd.DataFrame]:
    """Read ``{(method, seed, fold): history.tsv}`` of one model; absent files are left out."""
    return {
        (str(method), int(seed), int(fold)): pd.read_csv(path, sep="\t")
        for (method, seed, fold), path in files.items()
        if Path(path).is_file()
    }


def selected_epoch(history: pd.DataFrame) -> int | None:
    """The epoch whose checkpoint was kept: the last one flagged ``best`` (dev UAR improved)."""
    if "best" not in history:
        return None
    best = history[history["best"].astype(str).str.lower() == "true"]
    return int(best["epoch"].iloc[-1]) if len(best) else None


def training_curves_figure(
    histories: Mapping[tuple[str, int, int], pd.DataFrame],
    model: str,
    n_classes: int | None = None,
):
    """Dev UAR (top) and training loss (bottom) per epoch; one column per method, one line per
    run: the colour is the test fold, the line style the training seed.

    A star marks the epoch whose checkpoint was kept (best dev UAR).
    """
    methods = method_order(m for m, _, _ in histories)
    folds = sorted({f for _, _, f in histories})
    seeds = sorted({s for _, s, _ in histories})
    fold_colors = {f: matplotlib.colormaps["tab10"](i % 10) for i, f in enumerate(folds)}
    styles = ["-", "--", ":", "-."]
    seed_style = {s: styles[i % len(styles)] for i, s in enumerate(seeds)}
    with figure_style():
        fig, axes = new_subplots(
            2, len(methods), figsize=(2.2 + 2.7 * len(methods), 5.6), squeeze=False
        )
        for c, method in enumerate(methods):
            for seed, fold in ((s, f) for s in seeds for f in folds):
                history = histories.get((method, seed, fold))
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
                        ls=seed_style[seed],
                        lw=1.4,
                        label=f"test fold {fold}" + (f", seed {seed}" if len(seeds) > 1 else ""),
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
        seeds_note = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
        fig.suptitle(f"{model}: training curves per test fold ({seeds_note})")
    return fig
