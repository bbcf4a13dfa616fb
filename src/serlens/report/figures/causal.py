"""Causal tests (``causal``): ablation, patching and skip curves over relative depth."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from .style import (
    band,
    band_note,
    chance_line,
    collect_legend,
    empty_panel,
    figure_style,
    legend_below,
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
            ("patch_vproj_adapted_into_frozen", "adapted v_proj output into the frozen", "-."),
            ("patch_vproj_frozen_into_adapted", "frozen v_proj output into the adapted", ":"),
        ],
    ),
    (
        "layer skip and component ablation",
        "accuracy (WAR) with the run's head",
        "correct",
        [
            ("skip_adapted", "skip layer l (adapted)", "-"),
            ("ablate_attn_adapted", "{ablation}-ablate attention (adapted)", "--"),
            ("ablate_mlp_adapted", "{ablation}-ablate MLP (adapted)", "-."),
            ("skip_upto_adapted", "skip layers 1..l (adapted)", (0, (1, 1))),
            ("skip_frozen", "skip layer l (frozen)", ":"),
        ],
    ),
)


_FAMILIES = [family for *_, families in PANELS for family, _, _ in families]
#: One colour per intervention across the panels, so one legend serves the figure.
COLOURS = {family: matplotlib.colormaps["tab20"](k / 20) for k, family in enumerate(_FAMILIES)}


def causal_figure(table: pd.DataFrame, model: str, n_classes: int | None = None):
    """One row per method that adapts the encoder, one column per family of interventions; mean over runs with
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
            empty_panel(axes[0, 0], "no adapted run has causal tests")
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
                lines = []
                for family, label, style in families:
                    line = rows(sel, family=family, quantity=quantity)
                    if "{ablation}" in label:  # mean or resample, as the pass computed it
                        kinds = sorted(set(line["variant"])) if len(line) else ["mean"]
                        label = label.format(ablation="/".join(kinds))
                    band(ax, line, ls=style, label=label, color=COLOURS[family])
                    lines.append(line["mean"].to_numpy(float))
                if quantity == "share":
                    # the band of a share explodes when the gap is small: keep the means in view
                    means = np.concatenate([*lines, [0.0, 1.0]])
                    means = means[np.isfinite(means)]
                    ax.set_ylim(means.min() - 0.35, means.max() + 0.35)
                ax.set_xlabel("relative depth of layer l (l / L)")
                ax.set_xlim(0, 1.05)
                if r == 0:
                    ax.set_title(title, fontsize=9.5)
                if c == 0:
                    gap = rows(sel, family="reference", quantity="logit_diff")
                    on, off = (rows(gap, variant=v)["mean"] for v in ("on", "off"))
                    size = (
                        f"\ngap: {float(on.iloc[0]) - float(off.iloc[0]):+.2f} (logit diff.)"
                        if len(on) and len(off)
                        else ""
                    )
                    ax.set_ylabel(f"{method_label(method)}{size}\n{ylabel}", fontsize=8.5)
                else:
                    ax.set_ylabel(ylabel, fontsize=8.5)
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
        if methods:
            handles, labels = collect_legend(axes[0])
            legend_below(fig, handles, labels, ncols=4)
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
