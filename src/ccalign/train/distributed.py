"""Process group, DDP / FSDP wrapping and full (rank-0) state dicts.

Launched by ``torchrun`` the environment names RANK / WORLD_SIZE / LOCAL_RANK (nanoGPT's detection); a
plain ``python`` run is one process without a process group. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ccalign.device import resolve_device, world


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def init_distributed() -> DistEnv:
    """Join the torchrun process group (if launched by torchrun) and pick this process's device."""
    rank, world_size = world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device()  # this process's GPU (LOCAL_RANK) or the CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over processes (identity without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_gather_objects(obj: object) -> list:
    """Every process's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _blocks(model: nn.Module) -> set[int]:
    """ids of the repeated blocks: every child of an nn.ModuleList (transformer layers in both families)."""
    return {id(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m}


def wrap(module: nn.Module, env: DistEnv, *, fsdp: bool, param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP (default) or FULL_SHARD FSDP with one unit per block, as the official XXL/3B script."""
    if not env.distributed:
        return module
    if not fsdp:
        return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks = _blocks(module)
    mp = MixedPrecision(param_dtype=param_dtype, reduce_dtype=param_dtype) if param_dtype else None
    return FSDP(
        module,
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in blocks),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=mp,
        device_id=env.device,
        sync_module_states=env.device.type == "cuda",  # needs GPU tensors; ranks load the same weights anyway
        limit_all_gathers=True,
        use_orig_params=True,
    )


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(module, FSDP)


def clean_name(name: str) -> str:
    """Parameter name without wrapper prefixes (DDP ``module.``, FSDP, torch.compile)."""
    for prefix in ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


def full_state(wrapped: nn.Module, inner: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, complete on rank 0 (FSDP gathers them; GPU tensors offloaded)."""
    if not is_fsdp(wrapped):
        return inner.state_dict(), optimizer.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # Offloading CPU tensors must stay off: torch gathers every optimizer state (exp_avg, exp_avg_sq) into
    # one reused buffer and, when offloading, keeps `.cpu()` of views into it, which on CPU is the view
    # itself: every state would hold the values of the last one gathered (torch 2.14, _optim_utils).
    offload = wrapped.compute_device.type != "cpu"
    with FSDP.state_dict_type(
        wrapped,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
    ):
        return wrapped.state_dict(), FSDP.optim_state_dict(wrapped, optimizer)


def load_full_state(
    wrapped: nn.Module,
    inner: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict,
    optim_state: dict,
) -> None:
    """Inverse of :func:`full_state`; every rank passes the complete dicts."""
    if not is_fsdp(wrapped):
        inner.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        wrapped,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(rank0_only=False),
        FullOptimStateDictConfig(rank0_only=False),
    ):
        wrapped.load_state_dict(model_state)
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(wrapped, optimizer, optim_state))
