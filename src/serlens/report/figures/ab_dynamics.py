"""LoRA (and DoRA) A/B activations and gradients, trained against an untrained baseline."""

from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D

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
    plain_log_axis,
    rows,
)

#: What each untrained baseline is, for the legend (``analysis.untrained_baseline``).
BASELINE_LABELS = {
    "matched_scale": "untrained: random A, B scaled to the\ntrained ‖A‖_F, ‖B‖_F of each layer;\nthe trained head",
    "paper": "untrained (paper's baseline):\nA, B ~ N(0, σ²), a fresh head",
    None: "untrained baseline",
}
#: The marker of each adapted module type, for methods that adapt several per layer (the
#: spectra and update-dynamics figures mark module types alike).
TARGET_MARKERS = {
    "q_proj": "o",
    "k_proj": "v",
    "v_proj": "s",
    "out_proj": "D",
    "fc1": "^",
    "fc2": "P",
}
#: Markers of module types :data:`TARGET_MARKERS` lacks, in turn.
SPARE_MARKERS = ("X", "*", "h", "<", ">", "d")


def target_name(module: str) -> str:
    """The adapted module type of a module name (``layers.3.self_attn.q_proj`` -> ``q_proj``)."""
    return str(module).rsplit(".", 1)[-1]


def target_order(targets) -> list[str]:
    """Module types in the order of a Whisper layer (q, k, v, out, fc1, fc2), others after."""
    known = list(TARGET_MARKERS)
    return sorted(set(targets), key=lambda t: (known.index(t) if t in known else len(known), t))


def target_markers(targets) -> dict[str, str]:
    """A distinct marker per module type: :data:`TARGET_MARKERS`, then :data:`SPARE_MARKERS`."""
    spare = iter(SPARE_MARKERS * (1 + len(set(targets))))
    return {t: TARGET_MARKERS.get(t) or next(spare) for t in target_order(targets)}


def target_handles(targets, **line) -> tuple[list, list[str]]:
    """Legend entries (grey line with the type's marker) for module types."""
    markers = target_markers(targets)
    style = {"color": "0.3", "markersize": 5, **line}
    return [Line2D([], [], marker=markers[t], **style) for t in markers], list(markers)


MATRICES = [
    ("a_out", "A code a = A·x\n(r-dim)"),
    ("b_out", "B output b = B·a\n(d-dim, rank ≤ r)"),
    ("a_out_grad", "gradient ∂L/∂a\n(r-dim)"),
    ("b_out_grad", "gradient ∂L/∂b\n(d-dim)"),
]


def _target(table: pd.DataFrame) -> pd.Series:
    """The adapted module type of each row (``layers.3.self_attn.q_proj`` -> ``q_proj``)."""
    return table["module"].map(target_name)


def _by_target(table: pd.DataFrame, method: str) -> list[tuple[str | None, bool, pd.DataFrame]]:
    """A method's rows per module type ``(type, one of several, rows)``: split when it adapts
    several types per layer (one line each: a mean over q_proj, v_proj and fc1 would mix
    spaces of different width), else whole."""
    sel = rows(table, method=method)
    if "module" not in sel.columns or sel.empty:
        return [(None, False, sel)]
    target = _target(sel)
    kinds = target_order(target)
    if len(kinds) < 2:
        return [(kinds[0] if kinds else None, False, sel)]
    return [(kind, True, sel[(target == kind).to_numpy()]) for kind in kinds]


#: Shading of a method's band when it has a line per module type (bands of 6 types at the
#: usual 0.15 would bury the lines).
SPLIT_BAND_ALPHA = 0.07


def with_speaker_band(frame: pd.DataFrame, table: pd.DataFrame, quantity: str, state: str):
    """``frame`` (a curve by depth) with ``band_low``/``band_high`` from the table's speaker
    band rows (``{quantity}_band_low/high``, mean over runs), where it has them; else as it is
    (the band falls back to ± std over runs)."""
    bounds = {}
    for bound in ("band_low", "band_high"):
        sel = rows(table, quantity=f"{quantity}_{bound}", state=state)
        if sel.empty:
            return frame
        bounds[bound] = by_layer(sel).set_index("depth")["mean"]
    out = frame.copy()
    for bound, values in bounds.items():
        out[bound] = out["depth"].map(values)
    return out


