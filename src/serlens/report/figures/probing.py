"""Linear probes per layer: emotion against the item control task, and selectivity, per protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .style import (
    DEPTH_LABEL,
    band,
    chance_line,
    collect_legend,
    figure_style,
    fold_note,
    legend_below,
    method_colors,
    method_label,
    method_order,
    n_layers,
    new_subplots,
    rows,
    spread_note,
)

#: The ``task`` suffixes of the speaker band's rows (serlens.analysis.probing.BAND_BOUNDS;
#: not imported, so the figures do not import torch and scikit-learn).
BOUNDS = ("band_low", "band_high")

#: Column titles of the protocols (serlens.analysis.probing.PROTOCOLS).
PROTOCOL_TITLES = {
    "train_test": "train → test: fitted on the train split, scored on the test speakers\n"
    "(frozen encoder only: a LoRA adapter was trained on the train split)",
    "crossfit_test": "cross-fit on the test split: fitted on one half of the test speakers,\n"
    "scored on the other half, and swapped (every run; no adapter saw these)",
}


def _control_note(table: pd.DataFrame) -> str | None:
    """Why a panel has no control curve (its per-run tables' ``status`` says more), or None."""
    if not rows(table, task="control", metric="uar").empty:
        return None
    return "control task not scored: no recurring item (sentence)\nshared by fitting and scored utterances"


def with_band(table: pd.DataFrame, task: str, metric: str) -> pd.DataFrame:
    """The aggregated rows of ``task`` and ``metric`` (one method and protocol), with
    ``band_low``/``band_high`` = the mean over runs of the per-run speaker-band limits (the
    rows of task ``{task}_band_low``/``_band_high``); NaN where a layer has none, and the
    aggregate's own ``band_*`` columns (empty for probing) replaced."""
    est = rows(table, task=task, metric=metric).copy()
    for bound in BOUNDS:
        limit = rows(table, task=f"{task}_{bound}", metric=metric)
        by_layer = dict(zip(limit["layer"].astype(int), limit["mean"].astype(float), strict=True))
        est[bound] = [by_layer.get(int(layer), np.nan) for layer in est["layer"]]
    return est


def has_band(table: pd.DataFrame) -> bool:
    """Whether any row of ``table`` is a finite speaker-band limit."""
    if "task" not in table or "mean" not in table:
        return False
    limits = table[table["task"].astype(str).str.endswith(BOUNDS)]
    return bool(np.isfinite(pd.to_numeric(limits["mean"], errors="coerce")).any())


def band_caption(table: pd.DataFrame) -> str:
    """What the lines and the shaded areas of the figure are."""
    estimates = table[table["task"].isin(("emotion", "control"))] if "task" in table else table
    if not has_band(table):
        return spread_note(estimates)
    return (
        f"lines: mean over {fold_note(estimates)}; shaded: each fold's 95 % band from "
        "resampling its test speakers, limits averaged over folds"
    )


def probing_figure(probing: pd.DataFrame, model: str, n_classes: int | None = None):
    """Probe UAR per layer for emotion (solid) and the item control task (dotted), and
    selectivity = emotion − control, one column per protocol (train → test, cross-fit).

    Shaded: the speaker band where the table has its rows (the per-fold speaker-bootstrap
    limits of :mod:`serlens.analysis.probing`, averaged over folds), else ± std over runs."""
    table = rows(probing, model=model)
    if "protocol" not in table.columns:  # a table from before the protocols
        table = table.assign(protocol="train_test")
    methods = method_order(table["method"])
    colors = method_colors(methods)
    protocols = list(PROTOCOL_TITLES)  # both columns always, so figures of any grid read alike
    with figure_style():
        fig, axes = new_subplots(
            2,
            len(protocols),
            figsize=(5.6 * len(protocols), 7.4),
            sharex=True,
            sharey="row",
            squeeze=False,
        )
        for col, protocol in enumerate(protocols):
            top, bottom = axes[0, col], axes[1, col]
            sel = rows(table, protocol=protocol)
            if sel.empty:
                message = (
                    "no run probed train → test:\nonly frozen encoders are"
                    if protocol == "train_test"
                    else "no run probed by cross-fit"
                )
                for ax in (top, bottom):
                    ax.text(
                        0.5,
                        0.5,
                        message,
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        color="0.3",
                    )
                top.set_title(PROTOCOL_TITLES[protocol], fontsize=9.5)
                bottom.set_xlabel(DEPTH_LABEL)
                continue
            for method in methods:
                mine = rows(sel, method=method)
                if mine.empty:
                    continue
                band(
                    top,
                    with_band(mine, "emotion", "uar"),
                    color=colors[method],
                    label=method_label(method),
                )
                band(
                    top,
                    with_band(mine, "control", "uar"),
                    color=colors[method],
                    ls=":",
                    marker="x",
                )
                band(
                    bottom,
                    with_band(mine, "emotion", "selectivity_uar"),
                    color=colors[method],
                )
            chance_line(top, n_classes)
            top.set_title(PROTOCOL_TITLES[protocol], fontsize=9.5)
            if rows(sel, task="emotion", metric="selectivity_uar").empty:
                bottom.text(
                    0.5,
                    0.5,
                    "no selectivity: " + (_control_note(sel) or "no control task"),
                    ha="center",
                    va="center",
                    transform=bottom.transAxes,
                    color="0.3",
                )
            else:
                bottom.axhline(0, color="0.5", lw=0.8)
            bottom.set_xlabel(DEPTH_LABEL)
        axes[0, 0].set_ylabel("probe UAR on the scored\ntest utterances (0–1)")
        axes[1, 0].set_ylabel("selectivity\n= UAR(emotion) − UAR(control)")
        handles, labels = collect_legend(axes)
        chance = [(h, lab) for h, lab in zip(handles, labels, strict=True) if "chance" in lab]
        pairs = [(h, lab) for h, lab in zip(handles, labels, strict=True) if "chance" not in lab]
        pairs += [
            (Line2D([], [], color="0.3", ls="-", marker="o", markersize=3.5), "emotion task"),
            (
                Line2D([], [], color="0.3", ls=":", marker="x", markersize=3.5),
                "control task: a fixed random label per sentence (item)",
            ),
            *chance,
        ]
        if has_band(table):
            pairs.append(
                (
                    Patch(color="0.3", alpha=0.15, lw=0),
                    "shaded: 95 % speaker band of one fold, averaged over folds",
                )
            )
        legend_below(fig, [h for h, _ in pairs], [lab for _, lab in pairs], ncols=3)
        estimates = table[table["task"].isin(("emotion", "control"))] if len(table) else table
        L = n_layers(estimates) if len(estimates) else None
        size = f", L = {L} layers" if L else ""
        fig.suptitle(
            f"{model}{size}: linear probes on pooled layer states\n({band_caption(table)})"
        )
    return fig
