"""Shared style and helpers of the figures: rc settings, saving, method order/labels/colours, bands, notes.

Thread safety: the figure functions build their figures with :func:`new_figure` (a
:class:`matplotlib.figure.Figure` on an Agg canvas, no pyplot figure manager) inside
:func:`figure_style`, which holds the module-level :data:`LOCK` while the rc settings are
active; :func:`save` holds the same lock. rcParams are process-global, so figures drawn from
several threads at once come out as when drawn one after another.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 150
RC = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "serlens",  # stable ids: the same figure gives the same SVG
    "figure.constrained_layout.use": True,
}
DEPTH_LABEL = "relative depth ℓ / L"
FROZEN_COLOR, WSUM_COLOR = "#222222", "#8c8c8c"
RANK_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
]
LINESTYLES = ["-", "--", ":", "-."]
COMPONENT_TITLES = {
    "attn": "attention output a",
    "mlp": "MLP output m",
    "attn+mlp": "block update a + m",
}

# rcParams are global to the process: one figure at a time is built (under RC) or saved.
LOCK = threading.RLock()


@contextmanager
def figure_style():
    """The shared rc settings (font sizes readable at report width, light grid), under :data:`LOCK`."""
    with LOCK, matplotlib.rc_context(RC):
        yield


def new_figure(**kwargs) -> Figure:
    """A Figure on its own Agg canvas (no pyplot): ``kwargs`` as for :class:`~matplotlib.figure.Figure`."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def new_subplots(nrows: int = 1, ncols: int = 1, *, figsize, **kwargs):
    """``(fig, axes)`` as ``plt.subplots`` gives them, on a :func:`new_figure` (no pyplot)."""
    fig = new_figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig: Figure, png: Path, svg: Path) -> None:
    """Write ``fig`` as PNG (150 dpi) and SVG, without timestamps (under :data:`LOCK`)."""
    for path in (png, svg):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with LOCK:
        fig.savefig(png, dpi=DPI, metadata={"Software": None})
        fig.savefig(svg, metadata={"Date": None})


def _method(name: str):
    """The :class:`serlens.methods.Method` of a name, or None for a name no method has."""
    from serlens.errors import ConfigError
    from serlens.methods import parse_method

    try:
        return parse_method(name)
    except ConfigError:
        return None


def rank_of(method: str) -> int | None:
    spec = _method(method)
    return spec.rank if spec is not None else None


def method_order(methods: Iterable[str]) -> list[str]:
    """Report order (serlens.methods.method_sort_key): frozen heads, LoRA by rank, then the
    declared methods by kind; names no method has last."""
    from serlens.methods import method_sort_key

    def key(m):
        return (method_sort_key(m) if _method(m) is not None else (9, 0), m)

    return sorted(dict.fromkeys(methods), key=key)


def method_label(method: str) -> str:
    from serlens.methods import method_label as label

    return label(method) if _method(method) is not None else method


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    colors, k = {}, 0
    for method in method_order(methods):
        spec = _method(method)
        if spec is not None and spec.kind == "frozen" and spec.readout in ("last", "wsum"):
            colors[method] = FROZEN_COLOR if spec.readout == "last" else WSUM_COLOR
        else:
            colors[method] = RANK_COLORS[k % len(RANK_COLORS)]
            k += 1
    return colors


def lora_methods(methods: Iterable[str]) -> list[str]:
    """The methods that adapt the encoder (LoRA, DoRA, full fine-tuning), in report order."""
    return [
        m for m in method_order(methods) if (spec := _method(m)) is not None and spec.trains_encoder
    ]


def rows(table: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows of ``table`` whose columns equal the given values (columns absent from the table are ignored)."""
    mask = np.ones(len(table), dtype=bool)
    for column, value in equal.items():
        if column in table.columns:
            mask &= (table[column] == value).to_numpy()
    return table[mask]


def band(ax, frame: pd.DataFrame, x: str = "depth", **line) -> None:
    """Mean line with a shaded band from an aggregated table (columns ``x``, ``mean``, and
    ``band_low``/``band_high`` — the 95 % speaker band — where present, else ± ``std``)."""
    frame = frame.sort_values(x)
    if frame.empty:
        return
    xs, mean = frame[x].to_numpy(float), frame["mean"].to_numpy(float)
    nan = np.full_like(mean, np.nan)
    std = frame["std"].to_numpy(float) if "std" in frame else nan
    low, high = mean - std, mean + std
    if "band_low" in frame and np.isfinite(frame["band_low"].to_numpy(float)).any():
        low, high = frame["band_low"].to_numpy(float), frame["band_high"].to_numpy(float)
    (handle,) = ax.plot(
        xs, mean, marker=line.pop("marker", "o"), markersize=line.pop("markersize", 3.5), **line
    )
    ok = np.isfinite(low) & np.isfinite(high)
    if ok.any():
        ax.fill_between(xs[ok], low[ok], high[ok], color=handle.get_color(), alpha=0.15, lw=0)


def band_note(table: pd.DataFrame) -> str:
    """What a figure's shaded area is: the speaker band where the table has it, else ± std."""
    if "band_low" in table and np.isfinite(pd.to_numeric(table["band_low"])).any():
        return f"shaded: 95 % band from resampling test speakers within folds ({fold_note(table)})"
    return f"shaded: ± std over {fold_note(table)}"


def annotate_cells(ax, values: np.ndarray, light_text: np.ndarray) -> None:
    """Write each heat-map cell's value in it, white where ``light_text`` (dark cells)."""
    for (i, j), v in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if light_text[i, j] else "black",
        )


