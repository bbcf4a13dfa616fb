"""Claim 3 of the paper, layer by layer: the forward CKA of LoRA's A codes and B outputs,
trained against untrained, beside its null, and the CKA of B's and A's gradients.

Quantities (``ab_dynamics.tsv``, :mod:`serlens.analysis.ab_cka`), one line per method:

* sound estimator (every fold): ``cka_fwd_a`` / ``cka_fwd_b`` (debiased CKA of the trained
  run's A codes / B outputs against the untrained baseline's, ≥ 2000 frames sampled by
  utterance) against ``cka_fwd_a_null`` / ``cka_fwd_b_null`` (two independent untrained
  draws); ``cka_bwd_ba``, CKA(∂L/∂b, ∂L/∂a) of the trained and of the untrained model;
* the paper's estimator (fold 1): the same with the ``paper_cka_`` prefix (biased linear CKA
  of the A codes, RBF CKA of the B outputs and of the gradients, ≤ 40 utterances each
  flattened to one vector).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .ab_dynamics import with_speaker_band
from .contributions import legend_under
from .style import (
    DEPTH_LABEL,
    band,
    by_layer,
    empty_panel,
    figure_style,
    fold_note,
    lora_methods,
    method_colors,
    method_label,
    model_title,
    new_subplots,
    rows,
)

#: (panel title, solid (quantity, state), dashed (quantity, state), dashed's meaning).
PANELS = {
    "sound": (
        ("forward: A codes a = A·x", ("cka_fwd_a", "trained"), ("cka_fwd_a_null", "untrained")),
        ("forward: B outputs b = B·a", ("cka_fwd_b", "trained"), ("cka_fwd_b_null", "untrained")),
        ("backward: ∂L/∂b vs ∂L/∂a", ("cka_bwd_ba", "trained"), ("cka_bwd_ba", "untrained")),
    ),
    "paper": (
        (
            "forward: A codes (linear CKA)",
            ("paper_cka_fwd_a", "trained"),
            ("paper_cka_fwd_a_null", "untrained"),
        ),
        (
            "forward: B outputs (RBF CKA)",
            ("paper_cka_fwd_b", "trained"),
            ("paper_cka_fwd_b_null", "untrained"),
        ),
        (
            "backward: ∂L/∂b vs ∂L/∂a (RBF CKA)",
            ("paper_cka_bwd_ba", "trained"),
            ("paper_cka_bwd_ba", "untrained"),
        ),
    ),
}
ROW_LABELS = {
    "sound": "debiased CKA, ≥ 2000 frames\nsampled by utterance (every fold)",
    "paper": "the paper's estimator: ≤ 40 fold-1\nutterances, each flattened (fold 1)",
}


def _curve(table: pd.DataFrame, method: str, quantity: str, state: str) -> pd.DataFrame:
    """The mean curve over runs, with the speaker-jackknife band (``{quantity}_band_low/high``,
    mean over runs) where the table has it."""
    own = rows(table, method=method)
    return with_speaker_band(
        by_layer(rows(own, quantity=quantity, state=state)), own, quantity, state
    )


def _shading_note(table: pd.DataFrame) -> str:
    """What the shaded areas are: per row, the speaker jackknife where the table has it."""

    def banded(prefix: str) -> bool:
        return any(
            not rows(table, quantity=f"{prefix}{q}_band_low").empty
            for q in ("cka_fwd_a", "cka_bwd_ba")
        )

    sound, paper = banded(""), banded("paper_")
    if not (sound or paper):
        return "shaded: ± std over runs"
    with_band = " and ".join(r for r, b in (("row 1", sound), ("row 2", paper)) if b)
    without = [r for r, b in (("row 1", sound), ("row 2", paper)) if not b]
    return (
        f"shaded, {with_band}: 95 % speaker-jackknife interval over the training sample's "
        "speakers (one run's, averaged over runs)"
        + (f"; {without[0]}: ± std over runs" if without else "")
    )


def ab_cka_figure(ab_dynamics: pd.DataFrame, model: str):
    """Claim 3 per layer (module docstring): row 1 the sound estimator, row 2 the paper's.

    Forward panels: solid = CKA of the trained run's codes with the untrained baseline's,
    dashed = the same CKA between two independent untrained draws (the null: what two
    random adapters on the same inputs share). Backward panels: solid = CKA(∂L/∂b, ∂L/∂a)
    of the trained model, dashed = of the untrained one. Shaded: row 1 the 95 % speaker
    jackknife interval where the table has it (row 2: of the paper's sample's speakers),
    else ± std over runs. A row
    without rows in the table (an older pass, or no fold 1) says so.
    """
    table = rows(ab_dynamics, model=model)
    methods = lora_methods(table["method"])
    colors = method_colors(table["method"])
    with figure_style():
        fig, axes = new_subplots(2, 3, figsize=(15.0, 8.8 + 0.2 * len(methods)), sharex=True)
        for r, (row, panels) in enumerate(PANELS.items()):
            for c, (title, solid, dashed) in enumerate(panels):
                ax = axes[r, c]
                drawn = False
                for method in methods:
                    for (quantity, state), ls in ((solid, "-"), (dashed, "--")):
                        curve = _curve(table, method, quantity, state)
                        drawn |= len(curve) > 0
                        band(
                            ax,
                            curve,
                            color=colors[method],
                            ls=ls,
                            label=method_label(method) if ls == "-" else None,
                        )
                if not drawn:
                    empty_panel(ax, f"no {solid[0]} rows in the table")
                    continue
                ax.set_title(title)
                ax.axhline(0.0, color="0.6", lw=0.8)
                ax.axhline(1.0, color="0.75", lw=0.8)
                ax.set_xlabel(DEPTH_LABEL)
                ax.tick_params(labelbottom=True)
            axes[r, 0].set_ylabel(ROW_LABELS[row])
        if not methods:
            empty_panel(axes[0, 0], "no LoRA or DoRA runs")
        handles = [Line2D([], [], color=colors[m], marker="o") for m in methods]
        labels = [method_label(m) for m in methods]
        handles += [
            Line2D([], [], color="0.3", ls="-"),
            Line2D([], [], color="0.3", ls="--"),
            Patch(color="0.3", alpha=0.15, lw=0),
        ]
        labels += [
            "solid: trained vs untrained codes (forward); trained model's gradients (backward)",
            "dashed: untrained vs a second untrained draw, the null (forward); untrained "
            "model's gradients (backward)",
            _shading_note(table),
        ]
        legend_under(fig, handles, labels, ncols=2)
        fig.suptitle(
            model_title(
                model,
                table,
                "claim 3, forward alignment and backward differentiation of A and B",
                offset=1,
                spread=f"mean over {fold_note(table)}; shading: see the legend",
            )
        )
    return fig
