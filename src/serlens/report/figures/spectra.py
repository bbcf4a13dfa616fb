"""Spectra of the LoRA update ΔW and the cross-rank subspace similarity."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D

from .style import (
    DEPTH_LABEL,
    LINESTYLES,
    RANK_COLORS,
    annotate_cells,
    band,
    by_layer,
    collect_legend,
    empty_panel,
    figure_style,
    lora_methods,
    method_colors,
    method_label,
    model_title,
    module_type,
    new_figure,
    plain_log_axis,
    rows,
)


def spectra_figure(
    svd: pd.DataFrame, subspace: pd.DataFrame, model: str, intruder_epsilon: float | None = None
):
    """Spectra of the LoRA update ΔW = (α/r)·B·A per adapted module, and the cross-rank subspace similarity.

    Top: singular values σ_i of ΔW, one line per layer (colour = depth), one panel per rank.
    Middle: effective rank, stable rank and 90 %-energy rank of ΔW, and the intruder count of
    the merged weight, per layer. Bottom: φ(A_r1, A_r2, i, j) heat maps (Hu et al. 2021, §7),
    averaged over adapted modules and folds.
    """
    table = rows(svd, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    types = sorted({module_type(m) for m in table["module"]}) if len(table) else []
    styles = {t: LINESTYLES[i % len(LINESTYLES)] for i, t in enumerate(types)}
    sub = rows(subspace, model=model) if subspace is not None and len(subspace) else pd.DataFrame()
    pairs = (
        sorted({(int(a), int(b)) for a, b in zip(sub["rank_a"], sub["rank_b"], strict=True)})
        if len(sub)
        else []
    )
    n_top = max(len(ranks), 1)
    n_bottom = max(len(pairs), 1)
    width = max(13.0, 3.2 * max(n_top, n_bottom + 1))  # about 3 inches a panel
    depth_cmap = matplotlib.colormaps["viridis"]
    with figure_style():
        bottom_height = (
            1.15 if pairs else 0.2
        )  # no cross-rank heat maps with one rank: a one-line note
        fig = new_figure(figsize=(width, 7.0 + 3.5 * bottom_height))
        top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.0, 1.05, bottom_height])
        # singular values of ΔW
        ax_top = top.subplots(1, n_top, squeeze=False)[0]
        for ax, method in zip(ax_top, ranks, strict=False):
            sel = rows(table, method=method, matrix="delta_w", quantity="sigma")
            for (module, depth), group in sel.groupby(["module", "depth"]):
                group = group.sort_values("index")
                ax.plot(
                    group["index"],
                    group["mean"],
                    color=depth_cmap(depth),
                    lw=1.2,
                    marker="o",
                    markersize=2.5,
                    ls=styles.get(module_type(module), "-"),
                )
            plain_log_axis(ax)
            ax.set_title(f"{method_label(method)}: singular values of ΔW")
            ax.set_xlabel("index i (descending σ)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_top[0].set_ylabel("σ_i of ΔW (weight units, log scale)")
        if not ranks:
            empty_panel(ax_top[0], "no LoRA runs")
        else:
            mappable = ScalarMappable(cmap=depth_cmap, norm=Normalize(0, 1))
            top.colorbar(mappable, ax=ax_top, label="layer depth ℓ / L", shrink=0.9)
        if len(types) > 1:
            top.legend(
                [Line2D([], [], color="0.3", ls=styles[t]) for t in types],
                types,
                loc="outside right upper",
            )
        # ranks per layer and intruders
        ax_mid = middle.subplots(1, 4)
        quantities = [
            ("effective_rank", "effective rank of ΔW\n(exp entropy of σ/‖σ‖₁)"),
            ("stable_rank", "stable rank of ΔW\n(‖ΔW‖²_F / σ₁²)"),
            ("energy_rank", "directions holding 90 % of\nΣσ² of ΔW (count)"),
        ]
        for ax, (quantity, label) in zip(ax_mid, quantities, strict=False):
            for method in ranks:
                for t in types:
                    sel = rows(table, method=method, matrix="delta_w", quantity=quantity)
                    sel = sel[sel["module"].map(module_type) == t]
                    band(
                        ax,
                        by_layer(sel),
                        color=colors[method],
                        ls=styles[t],
                        label=method_label(method) + (f" {t}" if len(types) > 1 else ""),
                    )
            ax.set_ylabel(label)
            ax.set_xlabel(DEPTH_LABEL)
        ax = ax_mid[3]
        for method in ranks:
            for t in types:
                sel = rows(table, method=method, matrix="merged", quantity="intruder_count")
                sel = sel[sel["module"].map(module_type) == t]
                band(ax, by_layer(sel), color=colors[method], ls=styles[t])
        eps = f" (max |cos| < {intruder_epsilon:g})" if intruder_epsilon else ""
        ax.set_ylabel(f"intruder dimensions of W₀ + ΔW\n(count{eps})")
        ax.set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(ax_mid)
        if handles:
            middle.legend(
                handles,
                labels,
                loc="outside lower center",
                ncols=min(len(labels), 5),
                frameon=False,
            )
        # subspace similarity between ranks: heat maps per pair of ranks, then φ per layer
        ax_bot = bottom.subplots(
            1, n_bottom + 1, squeeze=False, width_ratios=[1.0] * n_bottom + [1.1]
        )[0]
        image = None
        for ax, (ra, rb) in zip(ax_bot, pairs, strict=False):
            ax.grid(False)
            sel = sub[(sub["rank_a"] == ra) & (sub["rank_b"] == rb)]
            grid = sel.groupby(["i", "j"])["mean"].mean().unstack("j")
            values = grid.to_numpy(float)
            image = ax.imshow(values, cmap="YlGnBu", vmin=0, vmax=max(1.0, np.nanmax(values)))
            ax.set_xticks(range(grid.shape[1]), [str(int(j)) for j in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [str(int(i)) for i in grid.index])
            ax.set_xlabel(f"j: top-j directions of A, r = {rb}")
            ax.set_ylabel(f"i: top-i directions of A, r = {ra}")
            ax.set_title(
                f"φ(A_r={ra}, A_r={rb}, i, j),\nmean of {sel['module'].nunique()} modules",
                fontsize=9.5,
            )
            if values.size <= 64:
                annotate_cells(ax, values, light_text=values > 0.6)
        if image is not None:
            bottom.colorbar(
                image,
                ax=ax_bot[:n_bottom],
                label="φ (0 = orthogonal, 1 = same subspace)",
                shrink=0.9,
            )
        ax = ax_bot[-1]
        for k, (ra, rb) in enumerate(pairs):
            sel = sub[(sub["rank_a"] == ra) & (sub["rank_b"] == rb)]
            color = RANK_COLORS[k % len(RANK_COLORS)]
            for (i, j), ls, what in (
                ((1, 1), "-", "top direction, i = j = 1"),
                ((ra, rb), "--", f"whole, i = {ra}, j = {rb}"),
            ):
                cell = sel[(sel["i"] == i) & (sel["j"] == j)]
                if len(cell):
                    band(ax, by_layer(cell), color=color, ls=ls, label=f"r = {ra} vs {rb}: {what}")
        if pairs:
            ax.set_ylabel("φ(A_r1, A_r2, i, j) (0–1)")
            ax.set_xlabel(DEPTH_LABEL)
            ax.set_title("subspace similarity per layer", fontsize=9.5)
            ax.legend(fontsize=8, loc="best")
        else:
            empty_panel(ax_bot[0], "subspace similarity needs two or more LoRA ranks")
            ax.set_axis_off()
        fig.suptitle(
            model_title(model, table, "spectra of the LoRA update ΔW = (α/r)·B·A", offset=1)
        )
    return fig
