"""Causal tests (``causal``): ablation, patching and skip curves over relative depth."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .style import (
    band,
    band_note,
    chance_line,
    empty_panel,
    figure_style,
    lora_methods,
    method_label,
    new_subplots,
    rows,
)

#: (column title, y label, quantity, [(family, label, line style)])
PANELS = (
    (
        "adapter ablation: where the useful change sits",
        "share of the gap (0 = frozen encoder, 1 = the run)",
        "share",
        [
            ("adapter_off", "layer l's adapter off", "-"),
            ("adapter_only", "only layer l's adapter on", "--"),
            ("adapters_upto", "adapters on in layers 1..l", "-."),
            ("adapters_from", "adapters on in layers l..L", ":"),
        ],
    ),
    (
        "activation patching of layer l's output",
        "share of the gap",
        "share",
        [
            ("patch_adapted_into_frozen", "adapted output into the frozen encoder", "-"),
            ("patch_frozen_into_adapted", "frozen output into the adapted encoder", "--"),
        ],
    ),
    (
        "layer skip and component mean-ablation",
        "accuracy (WAR) with the run's head",
        "correct",
        [
            ("skip_adapted", "skip layer l (adapted)", "-"),
            ("ablate_attn_adapted", "mean-ablate attention (adapted)", "--"),
            ("ablate_mlp_adapted", "mean-ablate MLP (adapted)", "-."),
            ("skip_upto_adapted", "skip layers 1..l (adapted)", (0, (1, 1))),
            ("skip_frozen", "skip layer l (frozen)", ":"),
        ],
    ),
)


def causal_figure(table: pd.DataFrame, model: str, n_classes: int | None = None):
    """One row per LoRA method, one column per family of interventions; mean over runs with
    the speaker band; the reference levels (the run, the frozen encoder with the run's head)
    drawn as grey lines."""
    table = rows(table, model=model)
    methods = lora_methods(table["method"]) if len(table) else []
    with figure_style():
        fig, axes = new_subplots(
            max(len(methods), 1),
            len(PANELS),
            figsize=(14.0, 1.2 + 3.3 * max(len(methods), 1)),
            squeeze=False,
        )
        if not methods:
            empty_panel(axes[0, 0], "no LoRA run has causal tests")
        for r, method in enumerate(methods):
            sel = rows(table, method=method)
            for c, (title, ylabel, quantity, families) in enumerate(PANELS):
                ax = axes[r, c]
                ref = rows(sel, family="reference", quantity=quantity)
                for variant, colour, text in (
                    ("on", "0.25", "the run"),
                    ("off", "0.6", "frozen + LoRA head"),
                ):
                    level = rows(ref, variant=variant)["mean"]
                    if len(level):
                        ax.axhline(float(level.iloc[0]), color=colour, lw=1, ls="-", label=text)
                if quantity == "correct":
                    chance_line(ax, n_classes)
                for family, label, style in families:
                    band(ax, rows(sel, family=family, quantity=quantity), ls=style, label=label)
                ax.set_xlabel("relative depth of layer l (l / L)")
                ax.set_xlim(0, 1.05)
                if r == 0:
                    ax.set_title(title, fontsize=9.5)
                if c == 0:
                    ax.set_ylabel(f"{method_label(method)}\n{ylabel}", fontsize=8.5)
                else:
                    ax.set_ylabel(ylabel, fontsize=8.5)
                if r == 0:
                    ax.legend(fontsize=6.5, loc="best")
            swaps = rows(sel, family="ab_swap", quantity="share")
            if len(swaps):
                text = ", ".join(
                    f"{_swap_label(v)}: share {m:.2f}"
                    for v, m in zip(swaps["variant"], swaps["mean"], strict=True)
                    if np.isfinite(m)
                )
                axes[r, 0].text(
                    0.02, 0.02, text, transform=axes[r, 0].transAxes, fontsize=7, color="0.2"
                )
        fig.suptitle(
            f"{model}: what the run's classifier loses under interventions on the encoder\n"
            f"({band_note(table)}; share of the gap = (variant − frozen) / (run − frozen) "
            "of the true class's logit difference)",
            fontsize=10,
        )
    return fig


def _swap_label(variant: str) -> str:
    return {"init_a": "trained B with initial A", "rotated_b": "A with B·Q (rotated)"}.get(
        variant, variant
    )
