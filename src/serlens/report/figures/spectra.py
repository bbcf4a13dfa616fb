"""Spectra of the weight update ΔW (LoRA, DoRA, full fine-tuning) and the cross-rank subspace
similarity of the LoRA ranks."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import ScaledTranslation

from .ab_dynamics import target_handles, target_markers, target_name, target_order
from .contributions import grid_shape, legend_under
from .style import (
    DEPTH_LABEL,
    RANK_COLORS,
    annotate_cells,
    band,
    band_note,
    by_layer,
    empty_panel,
    figure_style,
    method_colors,
    method_label,
    method_order,
    model_title,
    new_figure,
    plain_log_axis,
    rows,
)

NULL_COLOR = "0.35"
NULL_STYLE = ":"  # with crosses (workflow/report/spectra.rst)


def _low_rank(table: pd.DataFrame, method: str) -> bool:
    """Whether a method's ΔW is stored as a rank-r spectrum (LoRA: as many σ of ΔW as of A),
    rather than the dense one of DoRA and full fine-tuning (min(d_out, d_in) σ); read off
    the table, so it needs no method declaration."""
    sigma = rows(table, method=method, quantity="sigma")
    n_delta = sigma.loc[sigma["matrix"] == "delta_w", "index"].max()
    n_a = sigma.loc[sigma["matrix"] == "lora_a", "index"].max()
    return bool(pd.notna(n_a) and pd.notna(n_delta) and n_delta <= n_a)


def _null_name(table: pd.DataFrame, method: str) -> str:
    rank = "rank-r" if _low_rank(table, method) else "full-rank"
    return f"random {rank} update of the same ‖ΔW‖_F"


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


def _sigma_panel(ax, table, method, depth_cmap, markers, offset) -> None:
    """σ_i of ΔW of one method: a line per module (colour = depth, marker = module type where
    there are several), the null's mean spectrum in grey and its legend under the panel."""
    sel = rows(table, method=method, matrix="delta_w", quantity="sigma")
    low = _low_rank(table, method)  # r points each: markers; a dense spectrum: lines
    for (module, depth), group in sel.groupby(["module", "depth"]):
        group = group.sort_values("index")
        marker = markers.get(target_name(module), "o") if markers else "o"
        ax.plot(
            group["index"],
            group["mean"],
            color=depth_cmap(depth),
            lw=1.2,
            marker=marker if (low or markers) else None,
            markevery=None if low else max(1, len(group) // 6),
            markersize=3 if markers else 2.5,
            ls="-",
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
            label=f"null: {_null_name(table, method)}\n(mean of modules)",
        )
        # under the x label, not over the spectra: the panels below make room for it
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            bbox_transform=ax.transAxes + offset,
            fontsize=8,
            frameon=False,
            handlelength=2.5,
        )
    plain_log_axis(ax)
    ax.set_title(f"{method_label(method)}: singular values of ΔW", fontsize=9.5)
    ax.set_xlabel("index i (descending σ)")
    ax.xaxis.get_major_locator().set_params(integer=True)


