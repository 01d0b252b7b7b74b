"""A small CNN classifier trained on a dataset's train split, used as the metric network for small datasets.

Inception features mean little on 8x8 digits; a classifier trained on the domain gives FID on its
penultimate features, IS on its softmax, Precision/Recall on the penultimate features and class accuracy
(how often a sample is classified as its conditioning class), all on CPU in seconds. It is registered with
torch-fidelity as ``ccalign-domain`` so ``torch_fidelity.calculate_metrics`` can use it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ccalign.io import atomic_save_torch, load_torch
from ccalign.log import get_logger
from ccalign.models.checkpoint import load_state_dict_strict

EXTRACTOR = "ccalign-domain"
log = get_logger(__name__)


class DomainClassifier(nn.Module):
    """Conv blocks (two 3x3 conv + ReLU, 2x2 max-pool each) -> 2x2 average pool -> hidden -> classes."""

    def __init__(self, num_classes: int, channels: list[int], hidden: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c_in = c
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(4 * c_in, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> penultimate features (B, hidden)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))  # (B, num_classes)


def to_input(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, *size) in [-1, 1], resized (bilinear, antialiased) if needed."""
    x = images.float() / 127.5 - 1.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x (B, C, H, W) by its own offset in [-shift, shift]^2, edges replicated."""
    if shift == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B, 1), generator=generator)
    rows = (dy + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(B)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def train(
    images: np.ndarray, labels: np.ndarray, num_classes: int, settings: dict
) -> tuple[DomainClassifier, list[float]]:
    """Fit a classifier to images (N, H, W, 3) uint8 and labels (N,); return it (eval mode) and epoch losses.

    settings: channels, hidden, dropout, epochs, batch_size, lr, weight_decay, shift, seed.
    """
    g = torch.Generator().manual_seed(settings["seed"])
    torch.manual_seed(settings["seed"])  # layer init
    model = DomainClassifier(num_classes, list(settings["channels"]), settings["hidden"], settings["dropout"])
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    y_all = torch.from_numpy(labels).long()
    size = tuple(x_all.shape[-2:])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    steps = settings["epochs"] * -(-len(x_all) // settings["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings["lr"], total_steps=steps)
    losses = []
    model.train()
    for epoch in range(settings["epochs"]):
        perm = torch.randperm(len(x_all), generator=g)
        total = 0.0
        for idx in perm.split(settings["batch_size"]):
            x = random_shift(to_input(x_all[idx], size), settings["shift"], g)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x_all))
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, settings["epochs"], losses[-1])
    return model.eval(), losses


@torch.inference_mode()
def predict(model: DomainClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted classes (N,) of images (N, H, W, 3) uint8 at the model's own input size."""
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    size = tuple(x_all.shape[-2:])
    return torch.cat([model(to_input(x, size)).argmax(1) for x in x_all.split(batch_size)]).numpy()


def save(
    model: DomainClassifier,
    path: str | Path,
    *,
    image_size: tuple[int, int],
    classes: list[str],
    settings: dict,
    metrics: dict,
) -> None:
    """Write the classifier (state dict + everything needed to rebuild it) atomically."""
    config = {
        "num_classes": model.head.out_features,
        "channels": list(settings["channels"]),
        "hidden": settings["hidden"],
        "image_size": list(image_size),
    }
    atomic_save_torch(
        {"state_dict": model.state_dict(), "config": config, "classes": classes, "metrics": metrics}, path
    )


def load(path: str | Path) -> tuple[DomainClassifier, dict]:
    """Rebuild a saved classifier (eval mode); also return the saved config."""
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or not {"state_dict", "config"} <= ckpt.keys():
        raise ValueError(f"{path}: not a ccalign domain classifier (needs 'state_dict' and 'config')")
    cfg = ckpt["config"]
    model = DomainClassifier(cfg["num_classes"], cfg["channels"], cfg["hidden"])
    load_state_dict_strict(model, ckpt["state_dict"], path)
    return model.eval(), cfg


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over a saved :class:`DomainClassifier` (weights path required)."""

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{EXTRACTOR} needs feature_extractor_weights_path (a trained classifier)")
        self.model, cfg = load(feature_extractor_weights_path)
        self.image_size = tuple(cfg["image_size"])
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images (B, 3, H, W) uint8 -> the requested features, in ``features_list`` order."""
        h = self.model.features(to_input(images, self.image_size))  # (B, hidden)
        out = {"penultimate": h, "logits": self.model.head(h)}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR, DomainFeatureExtractor)
