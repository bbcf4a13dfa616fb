"""The light jobs the workflow runs in its own process (Snakemake ``run:`` rules).

Every ``run:`` body is one line, ``jobs.run("<job>", input, output, params, wildcards, log)``:
the job of that name gets what its rule passes (inputs, outputs, params, wildcards) and
nothing else, and its log records go to the rule's log. Drawing is thread-safe (figures are
built without pyplot) and seeding happens under :data:`GLOBAL_RNG`, so Snakemake may run
several of these at once in its threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

log = logging.getLogger("serlens")

#: Held while a job touches torch's, numpy's or Python's global random state (seeding, model
#: initialisation), so that jobs in other threads cannot interleave with it.
GLOBAL_RNG = threading.Lock()


class _ThisThread(logging.Filter):
    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread


_ONE_THREAD = []


def _one_thread_each() -> None:
    """In-process jobs run side by side with the heavy jobs' processes: one BLAS/OpenMP thread
    each, so that idle worker threads do not spin on cores the heavy jobs need."""
    if not _ONE_THREAD:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        _ONE_THREAD.append(threadpool_limits(limits=1))


@contextlib.contextmanager
def job_log(path):
    """serlens' log records of this thread (this job) go to ``path`` while the job runs."""
    _one_thread_each()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ThisThread())
    logger = logging.getLogger("serlens")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    except Exception:
        logger.exception("job failed")
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def train_head(input, output, params, wildcards) -> None:
    """A head on the cached features (seconds): trained in Snakemake's process, seeded under
    :data:`GLOBAL_RNG` so that it ends exactly as it would in a process of its own."""
    from serlens.steps import train_run

    with GLOBAL_RNG:
        train_run(
            dict(params.settings),
            model=wildcards.model,
            method=wildcards.method,
            seed=int(wildcards.seed),
            fold=int(wildcards.fold),
            manifest_path=input.manifest,
            folds_path=input.folds,
            weights_json=input.weights,
            out_dir=Path(output.metrics).parent,
            checkpoints=params.checkpoints,
            features_path=input.features,
            threads=None,
        )


def keyed(keys: Sequence, files: Sequence) -> dict[tuple, Path]:
    """``{(model, method, seed, fold): path}`` from a rule's params.run_keys and its input, in one order."""
    return {tuple(key): Path(path) for key, path in zip(keys, files, strict=True)}


def analysis(input, output, params, wildcards) -> None:
    """One analysis of one run (or, for a cross-rank analysis, of one model, seed and fold)."""
    from serlens.analysis.registry import ANALYSES, RunData, run_analysis
    from serlens.methods import parse_method

    spec = ANALYSES[params.name]
    common = dict(
        corpus=wildcards.corpus,
        model=wildcards.model,
        seed=int(wildcards.seed),
        fold=int(wildcards.fold),
        classes=list(params.classes),
    )
    if spec.scope == "run":
        data = RunData(method=parse_method(wildcards.method), inputs=dict(input), **common)
    elif spec.scope == "seed_pairs":  # inputs <product> of this seed, <product>_ref of the first
        method, inputs = parse_method(wildcards.method), dict(input)
        ours = {k: v for k, v in inputs.items() if not k.endswith("_ref")}
        theirs = {k.removesuffix("_ref"): v for k, v in inputs.items() if k.endswith("_ref")}
        data = {
            "run": RunData(method=method, inputs=ours, **common),
            "reference": RunData(
                method=method, inputs=theirs, **{**common, "seed": int(params.reference_seed)}
            ),
        }
    else:  # across LoRA ranks: inputs adapter_<method>
        data = {}
        for key, path in dict(input).items():
            method = parse_method(key.removeprefix("adapter_"))
            data[method.rank] = RunData(method=method, inputs={"adapter": path}, **common)
    run_analysis(params.name, data, params.settings, output[0])


def table(input, output, params, wildcards) -> None:
    from serlens.report.aggregate import aggregate_runs

    aggregate_runs(
        params.name,
        keyed(params.run_keys, input),
        output=output[0],
        resamples=params.resamples,
        seed=params.seed,
    )


def confusion(input, output, params, wildcards) -> None:
    from serlens.report.aggregate import confusion_from_predictions

    confusion_from_predictions(keyed(params.run_keys, input), params.classes, output=output[0])


def performance(input, output, params, wildcards) -> None:
    from serlens.report.tables import write_performance_tables

    write_performance_tables(
        keyed(params.run_keys, input.predictions),
        params.classes,
        input.manifest,
        output.performance,
        output.summary,
        output.significance,
        significance=dict(params.significance),
        seed=params.seed,
    )


def claims(input, output, params, wildcards) -> None:
    from serlens.report.claims import write_claims

    write_claims(
        input.significance,
        keyed(params.causal_keys, input.causal),
        keyed(params.ab_keys, input.ab),
        dict(params.settings),
        output[0],
        resamples=params.resamples,
        seed=params.seed,
        lens_files=keyed(params.lens_keys, input.lens),
        cka_files=keyed(params.cka_keys, input.cka),
        floor_files=keyed(params.floor_keys, input.floor),
    )


def protocol_gap(input, output, params, wildcards) -> None:
    from serlens.methods import configured_methods
    from serlens.report.protocol import write_protocol_gap

    runs = keyed(params.run_keys, [Path(p).parent for p in input.predictions])
    write_protocol_gap(
        runs,
        input.manifest,
        list(params.classes),
        configured_methods(dict(params.method_config)),
        output[0],
        prefixes=params.prefixes,
        resamples=params.resamples,
        seed=params.seed,
    )


def figure(input, output, params, wildcards) -> None:
    """A figure of an analysis spec, drawn from its aggregated tables."""
    from serlens.analysis.registry import ANALYSES
    from serlens.report.figures import save

    spec = next(f for a in ANALYSES.values() for f in a.figures if f.name == params.name)
    frames = {name: pd.read_csv(path, sep="\t") for name, path in dict(input).items()}
    model = wildcards.model if spec.per_model else None
    save(spec.draw(frames, model, dict(params.context)), output.png, output.svg)


def performance_figure(input, output, params, wildcards) -> None:
    from serlens.report.figures import performance_figure as draw
    from serlens.report.figures import save

    table = pd.read_csv(input[0], sep="\t")
    save(draw(table, models=params.models, n_classes=params.n_classes), output.png, output.svg)


def confusion_figure(input, output, params, wildcards) -> None:
    from serlens.report.figures import confusion_figure as draw
    from serlens.report.figures import save

    table = pd.read_csv(input[0], sep="\t")
    save(draw(table, models=params.models, classes=params.classes), output.png, output.svg)


def training_curves(input, output, params, wildcards) -> None:
    from serlens.report.figures import load_histories, save, training_curves_figure

    files = {
        (method, int(seed), int(fold)): p
        for (method, seed, fold), p in zip(params.run_keys, input, strict=True)
    }
    figure = training_curves_figure(
        load_histories(files), wildcards.model, n_classes=params.n_classes
    )
    save(figure, output.png, output.svg)


JOBS: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (
        train_head,
        analysis,
        table,
        confusion,
        performance,
        claims,
        protocol_gap,
        figure,
        performance_figure,
        confusion_figure,
        training_curves,
    )
}


def run(job: str, input, output, params, wildcards, log) -> None:
    """What every ``run:`` rule body calls: job ``job`` with the rule's log."""
    with job_log(log[0]):
        JOBS[job](input, output, params, wildcards)
