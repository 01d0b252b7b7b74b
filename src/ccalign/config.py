"""Load, override, validate and resolve one experiment's config.

A config is one or more YAML files, merged in order as Snakemake merges ``--configfile``s, then ``--set
key=value`` overrides. The schema ``workflow/schemas/config.schema.yaml`` (the Snakefile validates with the
same code) is the only home of defaults. *Resolving* gives every model complete ``pretrain``, ``finetune``
and ``sample`` sections — the top-level section overlaid with the model's own, then the schema's defaults —
so the code reads one finished mapping and never merges or defaults anything itself.

Every error is one :class:`ConfigError` line naming the file (or the ``--set`` argument) and the key.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
MODEL_SECTIONS = ("pretrain", "finetune", "sample")  # top-level defaults that each model may override


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or --set argument, and the key."""


# -- reading ------------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """One config file as a mapping; a syntax error or duplicate key names ``file:line:column``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def merge(base: dict, update: dict) -> dict:
    """``base`` deep-updated with ``update`` (mappings merge key by key, anything else replaces); new dict."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_value(text: str) -> Any:
    """A value as YAML (numbers, lists, mappings, null); ``3e-5`` is a number (YAML 1.1 reads a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"not a valid YAML value: {getattr(e, 'problem', None) or e}") from None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` → (["a", "b"], 3); the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"--set {item!r}: expected key=value")
    if not key or "" in key.split("."):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        return key.split("."), parse_value(text)
    except ValueError as e:
        raise ConfigError(f"--set {item!r}: {e}") from None


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Set each ``key=value`` in ``cfg`` (in place), creating mappings on the way."""
    for item in overrides:
        path, value = parse_override(item)
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
        node[path[-1]] = value
    return cfg


# -- validation ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(cls):
    """A validator class that also writes schema defaults into the instance (as Snakemake's validate)."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


_Checker = jsonschema.Draft202012Validator
_Filler = _with_defaults(jsonschema.Draft202012Validator)


def defaults(definition: str) -> dict:
    """The schema defaults of ``$defs/<definition>`` (e.g. the resources every job gets)."""
    props = schema()["$defs"][definition]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


def _dotted(path: Sequence) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line for a schema violation: the key and what was expected, never the schema itself."""
    key = _dotted(error.path)
    sub = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(sub.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"unknown key {', '.join(repr(x) for x in extra)} under {key}" + (
            f"; allowed: {', '.join(allowed)}" if allowed else ""
        )
    if error.validator == "required":
        return f"{key}: {error.message}"
    what = sub.get("description")
    value = json.dumps(error.instance, default=str)
    if len(value) > 60:
        value = value[:57] + "..."
    message = error.message if len(error.message) <= 120 else f"{value} is not valid"
    return f"{key}: {message}" + (f" (expected: {what})" if what else "")


def _first_error(validator_cls, cfg: dict) -> jsonschema.ValidationError | None:
    errors = validator_cls(schema()).iter_errors(cfg)
    return min(errors, key=lambda e: (len(e.path), list(map(str, e.path))), default=None)


def _check_references(cfg: dict) -> str | None:
    """Cross-references the schema cannot express; the message names the key."""
    from ccalign.families import family_exists

    for section in ("tokenizers", "models"):
        for name, entry_ in cfg[section].items():
            if not family_exists(entry_["family"]):
                return f"{section}.{name}.family: unknown model family {entry_['family']!r}"
    tokenizers, models = cfg["tokenizers"], cfg["models"]
    for target, t in cfg["targets"].items():
        for i, s in enumerate(t["sets"]):
            if stray := sorted(set(s.get("models", [])) - set(t.get("models", models))):
                return f"targets.{target}.sets.{i}.models: {stray} are not models of the target"
        for model in t.get("models", models):
            if model not in models:
                return (
                    f"targets.{target}.models: {model!r} is not one of the config's models {sorted(models)}"
                )
            m = models[model]
            for i, s in enumerate(t["sets"]):
                if model not in s.get("models", [model]):
                    continue
                named = s["variant"] if isinstance(s["variant"], str) else "base"
                if named != "base" and named not in (m.get("variants") or {}):
                    return f"targets.{target}.sets.{i}.variant: model {model!r} has no variant {named!r}"
                if "cfg" in s["guidance"] and "cfg_scale" not in m:
                    return f"targets.{target}.sets.{i}.guidance: 'cfg' but models.{model} has no cfg_scale"
    used = {m for t in cfg["targets"].values() for m in t.get("models", models)}
    if idle := sorted(set(models) - used):
        return f"models {idle}: no target uses them (add them to a target's models, or remove them)"
    for name, m in models.items():
        for i, row in enumerate(m.get("paper") or []):
            if row["variant"] != "base" and row["variant"] not in (m.get("variants") or {}):
                return f"models.{name}.paper.{i}.variant: {row['variant']!r} is not a variant of the model"
    for name, m in models.items():
        tok = m["tokenizer"]
        if tok not in tokenizers:
            return (
                f"models.{name}.tokenizer: {tok!r} is not one of the config's tokenizers {sorted(tokenizers)}"
            )
        if tokenizers[tok]["family"] != m["family"]:
            return (
                f"models.{name}.tokenizer: {tok!r} is a {tokenizers[tok]['family']} tokenizer, "
                f"the model is {m['family']}"
            )
    return None


def resolve(raw: dict, source: str = "<config>", overrides: Sequence[str] = ()) -> dict:
    """Validate ``raw`` and return it resolved: every model's sections complete, every default filled.

    ``source`` names the file(s) in error messages; an error on a key that an item of ``overrides`` set is
    attributed to that ``--set`` argument instead.
    """
    cfg = copy.deepcopy(raw)
    error = _first_error(_Checker, cfg)
    if error is not None:
        raise ConfigError(f"{_blame(error.path, source, overrides)}: {_describe(error)}")
    for model in cfg["models"].values():
        for section in MODEL_SECTIONS:
            model[section] = merge(cfg.get(section) or {}, model.get(section) or {})
    error = _first_error(_Filler, cfg)  # fills defaults; resolving cannot make a valid config invalid
    if error is not None:
        raise ConfigError(f"{_blame(error.path, source, overrides)}: {_describe(error)}")
    problem = _check_references(cfg)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return cfg


def _blame(path: Sequence, source: str, overrides: Sequence[str]) -> str:
    """The ``--set`` argument that set ``path`` (or a mapping above or below it), else ``source``."""
    target = [str(p) for p in path]
    for item in reversed(overrides):
        key = item.partition("=")[0].split(".")
        n = min(len(key), len(target))
        if key[:n] == target[:n]:
            return f"--set {item!r}"
    return source


def load_config(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> dict:
    """Read one or more YAML configs (merged in order), apply ``--set`` overrides, validate and resolve."""
    files = [paths] if isinstance(paths, str | Path) else list(paths)
    if not files:
        raise ConfigError("no config file given")
    raw: dict = {}
    for f in files:
        raw = merge(raw, read_yaml(f))
    apply_overrides(raw, overrides)
    return resolve(raw, " + ".join(str(f) for f in files), overrides)


# -- lookups ------------------------------------------------------------------------------------------------
def config_hash(cfg: dict) -> str:
    """Short sha256 of a config (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def entry(cfg: dict, section: str, name: str) -> dict:
    """``cfg[section][name]`` (``section``: "models" or "tokenizers"), or a ConfigError listing the names."""
    entries = cfg.get(section) or {}
    if name not in entries:
        raise ConfigError(f"{section[:-1]} {name!r} is not in the config's {section}: {sorted(entries)}")
    return entries[name]


def lookup(cfg: dict, dotted: str) -> Any:
    """The value at ``"a.b.c"`` (None where a key is missing)."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
