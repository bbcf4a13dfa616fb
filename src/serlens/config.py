"""Config validation with messages that name the key, the value and what is allowed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from serlens.errors import ConfigError, CorpusError

# Package data, so a non-editable install finds it; workflow/schemas/ links to it.
SCHEMA = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


def load_schema(path: Path = SCHEMA) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def describe_error(error) -> str:
    """One line per schema violation: the dotted key, the bad value and what the schema allows."""
    key = _key(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        if allowed:
            return f"config key {key}: unknown key(s) {extra}; allowed keys: {allowed}"
    if error.validator == "enum":
        return (
            f"config key {key}: {error.instance!r} is not allowed; allowed values: {schema['enum']}"
        )
    if error.validator == "pattern" and key.startswith("models."):
        return (
            f"config key {key}: weight source {error.instance!r} is not understood; use "
            "'bundled:tiny.en', 'hf:openai/whisper-<size>' or 'local:/path/to/model'"
        )
    return f"config key {key}: {error.message}"


def _fill_defaults(instance: dict, schema: dict) -> None:
    for name, sub in schema.get("properties", {}).items():
        if "default" in sub and name not in instance:
            default = sub["default"]
            instance[name] = json.loads(json.dumps(default))
        if isinstance(instance.get(name), dict) and sub.get("type") == "object":
            _fill_defaults(instance[name], sub)


def _number(value: str, kind: str):
    try:
        return int(value) if kind == "integer" else float(value)
    except ValueError:
        return value


def _coerce_numbers(instance, schema: dict) -> None:
    """Numbers that arrive as strings (Snakemake's ``--config 'seeds=[0,1]'`` or
    ``corpus={synthetic: {scripted_fraction: 0.25}}``) become the numbers the schema asks
    for; anything else is left for the schema to reject with its message."""
    if isinstance(instance, dict):
        for name, sub in schema.get("properties", {}).items():
            value = instance.get(name)
            if isinstance(value, str) and sub.get("type") in ("integer", "number"):
                instance[name] = _number(value, sub["type"])
            elif isinstance(value, (dict, list)):
                _coerce_numbers(value, sub)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        kind = schema["items"].get("type")
        for i, value in enumerate(instance):
            if isinstance(value, str) and kind in ("integer", "number"):
                instance[i] = _number(value, kind)


def default_config() -> dict:
    """Every key at its schema default (no validation; for scripts and benchmarks)."""
    config: dict = {}
    _fill_defaults(config, load_schema())
    return config


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Fill defaults in place, then check the schema and the cross-key rules; ConfigError lists every problem."""
    import jsonschema

    if "seed" in config:
        raise ConfigError(
            "invalid configuration:\n  config key seed: replaced by seeds (the training seeds, a "
            f"list: seeds: [{config['seed']}]) and analysis_seed (the analyses' sampling, CV "
            "splits and bootstrap); rename it"
        )
    schema = schema or load_schema()
    _fill_defaults(config, schema)
    _coerce_numbers(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        describe_error(e)
        for e in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    ]
    if not problems:
        problems = semantic_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def semantic_problems(config: dict) -> list[str]:
    """Rules a JSON schema cannot say: paths that must exist, keys that must agree."""
    problems = []
    from serlens.corpus.registry import speaker_groups

    corpus = config["corpus"]
    groups = None
    try:
        groups = speaker_groups(corpus, config["resources_dir"])
    except (ConfigError, CorpusError) as error:
        problems.append(str(error))
    bad_merge = {k: v for k, v in corpus["merge"].items() if v not in corpus["classes"]}
    if bad_merge:
        problems.append(
            f"config key corpus.merge: target(s) {bad_merge} are not in corpus.classes {corpus['classes']}"
        )
    if groups is not None:
        beyond = [f for f in config["folds"]["run"] if not 1 <= f <= len(groups)]
        if beyond:
            problems.append(
                f"config key folds.run: fold(s) {beyond} do not exist; the corpus has "
                f"{len(groups)} speaker groups {groups}, so allowed values are 1..{len(groups)}"
            )
    unknown = sorted(set(config["model_resources"]) - set(config["models"]) - {"default"})
    if unknown:
        problems.append(
            f"config key model_resources: unknown model key(s) {unknown}; allowed: {sorted(config['models'])} or 'default'"
        )
    return problems


def digest(obj) -> str:
    """A short, stable digest of a JSON-able value (recorded in metrics.json)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cell(value) -> str:
    return f"`{value!r}`" if not isinstance(value, dict) or value else "`{}`"


def readme_table(schema: dict | None = None) -> str:
    """The key table of ``config/README.md``: every schema key, its default and description
    (``make config-readme`` writes it between the README's table markers)."""
    schema = schema or load_schema()
    lines = ["| key | default | what it does |", "| --- | --- | --- |"]

    def walk(node: dict, prefix: str) -> None:
        for name, sub in node.get("properties", {}).items():
            key = f"{prefix}{name}"
            description = " ".join(str(sub.get("description", "")).split())
            if sub.get("type") == "object" and "properties" in sub:
                lines.append(f"| **`{key}`** | | {description} |")
                walk(sub, f"{key}.")
            else:
                lines.append(f"| `{key}` | {_cell(sub.get('default'))} | {description} |")

    walk(schema, "")
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- keys: begin -->", "<!-- keys: end -->"


def write_readme_table(readme: Path) -> None:
    """Replace the table between :data:`README_BEGIN` and :data:`README_END` in ``readme``."""
    text = Path(readme).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} markers around the table")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    Path(readme).write_text(f"{head}{README_BEGIN}\n{readme_table()}\n{README_END}{tail}")
