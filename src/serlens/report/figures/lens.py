"""Logit lens (and tuned lens): the trained head read off every layer."""

from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D

from .contributions import RANGES, STD, curve, legend_under, shading_legend, spread_title
from .style import (
    DEPTH_LABEL,
    chance_line,
    collect_legend,
    figure_style,
    lora_methods,
    method_colors,
    method_label,
    method_order,
    new_subplots,
    rows,
)

METRICS = [
    ("uar", "UAR of argmax p_ℓ (0–1)", "UAR against the labels"),
    (
        "agreement",
        "agreement with final prediction\n(share of utterances)",
        "agreement with the run's output",
    ),
    ("kl", "KL(p_L ‖ p_ℓ) (nats)", "KL divergence from the run's output"),
]
#: Thin lines of the tuned lens' KL panel: the same KL on the utterances it was fitted on
#: and on dev (early stopping), beside the test KL.
FIT_LINES = {"fit_kl": ("-.", "KL on the fitting utterances"), "dev_kl": ("--", "KL on dev")}
#: The paper's logit lens (:data:`serlens.analysis.logit_lens.PAPER_LENS`: no final
#: LayerNorm), drawn over the logit lens' row as a dashed line without shading.
PAPER_LENS = "paper_no_final_ln"
PAPER_LINE = {"ls": (0, (4, 2)), "lw": 1.3, "alpha": 0.9}
PAPER_LABEL = (
    "dashed: the paper's logit lens (no final LayerNorm; its last layer is not the output)"
)


def lens_fit_note(table: pd.DataFrame) -> str:
    """How the tuned lens was fitted, as far as the aggregated table tells (``dev_kl`` rows
    exist only where it was fitted on the fold's training utterances and early-stopped on dev)."""
    tuned = rows(table, lens="tuned")
    if tuned.empty:
        return ""
    if "dev_kl" in set(tuned["metric"]):
        return "tuned lens: L2-regularised, fitted on the fold's training utterances, early-stopped on dev"
    return "tuned lens: L2-regularised, fitted on the training sample (no dev states: no early stopping)"


def logit_lens_figure(logit_lens: pd.DataFrame, model: str, n_classes: int | None = None):
    """Per-layer UAR, agreement with the final prediction and KL(p_L ‖ p_ℓ): frozen against each
    adapted method.

    One row per lens (logit lens; tuned lens when fitted). Each run is read with its own head
    on the encoder it classifies with (``base`` for frozen runs, ``adapted`` for the runs that
    train the encoder: LoRA, DoRA, full fine-tuning). Where the table has the paper's lens
    (``lens = paper_no_final_ln``, layers 1..L), the logit lens' row draws it as a dashed line
    in the method's colour, without shading.
    Shading: the speaker band where the table has it (agreement, KL: means over utterances);
    UAR is not a mean over utterances, so its panels show ± std over runs (the legend says
    so). The tuned lens' KL panel adds thin lines for the KL on the fitting and dev utterances.
    """
    table = rows(logit_lens, model=model)
    methods = [m for m in method_order(table["method"])]
    adapted = set(lora_methods(methods))  # LoRA, DoRA, full: read on their own encoder
    colors = method_colors(methods)
    lenses = [lens for lens in ("logit", "tuned") if lens in set(table["lens"])]
    kinds, std_metrics, fit_lines, paper_lines = [], set(), set(), False
    with figure_style():
        fig, axes = new_subplots(
            max(len(lenses), 1),
            3,
            figsize=(11.5, 1.4 + 3.0 * max(len(lenses), 1)),
            squeeze=False,
            sharex=True,
        )
        for r, lens in enumerate(lenses):
            for c, (metric, label, title) in enumerate(METRICS):
                ax = axes[r, c]
                std_here = set()
                for method in methods:
                    variant = "adapted" if method in adapted else "base"
                    sel = rows(table, lens=lens, method=method, variant=variant, metric=metric)
                    kind = curve(
                        ax, sel, RANGES[metric], color=colors[method], label=method_label(method)
                    )
                    kinds.append(kind)
                    if kind == STD:
                        std_metrics.add(metric)
                        std_here.add(metric)
                    if lens == "logit":
                        paper = rows(
                            table, lens=PAPER_LENS, method=method, variant=variant, metric=metric
                        ).sort_values("depth")
                        if len(paper):
                            paper_lines = True
                            ax.plot(
                                paper["depth"], paper["mean"], color=colors[method], **PAPER_LINE
                            )
                    if lens == "tuned" and metric == "kl":
                        for extra, (ls, _) in FIT_LINES.items():
                            fit = rows(
                                table, lens=lens, method=method, variant=variant, metric=extra
                            ).sort_values("depth")
                            if len(fit):
                                fit_lines.add(extra)
                                ax.plot(
                                    fit["depth"],
                                    fit["mean"],
                                    ls=ls,
                                    lw=1,
                                    color=colors[method],
                                    alpha=0.8,
                                )
                if metric == "uar":
                    chance_line(ax, n_classes)
                ax.set_ylabel(label)
                ax.set_title(
                    title + ("\n(hatched: ± 1 std over runs)" if metric in std_here else "")
                )
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
        if paper_lines:
            handles.append(Line2D([], [], color="0.3", **PAPER_LINE))
            labels.append(PAPER_LABEL)
        for extra in FIT_LINES:
            if extra in fit_lines:
                ls, text = FIT_LINES[extra]
                handles.append(Line2D([], [], color="0.3", ls=ls, lw=1))
                labels.append(f"tuned lens, {text}")
        names = {"uar": "UAR", "agreement": "agreement", "kl": "KL"}
        note = ", ".join(names[m] for m, *_ in METRICS if m in std_metrics)
        if std_metrics == {"uar"}:
            note = "UAR: not a mean over utterances"
        extra = shading_legend(kinds, {STD: f" — {note}"} if note else None)
        legend_under(fig, handles + extra[0], labels + extra[1], ncols=3)
        what = "reading the trained head off every layer"
        fit = lens_fit_note(table)
        fig.suptitle(spread_title(model, table, what) + (f"; {fit}" if fit else ""))
    return fig
