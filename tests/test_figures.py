"""Every figure renders from small generated inputs, and the fold aggregation says what it averaged.

The inputs are synthetic tables in the layouts the training and analysis steps write (2 folds;
a frozen run and two LoRA ranks, the fewest that give a cross-rank subspace table), so the
test needs no model and runs in seconds.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from serlens.analysis.registry import ANALYSES
from serlens.methods import parse_method
from serlens.report import figures
from serlens.report.aggregate import aggregate_runs, confusion_from_predictions, table_spec

# the seed-pair table needs two seeds; this tree has one (test_seed_floor_without_pairs_says_so)
TABLES = [name for name, spec in ANALYSES.items() if spec.scope != "seed_pairs"]


def expected_runs(name, results, models, methods, folds):
    """{(model, method, seed, fold): per-run table} of this test's tree (seed 0), for the methods
    the analysis applies to."""
    spec = ANALYSES[name]
    if spec.scope == "run":
        methods = [m for m in methods if spec.applies_to(parse_method(m))]
    else:
        methods = ["lora"]
    return {
        (model, method, 0, int(fold)): Path(results)
        / "analysis"
        / model
        / method
        / f"fold{fold}"
        / f"{name}.tsv"
        for model in models
        for method in methods
        for fold in folds
    }


def history_files(train_root, model, methods, folds):
    """``{(method, seed, fold): history.tsv}`` of this test's tree (seed 0; frozen_wsum beside frozen)."""
    files = {}
    for method in methods:
        for fold in folds:
            run = Path(train_root) / model / method / f"fold{fold}"
            files[(method, 0, int(fold))] = run / "history.tsv"
            if method == "frozen":
                files[("frozen_wsum", 0, int(fold))] = run / "history_wsum.tsv"
    return files


def aggregate_analysis(name, results, models, methods, folds, output=None):
    return aggregate_runs(name, expected_runs(name, results, models, methods, folds), output)


def confusion_table(results, models, methods, folds, classes, output=None):
    files = {}
    for model in models:
        for method in methods:
            for fold in folds:
                run = Path(results) / "train" / model / method / f"fold{fold}"
                files[(model, method, 0, int(fold))] = run / "predictions.tsv"
                if method == "frozen":
                    files[(model, "frozen_wsum", 0, int(fold))] = run / "predictions_wsum.tsv"
    return confusion_from_predictions(files, classes, output)


MODEL = "tiny.en"
N_LAYERS = 4
CLASSES = ["neu", "hap", "ang", "sad"]
FOLDS = [1, 2]
RANKS = [2, 4]
METHODS = ["frozen", *(f"lora_r{r}" for r in RANKS)]
MODULES = [f"layers.{i}.self_attn.v_proj" for i in range(N_LAYERS)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False)


def probe_rows(protocol: str, layer: int, rng: np.random.Generator) -> list[dict]:
    task, control = rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.35)
    return [
        {
            "protocol": protocol,
            "layer": layer,
            "depth": layer / N_LAYERS,
            "task": name,
            "status": "ok",
            "C": 1.0,
            "cv_uar": value,
            "uar": value,
            "war": value,
            "converged": True,
            "cv_unconverged": 0,
            "n_train": 40,
            "n_test": 10,
            "selectivity_uar": task - control if name == "emotion" else np.nan,
            "selectivity_war": task - control if name == "emotion" else np.nan,
        }
        for name, value in (("emotion", task), ("control", control))
    ]