def spectra_figure(
    svd: pd.DataFrame,
    subspace: pd.DataFrame,
    model: str,
    intruder_epsilon: float | None = None,
    energy_fraction: float | None = None,
):
    """Spectra of the weight update ΔW per adapted module, and the cross-rank subspace similarity.

    ΔW is LoRA's (α/r)·B·A, DoRA's W′ − W₀ or full fine-tuning's W_ft − W₀
    (:mod:`serlens.analysis.lora_spectra`); every method of the table with ΔW rows is drawn.
    Top: singular values σ_i of ΔW, one line per module (colour = depth), one panel per
    method (at most three a row), and in grey those of the null, a random update of the
    same ‖ΔW‖_F and rank (rank r for LoRA, full rank for the dense updates of DoRA and full
    fine-tuning), named under each panel. Middle: effective rank, stable rank and energy
    rank of ΔW, and the intruder count of the merged weight, per layer, one colour per
    method; dotted with crosses, the same for the nulls (the random update; for intruders
    the trained spectrum in random directions). Where methods adapt several module types
    (q_proj, fc1...), each type has its marker (:data:`.ab_dynamics.TARGET_MARKERS`) and its
    own line. Bottom: φ(A_r1, A_r2, i, j) heat maps (Hu et al. 2021, §7), averaged over
    adapted modules and folds, each cell also as a multiple of its random-subspace
    expectation max(i, j) / d; then φ per layer with that expectation dotted. Effective,
    stable and energy ranks are on a log axis when a dense update is drawn (its ranks run to
    hundreds, LoRA's to r). One legend under each row of panels.
    """
    table = rows(svd, model=model)
    updated = (
        [m for m in method_order(table["method"]) if len(rows(table, method=m, matrix="delta_w"))]
        if len(table)
        else []
    )
    colors = method_colors(table["method"])
    trained = table[~table["matrix"].astype(str).str.endswith("_null")] if len(table) else table
    trained = trained[trained["method"].isin(updated)] if len(trained) else trained
    types = target_order(trained["module"].map(target_name)) if len(trained) else []
    markers = target_markers(types) if len(types) > 1 else {}
    sub, sub_null = _subspace_parts(subspace, model)
    pairs = (
        sorted({(int(a), int(b)) for a, b in zip(sub["rank_a"], sub["rank_b"], strict=True)})
        if len(sub)
        else []
    )
    n_rows, n_cols = grid_shape(len(updated), 3)
    n_bottom = max(len(pairs), 1)
    # about 4.6 inches a spectrum panel (its title names the method), the colour bar beside
    width = max(14.0, 4.6 * n_cols + 1.4, 3.6 * (n_bottom + 1) + 1.4)
    depth_cmap = matplotlib.colormaps["viridis"]
    top_h = 3.7 * n_rows + (0.5 if markers else 0.0)
    mid_h = 4.4 + (0.3 if markers else 0.0) + 0.18 * len(updated)
    bottom_h = 4.2 if pairs else 0.7  # one rank: no cross-rank heat maps, a one-line note
    with figure_style():
        fig = new_figure(figsize=(width, 0.6 + top_h + mid_h + bottom_h))
        top, middle, bottom = fig.subfigures(3, 1, height_ratios=[top_h, mid_h, bottom_h])
        # singular values of ΔW, a panel per method
        grid = top.subplots(n_rows, n_cols, squeeze=False)
        ax_top = list(grid.ravel()[: max(len(updated), 1)])
        for ax in grid.ravel()[len(ax_top) :]:
            ax.remove()
        offset = ScaledTranslation(0, -34 / 72, fig.dpi_scale_trans)  # ticks and x label
        for ax, method in zip(ax_top, updated, strict=False):
            _sigma_panel(ax, table, method, depth_cmap, markers, offset)
        for ax in grid[:, 0]:
            ax.set_ylabel("σ_i of ΔW\n(weight units, log scale)")
        if not updated:
            empty_panel(ax_top[0], "no runs with a weight update")
        else:
            mappable = ScalarMappable(cmap=depth_cmap, norm=Normalize(0, 1))
            top.colorbar(mappable, ax=ax_top, label="layer depth ℓ / L (line colour)", shrink=0.8)
        if markers:
            handles, labels = target_handles(types, ls="-")
            legend_under(top, handles, [f"module {t}" for t in labels], title=None)
        # ranks per layer and intruders
        ax_mid = middle.subplots(1, 4)
        dense = any(not _low_rank(table, m) for m in updated)
        pct = f"{energy_fraction:.0%}" if energy_fraction else "the energy fraction"
        quantities = [
            ("effective_rank", "effective rank of ΔW\n(exp entropy of σ/‖σ‖₁)"),
            ("stable_rank", "stable rank of ΔW\n(‖ΔW‖²_F / σ₁²)"),
            ("energy_rank", f"directions holding {pct} of\nΣσ² of ΔW (count)"),
        ]

        def trained_lines(ax, method, matrix, quantity):
            for t in types:
                sel = rows(table, method=method, matrix=matrix, quantity=quantity)
                sel = sel[sel["module"].map(target_name) == t]
                band(
                    ax,
                    by_layer(sel),
                    color=colors[method],
                    ls="-",
                    marker=markers.get(t, "o"),
                    markersize=4 if markers else 3.5,
                )

        def null_line(ax, method, matrix, quantity):
            sel = rows(table, method=method, matrix=matrix, quantity=quantity)
            if len(sel):
                line = by_layer(sel).sort_values("depth")
                ax.plot(
                    line["depth"],
                    line["mean"],
                    color=colors[method],
                    ls=NULL_STYLE,
                    lw=1.6,
                    marker="x",
                    markersize=4,
                )

        for ax, (quantity, label) in zip(ax_mid, quantities, strict=False):
            for method in updated:
                trained_lines(ax, method, "delta_w", quantity)
                null_line(ax, method, "delta_w_null", quantity)
            ax.set_ylabel(label)
            if dense:
                plain_log_axis(ax)
            ax.set_xlabel(DEPTH_LABEL)
        ax = ax_mid[3]
        for method in updated:
            trained_lines(ax, method, "merged", "intruder_count")
            null_line(ax, method, "merged_null", "intruder_count")
        eps = f" (max |cos| < {intruder_epsilon:g})" if intruder_epsilon else ""
        ax.set_ylabel(f"intruder dimensions of W₀ + ΔW\n(count{eps})")
        ax.set_xlabel(DEPTH_LABEL)
        if updated:
            handles = [
                Line2D([], [], color=colors[m], marker=None if markers else "o", markersize=3.5)
                for m in updated
            ]
            labels = [method_label(m) for m in updated]
            if markers:
                more, names = target_handles(types, ls="-")
                handles += more
                labels += [f"module {t}" for t in names]
            has_null = table["matrix"].isin(["delta_w_null", "merged_null"]).any()
            if has_null:
                handles.append(Line2D([], [], color="0.3", ls=NULL_STYLE, marker="x", markersize=4))
                labels.append(
                    "dotted with crosses, in the method's colour: its null\n"
                    "(ranks: random update of the same ‖ΔW‖_F and rank;\n"
                    "intruders: the trained σ in random directions)"
                )
            handles.append(Patch(facecolor="0.5", alpha=0.3, lw=0))
            labels.append(band_note(table))
            legend_under(middle, handles, labels, ncols=4, fontsize=8.5)
        # subspace similarity between ranks: heat maps per pair of ranks, then φ per layer
        ax_bot = bottom.subplots(
            1, n_bottom + 1, squeeze=False, width_ratios=[1.0] * n_bottom + [1.3]
        )[0]
        image = None
        for ax, (ra, rb) in zip(ax_bot, pairs, strict=False):
            ax.grid(False)
            sel = sub[(sub["rank_a"] == ra) & (sub["rank_b"] == rb)]
            grid_phi = sel.groupby(["i", "j"])["mean"].mean().unstack("j")
            values = grid_phi.to_numpy(float)
            null_sel = sub_null[(sub_null["rank_a"] == ra) & (sub_null["rank_b"] == rb)]
            null = None
            if len(null_sel):
                null = (
                    null_sel.groupby(["i", "j"])["mean"]
                    .mean()
                    .unstack("j")
                    .reindex(index=grid_phi.index, columns=grid_phi.columns)
                    .to_numpy(float)
                )
            image = ax.imshow(values, cmap="YlGnBu", vmin=0, vmax=max(1.0, np.nanmax(values)))
            ax.set_xticks(range(grid_phi.shape[1]), [str(int(j)) for j in grid_phi.columns])
            ax.set_yticks(range(grid_phi.shape[0]), [str(int(i)) for i in grid_phi.index])
            ax.set_xlabel(f"j: top-j directions of A, r = {rb}")
            ax.set_ylabel(f"i: top-i directions of A, r = {ra}")
            title = f"φ(A_r={ra}, A_r={rb}, i, j)\nmean of {sel['module'].nunique()} modules"
            if null is not None:
                title += "; ×k: k times the\nrandom-subspace φ, max(i, j) / d"
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
        handles, labels = [], []
        for k, (ra, rb) in enumerate(pairs):
            sel = sub[(sub["rank_a"] == ra) & (sub["rank_b"] == rb)]
            color = RANK_COLORS[k % len(RANK_COLORS)]
            for (i, j), ls, what in (
                ((1, 1), "-", "top direction, i = j = 1"),
                ((ra, rb), "--", f"whole, i = {ra}, j = {rb}"),
            ):
                cell = sel[(sel["i"] == i) & (sel["j"] == j)]
                if len(cell):
                    band(ax, by_layer(cell), color=color, ls=ls)
                    handles.append(Line2D([], [], color=color, ls=ls, marker="o", markersize=3))
                    labels.append(f"r = {ra} vs {rb}: {what}")
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
            if len(sub_null):
                handles.append(Line2D([], [], color="0.3", ls=":"))
                labels.append("dotted: random-subspace φ, max(i, j) / d")
            legend_under(bottom, handles, labels, ncols=3, fontsize=8.5)
        else:
            empty_panel(ax_bot[0], "subspace similarity needs two or more LoRA ranks")
            ax.set_axis_off()
        fig.suptitle(
            model_title(
                model,
                table,
                "spectra of the weight update ΔW (LoRA (α/r)·B·A, DoRA W′ − W₀, full W_ft − W₀)",
                offset=1,
            )
        )
    return fig
