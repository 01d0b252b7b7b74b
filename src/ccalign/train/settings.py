"""Optimisation settings of one pretrain / finetune run, resolved from the config.

Defaults are the official LlamaGen fine-tuning flags (thu-ml/CCA ``LlamaGen_finetune.py``); config/paper.yaml
sets every per-model value of the published runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ccalign.align.losses import check_objective
from ccalign.config import model_settings


@dataclass
class TrainSettings:
    objective: str = "cca"  # cca | dpo | unlearning | mle
    lam: float = 1.0  # λ (CCA / unlearning weight of negatives)
    beta: float = 0.02  # β
    uncond_ratio: float = 0.1  # fraction of pairs sent to the null class (0 = no CFG-compatible training)
    keep_dropout: bool = True  # reference forward in train mode (official --keep_dropout); else eval mode
    class_dropout: float | None = None  # mle: explicit label dropout (None = the model's own)
    dropout: float | None = None  # set p of every nn.Dropout in the model (None = as built)
    model_args: dict = field(default_factory=dict)  # constructor overrides for this stage (dropout rates...)
    lr: float = 1e-5  # peak learning rate
    warmup_steps: int = 0  # linear warm-up from warmup_start·lr to lr
    warmup_start: float = 0.005  # LR ratio at step 0 of warm-up (VAR wp0)
    lr_end: float = 1.0  # LR ratio at the last step (1 = constant; VAR wpe), see optim.lr_factor
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine-scheduled to this value (VAR twde); None = constant
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global norm of the mean micro-batch gradient (0 = off)
    global_batch: int = 256  # images per optimizer step over all processes
    micro_batch: int | None = None  # images per forward per process (None = global / world: no accumulation)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    precision: str = "bf16"  # fp32 | bf16 | fp16 (GradScaler)
    ema: float | None = None  # EMA decay per optimizer step (None = off)
    compile: bool = False
    fsdp: bool = False  # FULL_SHARD FSDP instead of DDP
    log_every: int = 100
    ckpt_every: int = 5000
    seed_offset: int = 0
    num_workers: int = 0  # DataLoader workers
    keep_state: bool = False  # keep the resumable state directory after the final export
    skip_nonfinite: bool = False  # skip steps with a non-finite loss / grad norm instead of stopping
    extra: dict = field(default_factory=dict)  # official flags kept for provenance only

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


def resolve_settings(cfg: dict, model: str, section: str, **run: Any) -> TrainSettings:
    """``cfg[section]`` overlaid with ``cfg["models"][model][section]`` and the run's values (objective, λ).

    ``model_args`` dictionaries merge key by key. Unknown keys are an error.
    """
    top = dict(cfg.get(section) or {})
    merged = model_settings(cfg, model, section)
    merged["model_args"] = {**(top.get("model_args") or {}), **(merged.get("model_args") or {})}
    merged.update(run)
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {unknown}; known: {sorted(names)}")
    return TrainSettings(**merged)
