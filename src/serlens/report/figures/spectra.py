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

NULL_COLOR = "0.35"


def _subspace_parts(subspace: pd.DataFrame | None, model: str):
    """(φ rows, null rows) of the aggregated subspace table; tables from before the null
    column (no ``metric``) are all φ."""
    if subspace is None or not len(subspace):
        return pd.DataFrame(), pd.DataFrame()
    sub = rows(subspace, model=model)
    if "metric" not in sub.columns:
        return sub, sub.iloc[:0]
    return sub[sub["metric"] == "phi"], sub[sub["metric"] == "phi_null"]


def _annotate_phi(ax, values: np.ndarray, null: np.ndarray | None) -> None:
    """φ in each cell and, under it, how many times the random-subspace null it is."""
    for (i, j), v in np.ndenumerate(values):
        text = f"{v:.2f}"
        if null is not None and np.isfinite(null[i, j]) and null[i, j] > 0:
            times = v / null[i, j]
            text += f"\n×{times:.1f}" if times < 9.95 else f"\n×{times:.0f}"
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=6.5,
            linespacing=0.95,
            color="white" if v > 0.6 else "black",
        )


def spectra_figure(
    svd: pd.DataFrame,
    subspace: pd.DataFrame,
    model: str,
    intruder_epsilon: float | None = None,
    energy_fraction: float | None = None,
):
    """Spectra of the LoRA update ΔW = (α/r)·B·A per adapted module, and the cross-rank subspace similarity.

    Top: singular values σ_i of ΔW, one line per layer (colour = depth), one panel per rank,
    and in grey those of the null, a random rank-r update of the same ‖ΔW‖_F. Middle:
    effective rank, stable rank and energy rank of ΔW, and the intruder count of the merged
    weight, per layer; dotted, the same for the nulls (the random update; for intruders the
    trained spectrum in random directions). Bottom: φ(A_r1, A_r2, i, j) heat maps (Hu et
    al. 2021, §7), averaged over adapted modules and folds, each cell also as a multiple of
    its random-subspace expectation max(i, j) / d; then φ per layer with that expectation
    dotted.
    """
    table = rows(svd, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    trained = table[~table["matrix"].astype(str).str.endswith("_null")] if len(table) else table
    types = sorted({module_type(m) for m in trained["module"]}) if len(trained) else []
    styles = {t: LINESTYLES[i % len(LINESTYLES)] for i, t in enumerate(types)}
    sub, sub_null = _subspace_parts(subspace, model)
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
            null = rows(table, method=method, matrix="delta_w_null", quantity="sigma")
            if len(null):
                null = null.groupby("index")["mean"].mean()
                ax.plot(
                    null.index,
                    null.to_numpy(),
                    color=NULL_COLOR,
                    lw=2.0,
                    ls="--",
                    label="random rank-r update, same ‖ΔW‖_F (mean of layers)",
                )
                ax.legend(fontsize=8, loc="lower left")
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
        pct = f"{energy_fraction:.0%}" if energy_fraction else "the energy fraction"
        quantities = [
            ("effective_rank", "effective rank of ΔW\n(exp entropy of σ/‖σ‖₁)"),
            ("stable_rank", "stable rank of ΔW\n(‖ΔW‖²_F / σ₁²)"),
            ("energy_rank", f"directions holding {pct} of\nΣσ² of ΔW (count)"),
        ]

        def null_line(ax, method, matrix, quantity, label):
            sel = rows(table, method=method, matrix=matrix, quantity=quantity)
            if len(sel):
                line = by_layer(sel).sort_values("depth")
                ax.plot(
                    line["depth"],
                    line["mean"],
                    color=colors[method],
                    ls=":",
                    lw=1.6,
                    marker="x",
                    markersize=4,
                    label=label,
                )

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
                null_line(
                    ax,
                    method,
                    "delta_w_null",
                    quantity,
                    f"{method_label(method)}: null, random rank-r update of the same ‖ΔW‖_F",
                )
            ax.set_ylabel(label)
            ax.set_xlabel(DEPTH_LABEL)
        ax = ax_mid[3]
        for method in ranks:
            for t in types:
                sel = rows(table, method=method, matrix="merged", quantity="intruder_count")
                sel = sel[sel["module"].map(module_type) == t]
                band(ax, by_layer(sel), color=colors[method], ls=styles[t])
            null_line(
                ax,
                method,
                "merged_null",
                "intruder_count",
                f"{method_label(method)}: null for intruders, the trained σ in random directions",
            )
        eps = f" (max |cos| < {intruder_epsilon:g})" if intruder_epsilon else ""
        ax.set_ylabel(f"intruder dimensions of W₀ + ΔW\n(count{eps})")
        ax.set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(ax_mid)
        if handles:
            middle.legend(
                handles,
                labels,
                loc="outside lower center",
                ncols=min(len(labels), 2 if len(labels) > 3 else 3),
                frameon=False,
                fontsize=8.5,
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
            null_sel = sub_null[(sub_null["rank_a"] == ra) & (sub_null["rank_b"] == rb)]
            null = None
            if len(null_sel):
                null = (
                    null_sel.groupby(["i", "j"])["mean"]
                    .mean()
                    .unstack("j")
                    .reindex(index=grid.index, columns=grid.columns)
                    .to_numpy(float)
                )
            image = ax.imshow(values, cmap="YlGnBu", vmin=0, vmax=max(1.0, np.nanmax(values)))
            ax.set_xticks(range(grid.shape[1]), [str(int(j)) for j in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [str(int(i)) for i in grid.index])
            ax.set_xlabel(f"j: top-j directions of A, r = {rb}")
            ax.set_ylabel(f"i: top-i directions of A, r = {ra}")
            title = f"φ(A_r={ra}, A_r={rb}, i, j), mean of {sel['module'].nunique()} modules"
            if null is not None:
                title += "\n×k: k times the random-subspace φ, max(i, j) / d"
            ax.set_title(title, fontsize=9.5)
            if values.size <= 64:
                if null is not None:
                    _annotate_phi(ax, values, null)
                else:
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
            nulls = sub_null[(sub_null["rank_a"] == ra) & (sub_null["rank_b"] == rb)]
            for i, j in ((1, 1), (ra, rb)):
                cell = nulls[(nulls["i"] == i) & (nulls["j"] == j)]
                if len(cell):
                    level = float(cell["mean"].mean())
                    ax.axhline(level, color=color, ls=":", lw=1.2)
                    ax.annotate(
                        f"random: {max(i, j)}/d = {level:.3f}",
                        (1.0, level),
                        xycoords=("axes fraction", "data"),
                        ha="right",
                        va="bottom",
                        fontsize=7,
                        color=color,
                    )
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
