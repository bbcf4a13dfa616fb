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
    if error.validator in ("anyOf", "oneOf"):
        # scalar alternatives (an integer or a keyword) said plainly; others as jsonschema says
        allowed = []
        for branch in schema.get(error.validator, []):
            if "enum" in branch:
                allowed += [repr(v) for v in branch["enum"]]
            elif "const" in branch:
                allowed.append(repr(branch["const"]))
            elif branch.get("type") in ("integer", "number", "string", "boolean", "null"):
                bound = f" >= {branch['minimum']}" if "minimum" in branch else ""
                allowed.append(
                    f"{'an' if branch['type'] == 'integer' else 'a'} {branch['type']}{bound}"
                )
            else:
                allowed = []
                break
        if allowed:
            return (
                f"config key {key}: {error.instance!r} is not allowed; use {' or '.join(allowed)}"
            )
    if error.validator == "pattern" and key.startswith("models."):
        return (
            f"config key {key}: weight source {error.instance!r} is not understood; use "
            "'bundled:tiny.en', 'bundled:base', 'hf:openai/whisper-<size>' or 'local:/path/to/model'"
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


def _resolve(schema: dict, root: dict) -> dict:
    """A sub-schema with its local ``$ref`` (``#/properties/...``) followed."""
    while isinstance(schema, dict) and "$ref" in schema:
        node = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema if isinstance(schema, dict) else {}


def _numeric_branch(schema: dict, root: dict) -> str | None:
    """The number type among a key's ``anyOf``/``oneOf`` alternatives (an integer or a
    keyword, e.g. ``causal_stride``), so ``"4"`` becomes 4 and ``"auto"`` stays a string."""
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        kind = _resolve(branch, root).get("type")
        if kind in ("integer", "number"):
            return kind
    return None


def _coerce_numbers(instance, schema: dict, root: dict | None = None) -> None:
    """Numbers that arrive as strings (Snakemake's ``--config 'seeds=[0,1]'`` or
    ``corpus={synthetic: {scripted_fraction: 0.25}}``) become the numbers the schema asks
    for; anything else is left for the schema to reject with its message."""
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        branch = _resolve(branch, root)
        wanted = branch.get("type")
        if (isinstance(instance, dict) and wanted == "object") or (
            isinstance(instance, list) and wanted == "array"
        ):
            schema = branch
    if isinstance(instance, dict):
        extra = schema.get("additionalProperties")
        for name, value in instance.items():
            sub = _resolve(schema.get("properties", {}).get(name, extra or {}), root)
            if not isinstance(sub, dict):
                continue
            kind = sub.get("type") or _numeric_branch(sub, root)
            if isinstance(value, str) and kind in ("integer", "number"):
                instance[name] = _number(value, kind)
            elif isinstance(value, (dict, list)):
                _coerce_numbers(value, sub, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        kind = _resolve(schema["items"], root).get("type")
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


def corpus_specs(config: dict) -> dict[str, dict]:
    """name -> corpus spec of every corpus in the grid, defaults filled.

    ``corpora`` (name -> spec) when given, else the single ``corpus`` named after
    ``corpus.name`` or its kind. Each spec's ``folds`` is the top-level ``folds`` with the
    corpus's own ``folds`` keys over it; its ``name`` is its key in the grid.
    """
    schema = load_schema()["properties"]
    if config.get("corpora"):
        specs = {name: json.loads(json.dumps(spec)) for name, spec in config["corpora"].items()}
    else:
        corpus = json.loads(json.dumps(config["corpus"]))
        specs = {corpus.get("name") or corpus.get("kind", "synthetic"): corpus}
    out = {}
    for name, spec in specs.items():
        _fill_defaults(spec, schema["corpus"])
        folds = json.loads(json.dumps(config.get("folds") or {}))
        _fill_defaults(folds, schema["folds"])
        spec["folds"] = {**folds, **(spec.get("folds") or {})}
        spec["name"] = name
        # one key order whichever form it came from: a rule's params (rerun triggers) compare
        # equal for the same corpus given as corpus or as an entry of corpora
        out[name] = json.loads(json.dumps(spec, sort_keys=True))
    return out


def corpus_folds(spec: dict, groups: list[str]) -> list[int]:
    """The folds to run of one corpus spec: ``folds.run``, ``all`` = 1..len(groups)."""
    run = spec["folds"]["run"]
    return list(range(1, len(groups) + 1)) if run == "all" else list(run)


def semantic_problems(config: dict) -> list[str]:
    """Rules a JSON schema cannot say: paths that must exist, keys that must agree."""
    problems = []
    from serlens.corpus.registry import speaker_groups

    specs = corpus_specs(config)
    for name, corpus in specs.items():
        key = "corpus" if not config.get("corpora") else f"corpora.{name}"
        groups = None
        try:
            groups = speaker_groups(corpus, config["resources_dir"], name)
        except (ConfigError, CorpusError) as error:
            problems.append(str(error).replace("config key corpus.", f"config key {key}."))
        bad_merge = {k: v for k, v in corpus["merge"].items() if v not in corpus["classes"]}
        if bad_merge:
            problems.append(
                f"config key {key}.merge: target(s) {bad_merge} are not in {key}.classes {corpus['classes']}"
            )
        if groups is not None and corpus["folds"]["run"] != "all":
            beyond = [f for f in corpus["folds"]["run"] if not 1 <= f <= len(groups)]
            if beyond:
                problems.append(
                    f"config key folds.run: fold(s) {beyond} do not exist in corpus {name!r}; it "
                    f"has {len(groups)} speaker groups {groups}, so allowed values are "
                    f"1..{len(groups)} or all"
                )
    from serlens.methods import configured_methods

    try:
        configured_methods(config)
    except ConfigError as error:
        problems.append(f"config key {error}")
    for pair in config.get("cross_corpus") or []:
        unknown = [c for c in pair if c not in specs]
        if unknown:
            problems.append(
                f"config key cross_corpus: {pair} names corpora {unknown} that are not in the "
                f"grid; allowed: {sorted(specs)}"
            )
        elif pair[0] == pair[1]:
            problems.append(f"config key cross_corpus: {pair} trains and tests on one corpus")
        else:
            shared = [c for c in specs[pair[0]]["classes"] if c in specs[pair[1]]["classes"]]
            if len(shared) < 2:
                problems.append(
                    f"config key cross_corpus: {pair} share the classes {shared}; a cross-corpus "
                    "test needs at least two"
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