def fold_note(table: pd.DataFrame) -> str:
    """'3 folds × 1 seed' or '2–3 folds × 3 seeds' (from ``n_folds``, ``n_seeds``), and the
    missing runs if any."""
    if table.empty or "n_folds" not in table:
        return "no folds"
    lo, hi = int(table["n_folds"].min()), int(table["n_folds"].max())
    note = f"{hi} fold{'s' if hi != 1 else ''}" if lo == hi else f"{lo}–{hi} folds"
    if "n_seeds" in table:
        s_lo, s_hi = int(table["n_seeds"].min()), int(table["n_seeds"].max())
        seeds = f"{s_hi} seed{'s' if s_hi != 1 else ''}" if s_lo == s_hi else f"{s_lo}–{s_hi} seeds"
        note += f" × {seeds}"
    column = table["missing_runs"].dropna() if "missing_runs" in table else []
    missing = sorted({str(v) for v in column if str(v).strip()})
    return note + (f"; missing runs {'; '.join(missing)}" if missing else "")


def spread_note(table: pd.DataFrame) -> str:
    if "band_low" in table and np.isfinite(pd.to_numeric(table["band_low"])).any():
        return f"mean over {fold_note(table)}, 95 % speaker band"
    return f"mean ± std over {fold_note(table)}"


def n_layers(
    table: pd.DataFrame, layer: str = "layer", depth: str = "depth", offset: int = 0
) -> int | None:
    """L from a table with columns layer and depth = (layer + offset) / L."""
    sel = table[(table[depth] > 0) & table[layer].notna()] if depth in table else table.iloc[:0]
    if sel.empty:
        return None
    return int(round(float(((sel[layer] + offset) / sel[depth]).median())))


def model_title(
    model: str,
    table: pd.DataFrame,
    what: str,
    layer: str = "layer",
    depth: str = "depth",
    offset: int = 0,
    spread: str | None = None,
) -> str:
    """'model, L = n layers: what (mean ± std over k folds)'. ``offset``: 1 where layers count
    from 0 and depth = (layer + 1) / L; ``spread``: the parenthesis, when not :func:`spread_note`."""
    L = n_layers(table, layer, depth, offset) if len(table) else None
    size = f", L = {L} layers" if L else ""
    return f"{model}{size}: {what} ({spread_note(table) if spread is None else spread})"


def chance_line(ax, n_classes: int | None) -> None:
    if n_classes:
        ax.axhline(1 / n_classes, color="0.5", ls=":", lw=1, label=f"chance (1/{n_classes})")


def empty_panel(ax, message: str) -> None:
    ax.text(
        0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.3"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def legend_below(fig, handles, labels, ncols: int | None = None) -> None:
    """One legend under the panels, with no more columns than fit the figure's width (a
    legend wider than the figure is cut at both sides)."""
    unique = dict(zip(labels, handles, strict=True))
    longest = max((len(str(label)) for label in unique), default=1)
    column_inches = 0.6 + 0.075 * longest  # handle + text at the legend's font size
    fits = max(1, int(fig.get_figwidth() // column_inches))
    fig.legend(
        list(unique.values()),
        list(unique.keys()),
        loc="outside lower center",
        ncols=min(ncols or min(len(unique), 5), fits),
        frameon=False,
    )


def collect_legend(axes) -> tuple[list, list]:
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    return handles, labels


def plain_log_axis(ax, axis: str = "y") -> None:
    """Log scale with ticks written as plain numbers (0.4, 2, 30) instead of 4×10⁻¹.

    Minor ticks at 2× and 5× a power of ten are labelled too when the axis spans under two decades.
    """
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    limits = ax.get_ylim if axis == "y" else ax.get_xlim

    def minor(value, _):
        lo, hi = sorted(limits())
        if lo <= 0 or np.log10(hi / lo) >= 2:
            return ""
        mantissa = value / 10 ** np.floor(np.log10(value) + 1e-9)
        return (
            f"{value:g}"
            if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6
            else ""
        )

    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(FuncFormatter(minor))


def module_type(module: str) -> str:
    """``layers.3.self_attn.v_proj`` -> ``self_attn.v_proj``."""
    return re.sub(r"^(?:.*\.)?layers\.\d+\.", "", str(module))


def by_layer(frame: pd.DataFrame, x: str = "depth") -> pd.DataFrame:
    """Collapse several modules of one layer type into mean over layers of ``x`` (keeps mean/std)."""
    return frame.groupby(x, as_index=False)[["mean", "std"]].mean()
