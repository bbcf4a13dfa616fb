"""Linear probes per layer: emotion against the item control task, and selectivity, per protocol."""

from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D

from .style import (
    DEPTH_LABEL,
    band,
    chance_line,
    collect_legend,
    figure_style,
    legend_below,
    method_colors,
    method_label,
    method_order,
    model_title,
    new_subplots,
    rows,
)

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


def probing_figure(probing: pd.DataFrame, model: str, n_classes: int | None = None):
    """Probe UAR per layer for emotion (solid) and the item control task (dotted), and
    selectivity = emotion − control, one column per protocol (train → test, cross-fit)."""
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
                    rows(mine, task="emotion", metric="uar"),
                    color=colors[method],
                    label=method_label(method),
                )
                band(
                    top,
                    rows(mine, task="control", metric="uar"),
                    color=colors[method],
                    ls=":",
                    marker="x",
                )
                band(
                    bottom,
                    rows(mine, task="emotion", metric="selectivity_uar"),
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
        legend_below(fig, [h for h, _ in pairs], [lab for _, lab in pairs], ncols=3)
        fig.suptitle(model_title(model, table, "linear probes on pooled layer states"))
    return fig
