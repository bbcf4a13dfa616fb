"""``serlens``: the workflow's steps by hand. Each subcommand calls what the Snakemake rule calls."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from serlens.errors import SerlensError


def _merge(base: dict, update: dict) -> dict:
    """Mappings merged key by key, other values replaced (as Snakemake merges config files)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _config(paths) -> dict:
    from serlens.config import validate_config

    config: dict = {}
    for path in [paths] if isinstance(paths, str) else paths or []:
        _merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return validate_config(config)


def cmd_synth_corpus(args) -> None:
    from serlens.steps import synth_corpus

    root = synth_corpus(
        Path(args.out), args.utterances_per_speaker, args.seed, args.scripted_fraction
    )
    print(root)


def cmd_manifest(args) -> None:
    from serlens.steps import make_manifest

    config = _config(args.config)
    config["corpus"]["kind"] = args.kind or config["corpus"]["kind"]
    out = Path(args.out)
    manifest = make_manifest(config["corpus"], Path(args.root), out, out.with_name("summary.tsv"))
    print(f"{out}: {len(manifest)} utterances")
    print(manifest["label"].value_counts().to_string())


def cmd_folds(args) -> None:
    from serlens.corpus.registry import corpus_kind
    from serlens.steps import make_folds

    config = _config(args.config)
    if args.dev:
        config["folds"]["dev"] = args.dev
    out = Path(args.out)
    folds = make_folds(
        config["folds"]["dev"],
        Path(args.manifest),
        out,
        grouping=corpus_kind(config["corpus"]["kind"]).grouping,
        summary_out=out.with_name("fold_summary.tsv"),
    )
    print(folds.groupby(["fold", "split"]).size().unstack().to_string())


def cmd_weights(args) -> None:
    from serlens.models.resolve import resolve_weights

    print(resolve_weights(args.source, Path(args.resources)))


def cmd_transcribe(args) -> None:
    from serlens.models.resolve import resolve_weights
    from serlens.models.transcribe import transcribe

    model_dir = resolve_weights(args.model, Path(args.resources))
    for path in args.files:
        text = transcribe(model_dir, path)
        print(f"{path}\t{text}" if len(args.files) > 1 else text)


def cmd_tables(args) -> None:
    from serlens.config import corpus_folds, corpus_specs
    from serlens.corpus.registry import speaker_groups
    from serlens.methods import configured_methods
    from serlens.paths import Paths
    from serlens.report.tables import prediction_files, write_performance_tables
    from serlens.steps import log_to

    config = _config(args.config)
    for corpus, spec in corpus_specs(config).items():
        tables = Path(Paths(config["results"]).table(corpus, "performance")).parent
        log_to(tables / "tables_by_hand.log")
        files = prediction_files(
            config["results"],
            corpus,
            list(config["models"]),
            list(configured_methods(config)),
            config["seeds"],
            corpus_folds(spec, speaker_groups(spec, config["resources_dir"], corpus)),
        )
        write_performance_tables(
            files,
            spec["classes"],
            Paths(config["results"]).corpus(corpus, "manifest.tsv"),
            tables / "performance.tsv",
            tables / "performance_summary.tsv",
            tables / "significance.tsv",
            significance=config["significance"],
            seed=config["analysis_seed"],
        )
        print(f"{corpus}:\n" + (tables / "performance_summary.tsv").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serlens", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth-corpus", help="write the eSpeak NG corpus in IEMOCAP's layout")
    p.add_argument(
        "--out", default="resources/corpus/synthetic", help="folder to create (replaced if present)"
    )
    p.add_argument("--utterances-per-speaker", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scripted-fraction", type=float, default=0.5, help="share of script lines per speaker"
    )
    p.set_defaults(func=cmd_synth_corpus)

    p = sub.add_parser("manifest", help="read a corpus into manifest.tsv (+ summary.tsv beside it)")
    p.add_argument(
        "root", help="IEMOCAP_full_release folder, synthetic corpus folder, or a user TSV"
    )
    p.add_argument(
        "--kind", choices=["iemocap", "synthetic", "manifest"], help="overrides corpus.kind"
    )
    p.add_argument("--config", help="config YAML for classes/merge (default: built-in defaults)")
    p.add_argument("--out", default="results/synthetic/corpus/manifest.tsv")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser(
        "folds", help="leave-one-session-out folds with a speaker-disjoint dev split"
    )
    p.add_argument("manifest")
    p.add_argument("--config")
    p.add_argument("--dev", choices=["next_session", "previous_session"])
    p.add_argument("--out", default="results/synthetic/corpus/folds.tsv")
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser(
        "weights",
        help="resolve a weight source to a transformers folder (converts bundled:tiny.en once)",
    )
    p.add_argument("source", help="bundled:tiny.en | hf:openai/whisper-<size> | local:/path")
    p.add_argument("--resources", default="resources")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser(
        "tables",
        help="performance tables from the runs that exist (after --keep-going): missing runs are named, not averaged",
    )
    p.add_argument(
        "--config",
        nargs="+",
        help="the config files the workflow ran with, in order (e.g. config/config.yaml config/paper.yaml my.yaml)",
    )
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("transcribe", help="greedy transcript of wav files (checks the weights)")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default="bundled:tiny.en", help="weight source")
    p.add_argument("--resources", default="resources")
    p.set_defaults(func=cmd_transcribe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        args.func(args)
    except SerlensError as exc:
        print(f"serlens: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