def run_tables(method: str, fold: int, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """One run's analysis tables, in the column layout of serlens.analysis.* (plus model/method/fold)."""
    lora = method != "frozen"
    rank = int(method.removeprefix("lora_r")) if lora else None
    variants = ["adapted", "base"] if lora else ["base"]
    tables = {}
    tables["contributions"] = pd.DataFrame(
        {
            "variant": v,
            "layer": layer,
            "depth": layer / N_LAYERS,
            "component": c,
            "metric": m,
            "value": rng.uniform(-1, 1) if m == "cosine" else rng.uniform(0.2, 1.5),
            "n_frames": 500,
        }
        for v in variants
        for layer in range(1, N_LAYERS + 1)
        for c in ("attn", "mlp", "attn+mlp")
        for m in ("norm_ratio", "cosine")
    )
    tables["logit_lens"] = pd.DataFrame(
        {
            "lens": lens,
            "variant": v,
            "layer": layer,
            "depth": layer / N_LAYERS,
            "metric": m,
            "value": rng.uniform(0, 1),
        }
        for lens in ("logit", "tuned")
        for v in variants
        for layer in range(N_LAYERS + 1)
        for m in ("uar", "war", "agreement", "kl", "entropy")
    )
    probe = []
    protocols = ["crossfit_test"] + ([] if lora else ["train_test"])
    for protocol in protocols:
        for layer in range(N_LAYERS + 1):
            probe += probe_rows(protocol, layer, rng)
    tables["probing"] = pd.DataFrame(probe)
    if not lora:
        return tables
    svd = []
    for i, module in enumerate(MODULES):
        base = {"module": module, "layer": i, "depth": (i + 1) / N_LAYERS}
        for matrix in ("delta_w", "lora_a", "lora_b"):
            sigma = np.sort(rng.uniform(0.01, 1.0, rank))[::-1]
            svd += [
                {
                    **base,
                    "matrix": matrix,
                    "quantity": q,
                    "index": None,
                    "value": rng.uniform(1, rank),
                }
                for q in ("effective_rank", "stable_rank", "energy_rank")
            ]
            svd += [
                {**base, "matrix": matrix, "quantity": "sigma", "index": k + 1, "value": s}
                for k, s in enumerate(sigma)
            ]
        svd.append(
            {
                **base,
                "matrix": "merged",
                "quantity": "intruder_count",
                "index": None,
                "value": float(i % 2),
            }
        )
        svd += [
            {
                **base,
                "matrix": "merged",
                "quantity": "intruder_max_cos",
                "index": k,
                "value": rng.uniform(0.3, 1),
            }
            for k in range(1, 4)
        ]
    tables["svd"] = pd.DataFrame(svd)
    ab = []
    quantities = [
        "a_out",
        "b_out",
        "a_out_grad",
        "b_out_grad",
        "grad_norm_A",
        "grad_norm_B",
        "dW_from_A_norm",
        "dW_from_B_norm",
        "dW_cos",
        "cka_a_code_vs_b_out_grad",
    ]
    for i, module in enumerate(MODULES):
        base = {"module": module, "layer": i, "depth": (i + 1) / N_LAYERS}
        values = {
            s: {q: rng.uniform(0.1, rank) for q in quantities} for s in ("trained", "untrained")
        }
        for state in ("trained", "untrained"):
            ab += [
                {**base, "quantity": q, "state": state, "value": v}
                for q, v in values[state].items()
            ]
        ab += [
            {
                **base,
                "quantity": q,
                "state": "ratio",
                "value": values["trained"][q] / values["untrained"][q],
            }
            for q in quantities[:8]
        ]
        # claim 3 (serlens.analysis.ab_cka): the sound estimator in every fold, the
        # paper's in fold 1 only
        claim3 = [
            ("cka_fwd_a", "trained"),
            ("cka_fwd_a_null", "untrained"),
            ("cka_fwd_b", "trained"),
            ("cka_fwd_b_null", "untrained"),
            ("cka_bwd_ba", "trained"),
            ("cka_bwd_ba", "untrained"),
        ]
        for prefix in ("", "paper_") if fold == 1 else ("",):
            for q, state in claim3:
                value = rng.uniform(0.1, 0.9)
                ab.append({**base, "quantity": prefix + q, "state": state, "value": value})
                if not prefix:  # the sound estimator's speaker-jackknife interval
                    ab += [
                        {**base, "quantity": f"{q}{bound}", "state": state, "value": value + d}
                        for bound, d in (("_band_low", -0.05), ("_band_high", 0.05))
                    ]
    tables["ab_dynamics"] = pd.DataFrame(ab)
    tables["cka"] = pd.DataFrame(
        {
            "layer_frozen": a,
            "layer_lora": b,
            "depth_frozen": a / N_LAYERS,
            "depth_lora": b / N_LAYERS,
            "kind": kind,
            "value": 1.0 if a == b == 0 else rng.uniform(-0.05 if kind == "debiased" else 0, 1),
            "null_mean": 0.0 if a == b else np.nan,
            "null_q95": 0.2 if a == b else np.nan,
            "ci_low": 0.1 if a == b else np.nan,
            "ci_high": 0.9 if a == b else np.nan,
        }
        for kind in ("linear", "debiased", "rbf")
        for a in range(N_LAYERS + 1)
        for b in range(N_LAYERS + 1)
    )
    return tables


def subspace_table(fold: int, rng: np.random.Generator) -> pd.DataFrame:
    grid = [1, 2]
    return pd.DataFrame(
        {
            "model": MODEL,
            "fold": fold,
            "module": m,
            "layer": i,
            "depth": (i + 1) / N_LAYERS,
            "rank_a": RANKS[0],
            "rank_b": RANKS[1],
            "i": a,
            "j": b,
            "phi": rng.uniform(0, 1),
            "phi_null": max(a, b) / 8,
        }
        for i, m in enumerate(MODULES)
        for a in grid
        for b in [*grid, RANKS[1]]
    )


def predictions(rng: np.random.Generator, n: int = 24) -> pd.DataFrame:
    labels = rng.choice(CLASSES, n)
    preds = np.where(rng.uniform(size=n) < 0.6, labels, rng.choice(CLASSES, n))
    probs = rng.dirichlet(np.ones(len(CLASSES)), n)
    frame = pd.DataFrame(
        {"utt_id": [f"u{i:03d}" for i in range(n)], "label": labels, "pred": preds}
    )
    for k, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, k]
    return frame