def _lines(ax, table, ranks, colors, quantity, markers=None):
    """Trained (solid) and untrained (dashed) lines of each method and module type;
    ``markers``: module type -> marker when the figure has several types (else circles)."""
    drawn = False
    for method in ranks:
        for target, split, sel_method in _by_target(table, method):
            label = method_label(method) + (f" · {target}" if split else "")
            marker = (markers or {}).get(target, "o")
            for state, ls in (("trained", "-"), ("untrained", "--")):
                sel = rows(sel_method, quantity=quantity, state=state)
                drawn |= len(sel) > 0
                before = len(ax.collections)
                band(
                    ax,
                    with_speaker_band(by_layer(sel), sel_method, quantity, state),
                    color=colors[method],
                    ls=ls,
                    marker=marker,
                    label=label if state == "trained" else None,
                )
                if split:
                    for shade in ax.collections[before:]:
                        shade.set_alpha(SPLIT_BAND_ALPHA)
    return drawn


def _types(table: pd.DataFrame) -> list[str]:
    """The module types of the table, when there are several (else [])."""
    if table.empty or "module" not in table.columns:
        return []
    types = target_order(_target(table).dropna())
    return types if len(types) > 1 else []


def _sketched(table: pd.DataFrame) -> bool:
    """Whether any module's ∂L/∂b spectrum is a sketch (``b_out_grad_sketch_rows`` > 0)."""
    sel = rows(table, quantity="b_out_grad_sketch_rows", state="trained")
    column = "mean" if "mean" in sel.columns else "value"
    if sel.empty or column not in sel.columns:
        return False
    return bool((pd.to_numeric(sel[column], errors="coerce") > 0).any())


def _shading_note(table: pd.DataFrame) -> str:
    """What the shaded areas are: the training-speaker band where the table has it."""
    quantities = set(table["quantity"].astype(str))
    rows12 = "a_out_frac_band_low" in quantities
    row3 = bool({"grad_norm_ratio_B_A_band_low", "cka_a_code_vs_b_out_grad_band_low"} & quantities)
    out_grad = "b_out_grad_frac_band_low" in quantities
    if not (rows12 or row3):
        return "shaded: ± std over runs"
    banded = [
        part
        for part, has in (
            ("rows 1-2 (a, b, ∂L/∂a" + (", ∂L/∂b)" if out_grad else ")"), rows12),
            ("row 3", row3),
        )
        if has
    ]
    rest = [
        part
        for part, missing in (
            ("∂L/∂b", rows12 and not out_grad),
            ("rows 1-2", not rows12),
            ("row 3", not row3),
        )
        if missing
    ]
    return (
        "shaded, "
        + "\nand ".join(banded)
        + ": 95 % band from re-drawing\nthe training sample's speakers\n"
        "(one run's, averaged over runs"
        + (";\nrow 3's CKA: speaker jackknife" if row3 else "")
        + ")"
        + (f";\n{' and '.join(rest)}: ± std over runs" if rest else "")
    )


