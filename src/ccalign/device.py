"""Which process of a job this is, and which device it computes on."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's ``RANK`` / ``WORLD_SIZE``, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: this process's GPU (``LOCAL_RANK`` under torchrun, else 0) when CUDA is available, else
    the CPU; any other name (``cpu``, ``cuda``, ``cuda:1``) as given."""
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
