"""Representational similarity (CKA) of the frozen and the LoRA-adapted encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .style import (
    DEPTH_LABEL,
    annotate_cells,
    band,
    collect_legend,
    empty_panel,
    figure_style,
    lora_methods,
    method_colors,
    method_label,
    model_title,
    new_figure,
    rows,
)

CKA_KINDS = {"linear": "linear CKA", "debiased": "debiased linear CKA", "rbf": "RBF CKA"}


def cka_figure(cka: pd.DataFrame, model: str):
    """Frozen vs LoRA encoder: CKA of the same layer (top, per CKA kind) and all layer pairs (bottom, linear CKA)."""
    table = rows(cka, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    kinds = [k for k in CKA_KINDS if k in set(table["kind"])]
    n_bottom = max(len(ranks), 1)
    with figure_style():
        fig = new_figure(figsize=(max(11.5, 3.6 * n_bottom + 1.5), 8.6))
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
