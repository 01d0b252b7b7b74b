"""Model families: everything family-specific behind one typed protocol.

A family is one module: ``ccalign/families/<name>.py`` defining ``FAMILY``, an object satisfying
:class:`Family`. Families of other packages register such an object under the ``ccalign.families``
entry-point group (``name = "package.module:FAMILY"``). Nothing outside a family module knows a family by
name.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ccalign.models.sampling import Noise

ENTRY_POINTS = "ccalign.families"


@runtime_checkable
class Family(Protocol):
    """What the stages need of a model family. Models and tokenizers are the family's own ``nn.Module``s."""

    name: str
    guidance_free: float  # the guidance scale that means "no guidance" in the family's convention
    default_sampling: dict[str, Any]  # official sampling options (temperature, top-k, ...)
    default_precision: str  # official sampling precision: fp32 | bf16 | fp16
    casts_weights: bool  # the official sampler casts the weights to it (else: autocast, decoding included)
    default_views: dict[str, Any]  # the official training augmentation (tokenize.views) when none is set
    no_decay_keys: tuple[str, ...]  # parameter-name fragments exempt from weight decay (besides ndim < 2)

    # -- models and tokenizers: build from config arguments (presets allowed), strict load, official save
    def build_model(self, args: dict) -> nn.Module: ...
    def load_model(self, path: str, args: dict) -> nn.Module: ...
    def save_model(self, model: nn.Module, path: str) -> None: ...
    def build_tokenizer(self, args: dict) -> nn.Module: ...
    def load_tokenizer(self, path: str, args: dict) -> nn.Module: ...
    def save_tokenizer(self, tokenizer: nn.Module, path: str) -> None: ...
    def tokenizer_loss(self, tokenizer: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]: ...

    # -- codes: images (B, 3, H, W) in [-1, 1] <-> flat codes (B, T)
    def codebook_size(self, tokenizer: nn.Module) -> int: ...
    def encode(self, tokenizer: nn.Module, images: torch.Tensor) -> torch.Tensor: ...
    def decode(self, tokenizer: nn.Module, codes: torch.Tensor) -> torch.Tensor: ...
    def to_uint8(self, images: torch.Tensor) -> torch.Tensor: ...  # decoded (B,3,H,W) -> (B,H,W,3) uint8

    # -- the model on codes
    def seq_len(self, model: nn.Module) -> int: ...
    def vocab_size(self, model: nn.Module) -> int: ...
    def num_classes(self, model: nn.Module) -> int: ...
    def logits(
        self, model: nn.Module, tokenizer: nn.Module, labels: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor: ...  # teacher forcing: (B, T, V), logits[:, t] predicts codes[:, t]
    # optional, for the fused log-probability of training (align.step.TeacherForcing falls back to logits):
    # def hidden(model, tokenizer, labels, codes) -> (hidden (B, T, C), head weight (V, C), bias (V,) | None)
    # with F.linear(hidden, weight, bias) equal to logits(...)
    def generate(
        self,
        model: nn.Module,
        tokenizer: nn.Module,
        labels: torch.Tensor,
        *,
        guidance: float,
        sampling: dict,
        generator: Noise,
        decode: str = "reference",
    ) -> torch.Tensor: ...  # codes (B, T); decode: the eager reference path or a fast one


def _builtin() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def _registered() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def family_names() -> list[str]:
    """Every family this installation knows (built in, or registered by entry point)."""
    return sorted({*_builtin(), *_registered()})


def family_exists(name: str) -> bool:
    """True when ``name`` is a known family (nothing is imported)."""
    return name in family_names()


def family_module(name: str) -> str:
    """The module that defines family ``name`` (its code is a dependency of every job of the family)."""
    if name in _builtin():
        return f"{__name__}.{name}"
    if name in _registered():
        return _registered()[name].module
    raise ValueError(f"unknown model family {name!r}; known: {family_names()}")


@cache
def get_family(name: str) -> Family:
    """The family named ``name``: ``ccalign.families.<name>.FAMILY`` or a ``ccalign.families`` entry point."""
    if name in _builtin():
        family = importlib.import_module(f"{__name__}.{name}").FAMILY
    elif name in _registered():
        family = _registered()[name].load()
    else:
        raise ValueError(f"unknown model family {name!r}; known: {family_names()}")
    if not isinstance(family, Family) or family.name != name:
        raise TypeError(f"family {name!r} ({family!r}) does not implement ccalign.families.Family")
    return family
