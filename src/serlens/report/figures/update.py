"""How an adapter's update grows over the epochs (``update_dynamics``; LoRA and DoRA)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from .ab_dynamics import target_handles, target_markers, target_name, target_order
from .contributions import legend_under
from .style import (
    empty_panel,
    figure_style,
    fold_note,
    method_label,
    method_order,
    new_subplots,
    rows,
)

PANELS = (
    ("delta_w_norm", "‖ΔW‖_F (size of the update)"),
    ("a_change", "‖A_e − A_0‖_F / ‖A_0‖_F\n(A's drift from its initialisation)"),
    ("a_init_phi", "φ(A_e, A_0): overlap with the initial\nrow space (1 = same subspace)"),
)
#: Drawn when some method has it (DoRA's magnitude; LoRA has none).
MAGNITUDE_PANEL = ("magnitude_change", "‖m_e − m_0‖ / ‖m_0‖\n(DoRA: drift of the magnitude)")


#: The most layers the legend names one by one; deeper models get a few spread over depth
#: (the colour is the depth either way).
MAX_LAYER_ENTRIES = 8


def _layer_entries(table: pd.DataFrame, cmap) -> tuple[list, list[str]]:
    layers = table[["layer", "depth"]].drop_duplicates("layer").sort_values("layer")
    if len(layers) > MAX_LAYER_ENTRIES:
        pick = np.unique(np.linspace(0, len(layers) - 1, 5).round().astype(int))
        layers = layers.iloc[pick]
    handles = [Line2D([], [], color=cmap(float(d)), lw=2) for d in layers["depth"]]
    labels = [
        f"layer {int(i)} (ℓ / L = {float(d):.2f})"
        for i, d in zip(layers["layer"], layers["depth"], strict=True)
    ]
    return handles, labels


def update_figure(table: pd.DataFrame, model: str):
    """One row per method with adapter snapshots (LoRA, DoRA), one column per quantity; a
    line per module (colour = layer depth; marker = module type where methods adapt several),
    mean over runs at each epoch; epoch 0 is the initialisation. ΔW is each method's own
    (LoRA s·B·A, DoRA W′ − W₀); a DoRA method adds the drift of its magnitude, a panel LoRA
    rows leave empty. One legend under the panels: the layers' colours and the module
    types' markers."""
    table = rows(table, model=model)
    if "metric" in table:
        nulls = table[table["metric"] == "random_value"]
        table = table[table["metric"] == "value"]
    else:
        nulls = table.iloc[:0]
    methods = method_order(table["method"]) if len(table) else []
    panels = PANELS
    if len(table) and (table["quantity"] == MAGNITUDE_PANEL[0]).any():
        panels = (*PANELS, MAGNITUDE_PANEL)
    cmap = matplotlib.colormaps["viridis"]
    types = target_order(table["module"].map(target_name)) if len(table) else []
    markers = target_markers(types) if len(types) > 1 else {}
    with figure_style():
        fig, axes = new_subplots(
            max(len(methods), 1),
            len(panels),
            figsize=(
                max(12.5 * len(panels) / len(PANELS), 11.0),
                1.6 + 3.0 * max(len(methods), 1),
            ),
            squeeze=False,
        )
        if not methods:
            empty_panel(axes[0, 0], "no run has adapter snapshots")
        for r, method in enumerate(methods):
            for c, (quantity, label) in enumerate(panels):
                ax = axes[r, c]
                sel = rows(table, method=method, quantity=quantity)
                if r == 0:
                    ax.set_title(label, fontsize=9.5)
                if c == 0:
                    ax.set_ylabel(method_label(method))
                if not len(sel) and quantity == MAGNITUDE_PANEL[0]:
                    empty_panel(ax, "no magnitude (LoRA)")
                    continue
                # one line per module: a layer may hold several (q_proj, fc1: markers)
                for (module, depth), line in sel.groupby(["module", "depth"]):
                    line = line.sort_values("epoch")
                    ax.plot(
                        line["epoch"],
                        line["mean"],
                        color=cmap(float(depth)),
                        lw=1.3,
                        ls="-",
                        marker=markers.get(target_name(module), "o"),
                        markersize=3.5 if markers else 3,
                    )
                null = rows(nulls, method=method, quantity=quantity)
                if len(null):
                    # far below the curves: a note, not a line that would flatten them
                    ax.text(
                        0.02,
                        0.04,
                        f"random subspace: φ = r/d = {np.nanmean(null['mean']):.3f}",
                        transform=ax.transAxes,
                        fontsize=8,
                        color="0.3",
                    )
                if r == len(methods) - 1 or quantity == MAGNITUDE_PANEL[0]:
                    ax.set_xlabel("epoch (0 = initialisation)")
                ax.xaxis.get_major_locator().set_params(integer=True)
        if methods:
            # every method's layers by colour, and the module types by marker
            handles, labels = _layer_entries(table, cmap)
            if markers:
                more, names = target_handles(types, ls="-")
                handles += more
                labels += [f"module {t}" for t in names]
            legend_under(fig, handles, labels, ncols=max(len(handles) // 2 + 1, 4))
        fig.suptitle(
            f"{model}: how the adapter's update grows over training "
            f"(mean over {fold_note(table)}; colour = layer depth"
            + ("; marker = module type)" if markers else ")")
        )
    return fig
