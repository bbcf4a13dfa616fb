"""The per-method figures stay readable with many methods: the 8-method grid of
config/methods.yaml (6 adapted methods, one adapting 3 module types) and the default grid.

The inputs are aggregated tables (``results/tables/*.tsv`` layout) generated here. After
``fig.canvas.draw()`` no legend may cover an axes or leave the figure, no two titles may
overlap, the legends hold one entry per method (plus a few for line styles) rather than one
per method x module x null, and module types and nulls are told apart by their line style.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

from serlens import methods as serlens_methods
from serlens.methods import Method, short_form
from serlens.report import figures
from serlens.report.figures.update import update_figure

MODEL = "tiny.en"
N_LAYERS = 4
RANK = 8
DENSE = 24  # σ of a dense ΔW (min(d_out, d_in)): kept small here
TYPES3 = ("q_proj", "v_proj", "fc1")
# config/methods.yaml's adapted methods, lora_all with 3 module types
METHODS_GRID = {
    "frozen": short_form("frozen"),
    "frozen_wsum": short_form("frozen_wsum"),
    "lora_r8": short_form("lora_r8"),
    "lora_all_r8": Method("lora_all_r8", "lora", rank=RANK, targets=TYPES3),
    "dora_r8": Method("dora_r8", "dora", rank=RANK, targets=("v_proj",)),
    "lora_early_r8": Method(
        "lora_early_r8", "lora", rank=RANK, targets=("v_proj",), layers="first_half"
    ),
    "lora_late_r8": Method(
        "lora_late_r8", "lora", rank=RANK, targets=("v_proj",), layers="last_half"
    ),
    "full": Method("full", "full", targets=("v_proj",), lr=2e-5),
}
DEFAULT_GRID = {name: short_form(name) for name in ("frozen", "frozen_wsum", "lora_r8", "lora_r32")}
GRIDS = {"methods": METHODS_GRID, "default": DEFAULT_GRID}


def _module(layer: int, kind: str) -> str:
    return f"layers.{layer}.{'' if kind.startswith('fc') else 'self_attn.'}{kind}"


def _layers(method: Method) -> list[int]:
    return method.layer_indices(N_LAYERS)


def _stats(rng, value: float, band: bool = False) -> dict:
    std = abs(value) * 0.05 + 0.01
    row = {"mean": value, "std": std, "n_folds": 2, "n_seeds": 1, "seed_std": np.nan}
    row["band_low"], row["band_high"] = (
        (value - 2 * std, value + 2 * std) if band else (np.nan,) * 2
    )
    row["missing_runs"] = np.nan
    return row


def _modules(method: Method):
    for layer in _layers(method):
        for kind in method.targets:
            yield layer, _module(layer, kind)


def svd_table(grid: dict[str, Method], rng) -> pd.DataFrame:
    out = []
    for name, method in grid.items():
        if not method.has_update:
            continue
        low = method.kind == "lora"
        n_sigma = method.rank if low else DENSE
        for layer, module in _modules(method):
            base = {"model": MODEL, "method": name, "module": module, "layer": layer}
            base["depth"] = (layer + 1) / N_LAYERS
            for matrix in ("delta_w", "delta_w_null"):
                for q in ("effective_rank", "stable_rank", "energy_rank"):
                    value = rng.uniform(1, n_sigma)
                    out.append({**base, "matrix": matrix, "quantity": q, "index": np.nan})
                    out[-1].update(_stats(rng, value))
                sigma = np.sort(rng.uniform(0.01, 1.0, n_sigma))[::-1]
                for k, s in enumerate(sigma):
                    out.append({**base, "matrix": matrix, "quantity": "sigma", "index": k + 1})
                    out[-1].update(_stats(rng, s))
            if method.has_adapter:
                for k, s in enumerate(np.sort(rng.uniform(0.1, 1, method.rank))[::-1]):
                    out.append({**base, "matrix": "lora_a", "quantity": "sigma", "index": k + 1})
                    out[-1].update(_stats(rng, s))
            for matrix in ("merged", "merged_null"):
                out.append(
                    {**base, "matrix": matrix, "quantity": "intruder_count", "index": np.nan}
                )
                out[-1].update(_stats(rng, float(rng.integers(0, 3))))
    return pd.DataFrame(out)


def subspace_table(grid: dict[str, Method], rng) -> pd.DataFrame:
    ranks = sorted(m.rank for m in grid.values() if m.in_rank_family)
    out = []
    for ra, rb in itertools.combinations(ranks, 2):
        for layer in range(N_LAYERS):
            module = _module(layer, "v_proj")
            for i in (1, 2, 4, ra):
                for j in (1, 2, 4, 8, rb):
                    for metric, value in (
                        ("phi", rng.uniform(0, 1)),
                        ("phi_null", max(i, j) / 384),
                    ):
                        out.append(
                            {
                                "model": MODEL,
                                "method": "lora",
                                "module": module,
                                "layer": layer,
                                "depth": (layer + 1) / N_LAYERS,
                                "rank_a": ra,
                                "rank_b": rb,
                                "i": i,
                                "j": j,
                                "metric": metric,
                                **_stats(rng, value),
                            }
                        )
    columns = ["model", "method", "module", "layer", "depth", "rank_a", "rank_b", "i", "j"]
    return pd.DataFrame(out, columns=[*columns, "metric", "mean", "std"] if not out else None)


def update_table(grid: dict[str, Method], rng) -> pd.DataFrame:
    out = []
    for name, method in grid.items():
        if not method.has_adapter:
            continue
        quantities = ["delta_w_norm", "a_change", "a_init_phi"]
        if method.kind == "dora":
            quantities.append("magnitude_change")
        for (layer, module), q in itertools.product(_modules(method), quantities):
            for epoch in range(6):
                value = (
                    1 - 0.01 * epoch if q == "a_init_phi" else 0.1 * epoch * rng.uniform(0.5, 1.5)
                )
                base = {"model": MODEL, "method": name, "module": module, "layer": layer}
                base.update(depth=(layer + 1) / N_LAYERS, epoch=epoch, quantity=q)
                out.append({**base, "metric": "value", **_stats(rng, value)})
                if q == "a_init_phi":
                    out.append({**base, "metric": "random_value", **_stats(rng, RANK / 384)})
    return pd.DataFrame(out)


AB_QUANTITIES = [
    f"{m}{s}"
    for s in ("_frac", "_centred_frac")
    for m in ("a_out", "b_out", "a_out_grad", "b_out_grad")
] + ["grad_norm_ratio_B_A", "dW_cos", "cka_a_code_vs_b_out_grad"]


def ab_table(grid: dict[str, Method], rng) -> pd.DataFrame:
    out = []
    for name, method in grid.items():
        if not method.has_adapter:
            continue
        for (layer, module), q, state in itertools.product(
            _modules(method), AB_QUANTITIES, ("trained", "untrained")
        ):
            value = rng.uniform(0.5, 3) if q == "grad_norm_ratio_B_A" else rng.uniform(0.05, 0.95)
            base = {"model": MODEL, "method": name, "module": module, "layer": layer}
            out.append({**base, "depth": (layer + 1) / N_LAYERS, "quantity": q, "state": state})
            out[-1].update(_stats(rng, value))
    return pd.DataFrame(out)


def cka_table(grid: dict[str, Method], rng) -> pd.DataFrame:
    out = []
    for name, method in grid.items():
        if not method.trains_encoder:
            continue
        for kind, a, b in itertools.product(
            ("linear", "debiased", "rbf"), range(N_LAYERS + 1), range(N_LAYERS + 1)
        ):
            value = 1.0 if a == b == 0 else rng.uniform(0.3, 1)
            metrics = {"value": value}
            if a == b:
                metrics.update(
                    null_mean=0.1, null_q95=0.2, ci_low=value - 0.05, ci_high=value + 0.05
                )
            for metric, v in metrics.items():
                out.append(
                    {
                        "model": MODEL,
                        "method": name,
                        "layer_frozen": a,
                        "layer_lora": b,
                        "depth_frozen": a / N_LAYERS,
                        "depth_lora": b / N_LAYERS,
                        "kind": kind,
                        "metric": metric,
                        **_stats(rng, v),
                    }
                )
    return pd.DataFrame(out)


def contributions_table(grid: dict[str, Method], rng) -> pd.DataFrame:
    out = []
    for name, method in grid.items():
        if method.readout != "last":
            continue
        variants = ("adapted", "base", "delta") if method.trains_encoder else ("base",)
        for variant, layer, component, metric in itertools.product(
            variants, range(1, N_LAYERS + 1), ("attn", "mlp", "attn+mlp"), ("norm_ratio", "cosine")
        ):
            value = rng.uniform(-0.1, 0.1) if variant == "delta" else rng.uniform(0.2, 1.0)
            out.append(
                {
                    "model": MODEL,
                    "method": name,
                    "variant": variant,
                    "layer": layer,
                    "depth": layer / N_LAYERS,
                    "component": component,
                    "metric": metric,
                    **_stats(rng, value, band=True),
                }
            )
    return pd.DataFrame(out)


def lens_table(grid: dict[str, Method], rng) -> pd.DataFrame:
    out = []
    for name, method in grid.items():
        if method.readout != "last":
            continue
        variants = ("adapted", "base") if method.trains_encoder else ("base",)
        for lens, variant, layer, metric in itertools.product(
            ("logit", "tuned"),
            variants,
            range(N_LAYERS + 1),
            ("uar", "agreement", "kl", "fit_kl", "dev_kl"),
        ):
            if lens == "logit" and metric in ("fit_kl", "dev_kl"):
                continue
            out.append(
                {
                    "model": MODEL,
                    "method": name,
                    "lens": lens,
                    "variant": variant,
                    "layer": layer,
                    "depth": layer / N_LAYERS,
                    "metric": metric,
                    **_stats(rng, rng.uniform(0.1, 0.9), band=metric != "uar"),
                }
            )
    return pd.DataFrame(out)


def draw_all(grid: dict[str, Method]) -> dict:
    """name -> the figure, drawn from this grid's generated tables."""
    rng = np.random.default_rng(0)
    contributions = contributions_table(grid, rng)
    return {
        "spectra": figures.spectra_figure(
            svd_table(grid, rng), subspace_table(grid, rng), MODEL, 0.5, energy_fraction=0.9
        ),
        "update_dynamics": update_figure(update_table(grid, rng), MODEL),
        "ab_dynamics": figures.ab_dynamics_figure(
            ab_table(grid, rng), MODEL, 0.9, untrained_baseline="matched_scale"
        ),
        "cka": figures.cka_figure(cka_table(grid, rng), MODEL),
        "contributions": figures.contributions_figure(contributions, MODEL),
        "contributions_depth": figures.contributions_depth_figure(contributions, [MODEL]),
        "logit_lens": figures.logit_lens_figure(lens_table(grid, rng), MODEL, 4),
    }