def ab_dynamics_figure(
    ab_dynamics: pd.DataFrame,
    model: str,
    energy_fraction: float = 0.9,
    untrained_baseline: str | None = None,
):
    """Energy ranks of A/B activations and gradients, trained (solid) against untrained (dashed), per layer.

    One colour per LoRA or DoRA method; a method that adapts several module types per layer
    (q_proj, v_proj, fc1...) gets one line per type (markers :data:`TARGET_MARKERS`) rather
    than their mean. Where ∂L/∂b of a wide module was sketched (d_out above
    ``EXACT_GRAM_MAX_DIMS``; :mod:`serlens.analysis.ab_dynamics`) the legend says so: its
    energy ranks are estimates, biased low.

    Rows 1 and 2: the energy rank (directions holding ``energy_fraction`` of the energy) as a
    share of the largest rank the matrix can have (r for a, b and ∂L/∂a; d for ∂L/∂b),
    uncentred then centred (mean frame removed), for the A code a = A x, the B output
    b = B a, and the gradients ∂L/∂a, ∂L/∂b; a dotted line at ``energy_fraction`` is where a
    white (isotropic) matrix sits. Row 3: the weight-gradient norm ratio ‖∂L/∂B‖_F /
    ‖∂L/∂A‖_F, the cosine between the ΔW-space updates s²BBᵀG and s²GAᵀA, and the linear CKA
    of a with ∂L/∂b. The last panel holds the legend.
    """
    table = rows(ab_dynamics, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    types = _types(table[table["method"].isin(ranks)])
    markers = target_markers(types) if types else None
    pct = f"{energy_fraction:.0%}"
    with figure_style():
        fig, axes = new_subplots(3, 4, figsize=(16.0, 11.5 + 0.25 * len(ranks)), sharex=True)
        for col, (quantity, title) in enumerate(MATRICES):
            axes[0, col].set_title(title)
            for row, suffix in enumerate(("_frac", "_centred_frac")):
                ax = axes[row, col]
                drawn = _lines(ax, table, ranks, colors, quantity + suffix, markers)
                ax.axhline(energy_fraction, color="0.45", ls=":", lw=1.1)
                ax.axhline(1.0, color="0.75", lw=0.8)
                ax.set_ylim(0, 1.05)
                if ranks and not drawn:  # a note only: empty_panel would clear the shared x ticks
                    ax.text(
                        0.5,
                        0.5,
                        f"no {quantity + suffix} rows\n(statistics of an older pass)",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        color="0.3",
                    )
        axes[0, 0].set_ylabel(f"uncentred: share of possible\ndirections holding {pct} energy")
        axes[1, 0].set_ylabel(f"centred (mean removed): share\nof directions holding {pct}")
        ax = axes[2, 0]
        _lines(ax, table, ranks, colors, "grad_norm_ratio_B_A", markers)
        ax.axhline(1, color="0.5", lw=0.8)
        plain_log_axis(ax)
        ax.set_ylabel("weight-gradient norm ratio\n‖∂L/∂B‖_F / ‖∂L/∂A‖_F (log)")
        ax = axes[2, 1]
        _lines(ax, table, ranks, colors, "dW_cos", markers)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_ylabel("cos(s²·B·Bᵀ·G, s²·G·Aᵀ·A)\n(ΔW updates via A and via B)")
        ax = axes[2, 2]
        _lines(ax, table, ranks, colors, "cka_a_code_vs_b_out_grad", markers)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("linear CKA of a with ∂L/∂b\n(frames, 0 = unrelated)")
        for ax in axes[2, :3]:
            ax.set_xlabel(DEPTH_LABEL)
        for ax in axes[1]:
            ax.tick_params(labelbottom=True)
            ax.set_xlabel(DEPTH_LABEL)
        if not ranks:
            empty_panel(axes[0, 0], "no LoRA or DoRA runs")
        # one legend below: a colour per method, a marker per module type, the line styles
        handles = [
            Line2D([], [], color=colors[m], marker="o" if not types else None) for m in ranks
        ]
        labels = [method_label(m) for m in ranks]
        if types:
            more, names = target_handles(types)
            handles += more
            labels += [f"module {t}" for t in names]
        handles += [
            Line2D([], [], color="0.3", ls="-"),
            Line2D([], [], color="0.3", ls="--"),
            Line2D([], [], color="0.45", ls=":"),
        ]
        labels += [
            "solid: trained adapter and head",
            "dashed: "
            + BASELINE_LABELS.get(untrained_baseline, f"untrained ({untrained_baseline})"),
            f"dotted: white (isotropic) matrix, ≈ {pct}",
        ]
        legend_under(fig, handles, labels, ncols=4)
        # the last panel: how to read the shares (and the sketch, where there is one)
        note_ax = axes[2, 3]
        note_ax.set_axis_off()
        sketch_note = ""
        if _sketched(table):
            from serlens.analysis.ab_dynamics import EXACT_GRAM_MAX_DIMS

            sketch_note = (
                f"\n\n∂L/∂b of modules wider than {EXACT_GRAM_MAX_DIMS}:\n"
                "from a Gaussian sketch (ranks biased low)"
            )
        note_ax.text(
            0.0,
            0.5,
            "share = energy rank / largest possible rank:\n"
            "min(frames, r) for a, b and ∂L/∂a,\n"
            "min(frames, d) for ∂L/∂b (one frame less\n"
            "once centred); 1 / r = one direction\n\n" + _shading_note(table) + sketch_note,
            transform=note_ax.transAxes,
            fontsize=9,
            color="0.25",
            va="center",
        )
        # the paper estimator's rows (fold 1 only) are the claim-3 figure's, not drawn here
        drawn_rows = table[~table["quantity"].astype(str).str.startswith("paper_cka")]
        fig.suptitle(
            model_title(
                model,
                drawn_rows,
                "LoRA/DoRA A/B activations and gradients on the training sample",
                offset=1,
                spread=f"mean over {fold_note(drawn_rows)}; shading: see the note",
            )
        )
    return fig
