"""Config validation with messages that name the key, the value and what is allowed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from serlens.errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
IEMOCAP_SESSIONS = 5


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


def default_config() -> dict:
    """Every key at its schema default (no validation; for scripts and benchmarks)."""
    config: dict = {}
    _fill_defaults(config, load_schema())
    return config


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Fill defaults in place, then check the schema and the cross-key rules; ConfigError lists every problem."""
    import jsonschema

    schema = schema or load_schema()
    _fill_defaults(config, schema)
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
    corpus = config["corpus"]
    if corpus["kind"] in ("iemocap", "manifest"):
        root = corpus.get("root")
        if not root:
            problems.append(
                f"config key corpus.root: must be set for corpus.kind {corpus['kind']!r}"
            )
        elif not Path(root).exists():
            what = "an IEMOCAP_full_release folder" if corpus["kind"] == "iemocap" else "a TSV file"
            problems.append(f"config key corpus.root: {root!r} does not exist; point it at {what}")
    bad_merge = {k: v for k, v in corpus["merge"].items() if v not in corpus["classes"]}
    if bad_merge:
        problems.append(
            f"config key corpus.merge: target(s) {bad_merge} are not in corpus.classes {corpus['classes']}"
        )
    if corpus["kind"] != "manifest":
        beyond = [f for f in config["folds"]["run"] if f > IEMOCAP_SESSIONS]
        if beyond:
            problems.append(
                f"config key folds.run: fold(s) {beyond} do not exist; allowed values: 1..{IEMOCAP_SESSIONS}"
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
