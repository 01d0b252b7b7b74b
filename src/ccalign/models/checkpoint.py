"""Checkpoint loading shared by both families: every official layout in, a strict, explained load.

Layouts: a raw (or FSDP full) state dict; {"model"} / {"ema"} / {"module"} / {"state_dict"} as the official
samplers read them; {"trainer": state dict} (CCA's VAR fine-tuning) or {"trainer": {inner: ...}} (VAR's
trainer, ``inner`` = "var_wo_ddp" or "vae_local"). A uniform "module." or "_orig_mod." prefix (DDP,
torch.compile) is removed. Every load is strict and checked finite: a missing, unexpected or misshapen key, or
a NaN/Inf weight, is one error naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from ccalign.io import atomic_save_torch, atomic_write_json, load_torch
from ccalign.presets import Presets

C = TypeVar("C", bound=Presets)

WRAPPER_KEYS = ("model", "ema", "module", "state_dict", "trainer")  # in this order, as the official samplers


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and the keys."""


def unwrap_state_dict(obj: object, source: str | os.PathLike, inner: str | None = None) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint of any official layout."""
    while isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        keys = (inner, *WRAPPER_KEYS) if inner else WRAPPER_KEYS
        key = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise CheckpointError(
                f"{source}: unrecognised checkpoint layout (top-level keys {sorted(map(str, obj))}); "
                f"expected a state dict, or one under {list(WRAPPER_KEYS)}"
            )
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: no state dict found in the checkpoint")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_state_dict_strict(
    module: nn.Module, state_dict: dict[str, Tensor], source: str | os.PathLike, ignore: tuple[str, ...] = ()
) -> None:
    """``load_state_dict(strict=True)``, failing with the file and every missing / unexpected / misshapen
    key, or the first non-finite tensor (:func:`check_finite`). Entries whose name ends with one of ``ignore``
    (caches a checkpoint may carry) are dropped first."""
    sd = {k: v for k, v in state_dict.items() if not (ignore and k.endswith(ignore))}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} in file, {tuple(v.shape)} in model"
        for k, v in own.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source}: checkpoint does not match {type(module).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {shapes}"
        )
    check_finite(sd, source, parameters={name for name, _ in module.named_parameters()})
    module.load_state_dict(sd, strict=True)


def check_finite(
    state_dict: dict[str, Tensor], source: str | os.PathLike, parameters: set[str] | None = None
) -> None:
    """Raise CheckpointError naming ``source`` and the first key holding NaN, or ±Inf in a parameter.

    ``parameters``: the keys that are parameters (default: all). Buffers may hold ±Inf on purpose (VAR's
    block-causal attention bias), never NaN.
    """
    for key, t in state_dict.items():
        if not torch.is_floating_point(t):
            continue
        bad = ~torch.isfinite(t) if parameters is None or key in parameters else torch.isnan(t)
        if bad.any():
            n = int(bad.sum())
            raise CheckpointError(
                f"{source}: tensor {key!r} holds {n} non-finite value{'s' * (n > 1)} (NaN/Inf) of "
                f"{t.numel()}; the checkpoint is damaged or comes from a diverged run"
            )


def args_path(path: str | os.PathLike) -> Path:
    """Where a checkpoint's constructor arguments are kept: ``model.pt`` -> ``model.args.json``."""
    return Path(path).with_suffix(".args.json")


def save_weights(state: dict[str, Any], path: str | os.PathLike, args: dict[str, Any]) -> None:
    """Write ``state`` (an official layout) and, beside it, the constructor ``args`` it was built with."""
    atomic_save_torch(state, path)
    atomic_write_json(args, args_path(path))


def load_weights(
    module: nn.Module, path: str | os.PathLike, inner: str | None = None, ignore: tuple[str, ...] = ()
) -> nn.Module:
    """Strict load of any official layout (weights-only torch.load) into ``module``; returns it."""
    load_state_dict_strict(module, unwrap_state_dict(load_torch(path), path, inner), path, ignore)
    return module


def checkpoint_args(cls: type[C], path: str | os.PathLike, args: dict[str, Any] | None) -> C:
    """The config to build the model of checkpoint ``path`` with: the arguments saved beside it (if any),
    overridden by ``args`` (a config mapping, may name a preset). Released checkpoints carry none."""
    saved_file = args_path(path)
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
    if args is None and saved is None:
        raise CheckpointError(f"{path}: no {saved_file.name} beside it; give the model arguments")
    if saved is None:
        return cls.from_dict(args)
    given = {k: v for k, v in (args or {}).items() if k != "preset"}  # the saved fields are complete
    return cls.from_dict({**saved, **given})