def history(rng: np.random.Generator, epochs: int) -> pd.DataFrame:
    dev = np.clip(0.25 + np.cumsum(rng.uniform(-0.05, 0.12, epochs)), 0, 1)
    best = [bool(dev[i] > dev[:i].max()) if i else True for i in range(epochs)]
    return pd.DataFrame(
        {
            "epoch": np.arange(1, epochs + 1),
            "train_loss": 1.4 * np.exp(-0.2 * np.arange(epochs)),
            "dev_uar": dev,
            "lr": 1e-3,
            "utt_per_s": 100.0,
            "epoch_s": 0.1,
            "best": best,
        }
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results/ tree with the grid's per-run files, then the aggregated tables."""
    root = tmp_path_factory.mktemp("report") / "results"
    rng = np.random.default_rng(0)
    for method in METHODS:
        for fold in FOLDS:
            run = root / "train" / MODEL / method / f"fold{fold}"
            write(predictions(rng), run / "predictions.tsv")
            write(history(rng, 12 if method == "frozen" else 4), run / "history.tsv")
            if method == "frozen":
                write(predictions(rng), run / "predictions_wsum.tsv")
                write(history(rng, 12), run / "history_wsum.tsv")
            for name, table in run_tables(method, fold, rng).items():
                for column, value in reversed(
                    [("model", MODEL), ("method", method), ("fold", fold)]
                ):
                    table.insert(0, column, value)
                write(table, root / "analysis" / MODEL / method / f"fold{fold}" / f"{name}.tsv")
    for fold in FOLDS:
        write(
            subspace_table(fold, rng),
            root / "analysis" / MODEL / "lora" / f"fold{fold}" / "subspace.tsv",
        )
    for name in TABLES:
        aggregate_analysis(
            name, root, [MODEL], METHODS, FOLDS, output=root / "tables" / f"{name}.tsv"
        )
    confusion_table(
        root, [MODEL], METHODS, FOLDS, CLASSES, output=root / "tables" / "confusion.tsv"
    )
    performance = pd.DataFrame(
        {
            "model": MODEL,
            "method": m,
            "fold": f,
            "uar": rng.uniform(0.4, 0.7),
            "war": rng.uniform(0.4, 0.7),
            "macro_f1": 0.5,
            "n": 24,
        }
        for m in ["frozen", "frozen_wsum", *METHODS[1:]]
        for f in FOLDS
    )
    write(performance, root / "tables" / "performance.tsv")
    return root


def table(results: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(results / "tables" / f"{name}.tsv", sep="\t")


RULEGRAPH_DOT = """Building DAG of jobs...
digraph snakemake_dag {
    graph[bgcolor=white, margin=0];
    node[shape=box, style=rounded, fontname=sans, fontsize=10, penwidth=2];
    edge[penwidth=2, color=grey];
	0[label = "all", color = "0.04 0.6 0.85", style="rounded"];
	1[label = "train_lora", color = "0.60 0.6 0.85", style="rounded"];
	2[label = "manifest", color = "0.32 0.6 0.85", style="rounded"];
	3[label = "weights", color = "0.63 0.6 0.85", style="rounded"];
	4[label = "figure_logit_lens", color = "0.25 0.6 0.85", style="rounded"];
	2 -> 1
	3 -> 1
	1 -> 4
	4 -> 0
	2 -> 0
}
"""


def figure_cases(results: Path) -> dict:
    """name -> a function returning the figure, one per figure family (two for contributions)."""
    return {
        "performance": lambda: figures.performance_figure(
            table(results, "performance"), [MODEL], len(CLASSES)
        ),
        "confusion": lambda: figures.confusion_figure(
            table(results, "confusion"), [MODEL], CLASSES
        ),
        "training_curves": lambda: figures.training_curves_figure(
            figures.load_histories(history_files(results / "train", MODEL, METHODS, FOLDS)),
            MODEL,
            len(CLASSES),
        ),
        "contributions": lambda: figures.contributions_figure(
            table(results, "contributions"), MODEL
        ),
        "contributions_depth": lambda: figures.contributions_depth_figure(
            table(results, "contributions"), [MODEL]
        ),
        "logit_lens": lambda: figures.logit_lens_figure(
            table(results, "logit_lens"), MODEL, len(CLASSES)
        ),
        "probing": lambda: figures.probing_figure(table(results, "probing"), MODEL, len(CLASSES)),
        "spectra": lambda: figures.spectra_figure(
            table(results, "svd"), table(results, "subspace"), MODEL, 0.5
        ),
        "ab_dynamics": lambda: figures.ab_dynamics_figure(
            table(results, "ab_dynamics"), MODEL, 0.9
        ),
        "ab_cka": lambda: figures.ab_cka_figure(table(results, "ab_dynamics"), MODEL),
        "cka": lambda: figures.cka_figure(table(results, "cka"), MODEL),
        "rulegraph": lambda: figures.rulegraph_figure(RULEGRAPH_DOT),
    }


def assert_images(png: Path, svg: Path) -> None:
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{png} is not a PNG"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        width, height = image.size
        assert width >= 300 and height >= 200, f"{png}: {image.size}"
        assert np.asarray(image.convert("L")).std() > 1, f"{png} is blank"
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg"), f"{svg} is not an SVG"
    assert svg.stat().st_size > 1000


def test_every_figure_renders(results, tmp_path):
    for name, make in figure_cases(results).items():
        png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
        figures.save(make(), png, svg)
        assert_images(png, svg)


def test_claim3_figure_draws_each_estimator_against_its_null(results):
    """Every forward/backward panel holds a solid and a dashed line per LoRA method; without
    the paper's estimator's rows (no fold 1) its row says so instead of drawing nothing."""
    ab = table(results, "ab_dynamics")
    from serlens.report.figures.style import lora_methods

    n_lora = len(lora_methods(ab["method"]))
    assert n_lora >= 2
    fig = figures.ab_cka_figure(ab, MODEL)
    for ax in fig.axes[:3]:
        styles = sorted(line.get_linestyle() for line in ax.get_lines() if line.get_marker() == "o")
        assert styles == ["-"] * n_lora + ["--"] * n_lora, ax.get_title()
    # row 1 shades the speaker interval (the table's ±0.05 around each run's value): its
    # height is 0.1 at every layer, where ± std over runs would vary
    quantities = ab["quantity"].astype(str)
    for ax in fig.axes[:3]:
        shades = [c for c in ax.collections if len(c.get_paths())]
        assert len(shades) == 2 * n_lora, ax.get_title()
        for shade in shades:
            xy = shade.get_paths()[0].vertices
            for x in np.unique(np.round(xy[:, 0], 9)):
                at = xy[np.isclose(xy[:, 0], x), 1]
                assert at.max() - at.min() == pytest.approx(0.1), ax.get_title()
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "speaker-jackknife" in legend and "row 2: ± std over runs" in legend
    no_band = ab[~quantities.str.contains("_band_")]
    fig = figures.ab_cka_figure(no_band, MODEL)
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "speaker-jackknife" not in legend and "± std over runs" in legend
    sound_only = ab[~quantities.str.startswith("paper_cka")]
    fig = figures.ab_cka_figure(sound_only, MODEL)
    texts = [t.get_text() for ax in fig.axes[3:6] for t in ax.texts]
    assert any("no paper_cka_fwd_a rows" in t for t in texts)


def test_ab_figure_shades_row_3_with_the_speaker_band_where_the_table_has_it(results):
    """dW_cos with band rows ±0.05 around each run's value: its panel shades exactly 0.1
    around the mean at every layer, and the note says row 3 has the speaker band."""
    ab = table(results, "ab_dynamics")
    cos = ab[ab["quantity"] == "dW_cos"]
    bands = [cos.assign(quantity=f"dW_cos{b}", mean=cos["mean"] + d) for b, d in (("_band_low", -0.05), ("_band_high", 0.05))]  # fmt: skip
    ratio = ab[ab["quantity"] == "grad_norm_ratio_B_A"].assign(
        quantity="grad_norm_ratio_B_A_band_low"
    )
    a_out = cos.assign(quantity="a_out_frac_band_low")  # a rows-1-2 band row
    with_band = pd.concat([ab, *bands, ratio, a_out], ignore_index=True)
    fig = figures.ab_dynamics_figure(with_band, MODEL, 0.9)
    ax = next(a for a in fig.axes if a.get_ylabel().startswith("cos(s²"))
    shades = [c for c in ax.collections if len(c.get_paths())]
    assert shades
    for shade in shades:
        xy = shade.get_paths()[0].vertices
        for x in np.unique(np.round(xy[:, 0], 9)):
            at = xy[np.isclose(xy[:, 0], x), 1]
            assert at.max() - at.min() == pytest.approx(0.1)
    notes = " ".join(t.get_text() for a in fig.axes for t in a.texts)
    assert "(a, b, ∂L/∂a)\nand row 3" in notes and "∂L/∂b: ± std" in notes
    plain = figures.ab_dynamics_figure(ab, MODEL, 0.9)
    assert "(a, b, ∂L/∂a)\nand row 3" not in " ".join(
        t.get_text() for a in plain.axes for t in a.texts
    )


def test_figures_without_lora_runs(results, tmp_path):
    """A frozen-only grid (lora.ranks: []) still gives its figures, with no LoRA lines."""
    frozen_only = {}
    for name in ("contributions", "logit_lens", "probing"):
        frame = table(results, name)
        frozen_only[name] = frame[frame["method"] == "frozen"]
    cases = {
        "contributions": lambda: figures.contributions_figure(frozen_only["contributions"], MODEL),
        "contributions_depth": lambda: figures.contributions_depth_figure(
            frozen_only["contributions"], [MODEL]
        ),
        "logit_lens": lambda: figures.logit_lens_figure(
            frozen_only["logit_lens"], MODEL, len(CLASSES)
        ),
        "probing": lambda: figures.probing_figure(frozen_only["probing"], MODEL, len(CLASSES)),
    }
    for name, make in cases.items():
        figures.save(make(), tmp_path / f"{name}.png", tmp_path / f"{name}.svg")
        assert_images(tmp_path / f"{name}.png", tmp_path / f"{name}.svg")


def test_spectra_with_one_rank(results, tmp_path):
    svd = table(results, "svd")
    one_rank = svd[svd["method"] == f"lora_r{RANKS[0]}"]
    empty = table(results, "subspace").iloc[:0]
    figures.save(
        figures.spectra_figure(one_rank, empty, MODEL), tmp_path / "s.png", tmp_path / "s.svg"
    )
    assert_images(tmp_path / "s.png", tmp_path / "s.svg")


@pytest.fixture(scope="module")
def tables_by_name(results):
    return {name: table(results, name) for name in TABLES}


def test_aggregated_tables_are_tidy_with_fold_counts(tables_by_name):
    for name, frame in tables_by_name.items():
        spec = table_spec(name)
        keys = ["model", "method", *spec.keys, *(["metric"] if spec.melted else [])]
        summary = [
            "mean",
            "std",
            "n_folds",
            "n_seeds",
            "seed_std",
            "band_low",
            "band_high",
            "missing_runs",
        ]
        assert list(frame.columns) == [*keys, *summary], name
        assert not frame.duplicated(keys).any(), f"{name}: one observation per row"
        # the paper's claim-3 estimator runs in fold 1 only
        fold1 = (
            frame["quantity"].astype(str).str.startswith("paper_cka")
            if name == "ab_dynamics"
            else False
        )
        assert (frame["n_folds"] == np.where(fold1, 1, len(FOLDS))).all(), name
        assert (frame["n_seeds"] == 1).all() and frame["seed_std"].isna().all(), name
        assert frame["missing_runs"].isna().all(), name


def test_aggregate_mean_std_and_derived_rows(results, tables_by_name):
    runs = [
        pd.read_csv(
            results / "analysis" / MODEL / "lora_r2" / f"fold{f}" / "contributions.tsv", sep="\t"
        )
        for f in FOLDS
    ]
    pick = dict(layer=2, component="mlp", metric="norm_ratio")

    def value(run, variant):
        sel = run[
            (run["variant"] == variant)
            & np.logical_and.reduce([run[k] == v for k, v in pick.items()])
        ]
        return float(sel["value"].iloc[0])

    agg = tables_by_name["contributions"]
    agg = agg[
        (agg["method"] == "lora_r2") & np.logical_and.reduce([agg[k] == v for k, v in pick.items()])
    ]
    adapted = [value(r, "adapted") for r in runs]
    delta = [value(r, "adapted") - value(r, "base") for r in runs]
    row = agg[agg["variant"] == "adapted"].iloc[0]
    assert row["mean"] == pytest.approx(np.mean(adapted))
    assert row["std"] == pytest.approx(np.std(adapted, ddof=1))
    row = agg[agg["variant"] == "delta"].iloc[0]
    assert row["mean"] == pytest.approx(np.mean(delta)) and row["std"] == pytest.approx(
        np.std(delta, ddof=1)
    )
    ab = tables_by_name["ab_dynamics"]
    assert set(ab.loc[ab["quantity"] == "grad_norm_ratio_B_A", "state"]) == {"trained", "untrained"}
    probing = tables_by_name["probing"]
    assert set(probing.loc[probing["task"] == "control", "metric"]).isdisjoint({"selectivity_uar"})


def test_missing_runs_are_named_not_averaged(results, tmp_path):
    files = expected_runs("probing", results, [MODEL], METHODS, [*FOLDS, 3])
    summary = aggregate_analysis("probing", results, [MODEL], METHODS, [*FOLDS, 3])
    assert [key for key, path in files.items() if not path.is_file()] == [
        (MODEL, m, 0, 3) for m in METHODS
    ]
    assert (summary["n_folds"] == 2).all()
    assert (summary["missing_runs"] == "seed0/fold3").all()


def test_confusion_sums_folds(results):
    confusion = table(results, "confusion")
    for method in ["frozen", "frozen_wsum", *METHODS[1:]]:
        sel = confusion[confusion["method"] == method]
        assert len(sel) == len(CLASSES) ** 2
        assert sel["count"].sum() == 24 * len(FOLDS)


def test_rulegraph_layout_goes_left_to_right():
    nodes, edges = figures.parse_rulegraph(RULEGRAPH_DOT)
    assert [label for label, _ in nodes.values()] == [
        "all",
        "train_lora",
        "manifest",
        "weights",
        "figure_logit_lens",
    ]
    layout = figures.layered_layout(nodes, edges)
    for src, dst in edges:
        assert layout[src][0] < layout[dst][0]
    with pytest.raises(ValueError, match="cycle"):
        figures.layered_layout(["a", "b"], [("a", "b"), ("b", "a")])


def test_figures_drawn_from_threads_match_serial(results, tmp_path):
    """Snakemake ``run:`` rules draw figures from threads of one process: same PNGs as one by one.

    rcParams are process-global. Without the figures' lock, the quick rule graph, started first,
    would leave its rc settings while the others are still being built (default sizes in their
    text), and a figure saved while another is built takes that one's settings for the tick
    labels made at drawing time (training curves).
    """
    cases = figure_cases(results)
    names = ["rulegraph", "probing", "training_curves"]  # quickest first

    def draw(name: str, out: Path) -> bytes:
        figures.save(cases[name](), out / f"{name}.png", out / f"{name}.svg")
        return (out / f"{name}.png").read_bytes()

    serial = {name: draw(name, tmp_path / "serial") for name in names}
    # restores the global rcParams should a draw leak its settings (a failing run)
    with matplotlib.rc_context(), ThreadPoolExecutor(max_workers=2 * len(names)) as pool:
        for round_ in range(2):
            jobs = {
                (name, k): pool.submit(draw, name, tmp_path / f"round{round_}" / f"thread{k}")
                for k in range(2)
                for name in names
            }
            for (name, k), job in jobs.items():
                assert job.result() == serial[name], f"{name}, round {round_}, copy {k}"


def test_figures_package_reexports_and_needs_no_pyplot(tmp_path):
    """The old module's names stay importable from the package, and drawing never imports pyplot."""
    for name in [
        *figures.__all__,
        "parse_rulegraph",
        "layered_layout",
        "snakemake_command",
        "selected_epoch",
        "figure_style",
        "method_order",
        "method_colors",
        "method_label",
        "band",
        "empty_panel",
        "chance_line",
    ]:
        assert callable(getattr(figures, name)), name
    for name in ["DPI", "RC", "DEPTH_LABEL", "RANK_COLORS", "COMPONENT_TITLES", "CKA_KINDS"]:
        assert hasattr(figures, name), name
    script = (
        "import sys\n"
        "from serlens.report import figures\n"
        f"figures.save(figures.rulegraph_figure({RULEGRAPH_DOT!r}), {str(tmp_path / 'r.png')!r},"
        f" {str(tmp_path / 'r.svg')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert_images(tmp_path / "r.png", tmp_path / "r.svg")


def test_per_speaker_rows_give_a_speaker_band(tmp_path, monkeypatch):
    """A per-run table with ``speaker, n_utts`` rows: the run value is the utterance-weighted
    mean, and the band comes from resampling speakers within folds (wider when they differ)."""
    from serlens.analysis import registry
    from serlens.analysis.registry import AnalysisSpec, TableSpec

    spec = AnalysisSpec(
        name="toy",
        compute=lambda data, settings: None,
        applies_to=lambda method: True,
        reads=frozenset(),
        keys=(),
        table=TableSpec(("layer",)),
    )
    monkeypatch.setitem(registry.ANALYSES, "toy", spec)
    rng = np.random.default_rng(0)

    def write(spread):
        files = {}
        for fold in (1, 2, 3):
            rows = []
            for k, spk in enumerate(("a", "b", "c")):
                offset = spread * (k - 1)
                for layer in (0, 1):
                    value = layer + offset + rng.normal(0, 0.01)
                    rows.append(
                        {"layer": layer, "speaker": f"{fold}{spk}", "n_utts": 2 + k, "value": value}
                    )
            path = tmp_path / f"s{spread}_f{fold}.tsv"
            pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
            files[("m", "frozen", 0, fold)] = path
        return aggregate_runs("toy", files, resamples=400)

    narrow, wide = write(0.01), write(1.0)
    for table in (narrow, wide):
        assert (table["band_low"] <= table["mean"]).all() and (
            table["mean"] <= table["band_high"]
        ).all()
    width = lambda t: (t["band_high"] - t["band_low"]).mean()  # noqa: E731
    assert width(wide) > 10 * width(narrow)
    # the run value is weighted by n_utts: speakers with 2, 3, 4 utterances, offsets -1, 0, +1
    layer0 = wide[wide["layer"] == 0].iloc[0]
    assert layer0["mean"] == pytest.approx((2 * -1 + 3 * 0 + 4 * 1) / 9, abs=0.02)


def test_seed_floor_without_pairs_says_so(tmp_path):
    """With one training seed there is no pair: the table says the floor needs two seeds."""
    from serlens.analysis.seed_floor import NEEDS_SEEDS

    table = aggregate_runs("seed_floor", {}, output=tmp_path / "seed_floor.tsv")
    assert list(table["note"]) == [NEEDS_SEEDS]
    assert pd.read_csv(tmp_path / "seed_floor.tsv", sep="\t")["note"].iloc[0] == NEEDS_SEEDS


def test_cka_figure_draws_the_seed_to_seed_floor(results, tmp_path):
    floor = pd.DataFrame(
        {
            "model": MODEL,
            "method": method,
            "measure": f"cka_{kind}",
            "module": np.nan,
            "layer": layer,
            "depth": layer / N_LAYERS,
            "i": np.nan,
            "metric": "value",
            "mean": 0.9,
            "std": 0.01,
        }
        for method in METHODS[1:]
        for kind in ("linear", "debiased")
        for layer in range(N_LAYERS + 1)
    )
    fig = figures.cka_figure(table(results, "cka"), MODEL, floor)
    legends = [*fig.legends, *(lg for sub in fig.subfigs for lg in sub.legends)]
    labels = {t.get_text() for legend in legends for t in legend.get_texts()}
    assert any("seed-to-seed floor" in label for label in labels), labels
    figures.save(fig, tmp_path / "c.png", tmp_path / "c.svg")
    assert_images(tmp_path / "c.png", tmp_path / "c.svg")
    without = figures.cka_figure(table(results, "cka"), MODEL)
    assert "needs two or more training seeds" in without._suptitle.get_text()
