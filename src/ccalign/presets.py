"""Named presets of model config dataclasses: one convention for every model and tokenizer.

As litgpt's ``Config.from_name``: each config dataclass mixes in :class:`Presets` and lists its published
sizes in ``PRESETS``; a config mapping may name one under ``"preset"`` and override any field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, ClassVar, Self


class Presets:
    """Mixin for config dataclasses: ``from_name``, ``from_dict`` and ``to_dict``."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Self:
        """The preset ``name`` with any field overridden."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, args: Mapping[str, Any]) -> Self:
        """From a config mapping of field names, optionally with ``"preset"``; unknown fields are an error."""
        args = dict(args)
        preset = args.pop("preset", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} arguments {unknown}; known: {sorted(known)}")
        return cls.from_name(preset, **args) if preset else cls(**args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