@contextmanager
def declared(methods: dict[str, Method]):
    """The grid's methods declared (labels, order, colours), the previous declaration after."""
    saved = dict(serlens_methods._DECLARED)
    serlens_methods.declare(methods)
    try:
        yield methods
    finally:
        serlens_methods.declare(saved)


@pytest.fixture(scope="module", params=list(GRIDS))
def grid(request):
    with declared(GRIDS[request.param]):
        yield request.param, GRIDS[request.param]


@pytest.fixture(scope="module")
def drawn(grid):
    name, methods = grid
    figs = draw_all(methods)
    for fig in figs.values():
        fig.set_dpi(72)  # the layout is in inches: the check needs no 150 dpi raster
        fig.canvas.draw()
    return name, methods, figs


# --------------------------------------------------------------------------- geometry


def _legends(container) -> list:
    out = list(container.legends)
    for sub in getattr(container, "subfigs", []):
        out += _legends(sub)
    return out


def all_legends(fig) -> list:
    return _legends(fig) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _overlap(a, b, tol: float = 1.0) -> bool:
    """Whether two display bboxes overlap by more than ``tol`` pixels each way."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def titles(fig) -> list:
    """Every non-empty axes title and (sub)figure suptitle, as text artists."""
    out = []
    for ax in fig.axes:
        for text in (ax.title, ax._left_title, ax._right_title):
            if text.get_visible() and text.get_text():
                out.append(text)

    def sup(container):
        found = [container._suptitle] if container._suptitle is not None else []
        for sub in getattr(container, "subfigs", []):
            found += sup(sub)
        return found

    return out + [t for t in sup(fig) if t.get_text()]


def legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in all_legends(fig) for t in legend.get_texts()]


# --------------------------------------------------------------------------- tests


def test_each_figure_draws_every_adapted_method(drawn):
    name, methods, figs = drawn
    adapted = [m for m, spec in methods.items() if spec.trains_encoder]
    labels = {m: methods[m].label for m in adapted}
    spectra_titles = [ax.get_title() for ax in figs["spectra"].axes]
    for method in adapted:
        assert f"{labels[method]}: singular values of ΔW" in spectra_titles, method
    heat = [ax for ax in figs["cka"].axes if ax.images]
    assert len(heat) == len(adapted)
    with_snapshots = [m for m in adapted if methods[m].has_adapter]
    rows = [ax.get_ylabel() for ax in figs["update_dynamics"].axes if ax.get_ylabel()]
    assert rows == [labels[m] for m in figures.method_order(with_snapshots)]
    for fig_name in ("ab_dynamics", "contributions", "logit_lens", "cka"):
        text = " ".join(legend_labels(figs[fig_name]))
        expected = with_snapshots if fig_name == "ab_dynamics" else adapted
        for method in expected:
            assert labels[method] in text, (fig_name, method)


def test_legends_lie_outside_the_axes_and_inside_the_figure(drawn):
    _, _, figs = drawn
    for name, fig in figs.items():
        legends = all_legends(fig)
        assert legends, name
        page = fig.bbox
        for legend in legends:
            box = legend.get_window_extent()
            what = [t.get_text() for t in legend.get_texts()][:3]
            assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1, (name, what, "cut at a side")
            assert box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1, (name, what, "cut")
            for ax in fig.axes:
                if ax.get_visible() and ax.axison:
                    assert not _overlap(box, ax.get_window_extent()), (name, what, ax.get_title())


def test_titles_do_not_overlap(drawn):
    _, _, figs = drawn
    for name, fig in figs.items():
        found = titles(fig)
        assert len(found) >= 2, name
        boxes = [(t.get_text(), t.get_window_extent()) for t in found]
        for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
            assert not _overlap(a, b), (name, ta, tb)
        for text, box in boxes:  # and none is cut at the figure's sides
            assert box.x0 >= fig.bbox.x0 - 1 and box.x1 <= fig.bbox.x1 + 1, (name, text)


def test_legends_hold_an_entry_per_method_not_per_line(drawn):
    """The legends of the figure (and its parts) hold one entry per method colour plus a few
    for line styles (module types, nulls, bands), not one per method x module x null; a
    legend of one panel names at most two things (the spectra's null)."""
    _, methods, figs = drawn
    n_methods = len(methods)
    for name, fig in figs.items():
        assert _legends(fig), name
        for legend in _legends(fig):
            labels = [t.get_text() for t in legend.get_texts()]
            assert len(labels) == len(set(labels)), (name, "repeated legend entries", labels)
            # methods, 3 module types, and at most 6 entries saying what styles and shades are
            assert len(labels) <= n_methods + len(TYPES3) + 6, (name, labels)
        for ax in fig.axes:
            if ax.get_legend() is not None:
                assert len(ax.get_legend().get_texts()) <= 2, (name, ax.get_title())


def _line_style(line) -> tuple:
    return (line.get_linestyle(), line.get_marker())


def test_module_types_and_nulls_have_their_own_line_styles():
    """In the spectra's per-layer panels and the update dynamics, module types of one method are
    told apart (line style or marker), and no type is drawn like a null (8-method grid)."""
    with declared(METHODS_GRID) as methods:
        figs = draw_all(methods)
        color = figures.method_colors(methods)["lora_all_r8"]
    ranks = next(ax for ax in figs["spectra"].axes if ax.get_ylabel().startswith("effective rank"))
    mine = [line for line in ranks.get_lines() if line.get_color() == color]
    styles = {_line_style(line) for line in mine}
    null = {_line_style(line) for line in mine if line.get_linestyle() == ":"}
    assert len(null) == 1, null  # the null of the method
    assert len(styles - null) == len(TYPES3), styles  # and one style per module type
    update = figs["update_dynamics"]
    row = [ax for ax in update.axes if ax.get_ylabel() == methods["lora_all_r8"].label][0]
    assert len({_line_style(line) for line in row.get_lines()}) == len(TYPES3)
    # the legends name each type, once in each legend
    for fig in (figs["spectra"], update, figs["ab_dynamics"]):
        for kind in TYPES3:
            counts = [
                sum(t.get_text() == f"module {kind}" for t in legend.get_texts())
                for legend in _legends(fig)
            ]
            assert max(counts) == 1, (kind, counts)


def test_contributions_depth_tells_methods_apart(drawn):
    """One model: each method its own colour (several models: its own line style and marker)."""
    _, methods, figs = drawn
    ax = figs["contributions_depth"].axes[0]
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
    adapted = [m for m, spec in methods.items() if spec.trains_encoder]
    assert len(lines) == len(adapted)
    assert len({(line.get_color(), *_line_style(line)) for line in lines}) == len(adapted)


def test_logit_lens_reads_full_fine_tuning_on_its_own_encoder():
    """Full fine-tuning (no rank) is read on its adapted encoder, as LoRA and DoRA are."""
    with declared(METHODS_GRID) as methods:
        table = lens_table(methods, np.random.default_rng(0))
        base_rows = (table["method"] == "full") & (table["variant"] == "base")
        table.loc[base_rows, "mean"] = 5.0  # the pre-trained encoder under full's head
        fig = figures.logit_lens_figure(table, MODEL, 4)
        color = figures.method_colors(methods)["full"]
    full = [line for ax in fig.axes for line in ax.get_lines() if line.get_color() == color]
    assert len(full) >= 2 * 3  # a line per lens and metric
    for line in full:
        assert np.nanmax(line.get_ydata()) < 1.0


def test_figures_save(drawn, tmp_path):
    _, _, figs = drawn
    for name in ("spectra", "cka"):
        png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
        figures.save(figs[name], png, svg)
        assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000
