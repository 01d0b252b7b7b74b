"""Load, override and validate one experiment's config.

The schema is ``workflow/schemas/config.schema.yaml``, the same file the Snakefile validates with, so the CLI
and the workflow accept exactly the same configs. Defaults declared in the schema are filled in.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and what was expected."""


@lru_cache(maxsize=1)
def _schema() -> dict:
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


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate(cfg: dict, source: str = "<config>") -> dict:
    """Fill defaults into ``cfg`` and check it; raise :class:`ConfigError` naming the first bad key."""
    errors = sorted(_Validator(_schema()).iter_errors(cfg), key=lambda e: (len(e.path), list(e.path)))
    if errors:
        e = errors[0]
        if e.validator == "additionalProperties":
            extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            where = _key(e.path)
            raise ConfigError(
                f"{source}: unknown key {', '.join(repr(x) for x in extra)} under {where}; "
                f"allowed: {', '.join(sorted(e.schema.get('properties', {})))}"
            )
        expected = "; ".join(str(x) for x in (e.schema.get("type"), e.schema.get("description")) if x)
        raise ConfigError(
            f"{source}: {_key(e.path)}: {e.message}" + (f" (expected: {expected})" if expected else "")
        )
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` → (["a", "b"], 3); the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, value = item.split("=", 1)
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads "3e-5" as a string; a number is meant
        with contextlib.suppress(ValueError):
            parsed = float(parsed)
    return key.split("."), parsed


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
        node[path[-1]] = value
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """Read a YAML config, apply ``--set`` overrides, validate against the schema and fill defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(cfg).__name__}")
    apply_overrides(cfg, list(overrides))
    return validate(cfg, str(path))


def config_hash(cfg: dict) -> str:
    """Short sha256 of the resolved config (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def entry(cfg: dict, section: str, name: str) -> dict:
    """``cfg[section][name]`` (``section``: "models" or "tokenizers"), or a ConfigError listing the names."""
    entries = cfg.get(section) or {}
    if name not in entries:
        raise ConfigError(f"{section[:-1]} {name!r} is not in the config's {section}: {sorted(entries)}")
    return entries[name]


def model_settings(cfg: dict, model: str, section: str) -> dict:
    """Top-level ``cfg[section]`` defaults overlaid with ``cfg["models"][model][section]``."""
    merged = copy.deepcopy(cfg.get(section) or {})
    merged.update(copy.deepcopy(entry(cfg, "models", model).get(section) or {}))
    return merged
