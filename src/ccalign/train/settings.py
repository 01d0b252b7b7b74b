"""Optimisation settings of one pretrain / finetune run, resolved from the config.

The schema's defaults are the official LlamaGen fine-tuning flags (thu-ml/CCA ``LlamaGen_finetune.py``);
config/paper.yaml sets every per-model value of the published runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ccalign.align.losses import check_objective
from ccalign.config import defaults


@dataclass
class TrainSettings:
    """One run's settings: ``pretrain`` / ``finetune`` of ``workflow/schemas/config.schema.yaml`` (the home of
    their meaning and defaults) plus the run's objective and λ."""

    objective: str  # cca | dpo | unlearning | mle
    lam: float  # λ (CCA / unlearning weight of negatives)
    beta: float
    uncond_ratio: float
    keep_dropout: bool
    class_dropout: float | None
    dropout: float | None
    model_args: dict
    lr: float
    warmup_steps: int
    warmup_start: float
    lr_end: float
    weight_decay: float
    weight_decay_end: float | None
    betas: tuple[float, float]
    grad_clip: float
    global_batch: int
    micro_batch: int | None
    epochs: float
    max_steps: int | None
    precision: str
    ema: float | None
    compile: bool
    fsdp: bool
    log_every: int
    ckpt_every: int
    seed_offset: int
    num_workers: int
    keep_state: bool
    skip_nonfinite: bool
    extra: dict

    @classmethod
    def create(cls, objective: str = "mle", lam: float = 1.0, **values: Any) -> TrainSettings:
        """Settings from the schema's defaults, overridden by ``values`` (a resolved config section)."""
        merged = {**defaults("train_settings"), **values}
        unknown = sorted(set(merged) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}")
        return cls(objective=objective, lam=lam, **merged)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_objective(self.objective, self.lam, self.beta)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not 0 <= self.uncond_ratio <= 1:
            raise ValueError(f"uncond_ratio must be in [0, 1], got {self.uncond_ratio}")
        if self.global_batch < 1 or (self.micro_batch is not None and self.micro_batch < 1):
            raise ValueError("global_batch and micro_batch must be >= 1")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema}")

    def micro(self, world_size: int) -> int:
        """Images per forward per process."""
        return self.micro_batch or max(1, self.global_batch // world_size)

    def accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step; the global batch must split evenly over processes."""
        per_step = world_size * self.micro(world_size)
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of world_size {world_size} × "
                f"micro_batch {self.micro(world_size)}"
            )
        return self.global_batch // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
