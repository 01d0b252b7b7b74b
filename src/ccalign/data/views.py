"""The augmented views of an image that are tokenized and cached.

One ``ViewSpec`` (from the config) says how the views of every image are made. Modes:

- ``tencrop`` — LlamaGen's ``extract_codes_c2i.py --ten-crop``: for each crop range r, ADM centre crop at
  ``int(image_size * r)`` then torchvision's ten-crop at ``image_size`` (4 corners + centre, then the same 5
  of the mirrored image): 10 views per range, 20 for the official ranges (1.1, 1.05).
- ``center`` — LlamaGen's extraction without ten-crop: ADM centre crop at ``image_size`` and, with ``hflip``,
  its mirror image (2 views).
- ``random`` — VAR's training augmentation (``utils/data.py``): optional horizontal flip (p = 0.5), resize
  of the shorter side to ``round(mid_reso * image_size)`` (Lanczos), random ``image_size`` crop. ``count``
  independent draws are cached per image, each seeded by (seed, image index, draw) so they do not depend on
  sharding; on the fly (``random_view``) every epoch draws a fresh crop.
- ``shifts`` — every integer translation of the image by up to ``pad`` pixels in steps of ``stride``
  (zero padding), ``(2 * pad // stride + 1) ** 2`` views, doubled with ``hflip``. At 8×8 with pad 1 these are
  the nine 1-pixel shifts the embedded experiment needs (ten-crop cannot make them: its crops of a 9×9
  resize are interpolated, not shifted).

Views are uint8 HWC arrays; ``to_model_input`` maps them to (…, 3, H, W) floats in [-1, 1] exactly as
ToTensor + Normalize(0.5, 0.5) (LlamaGen) and ``2x - 1`` (VAR) do — the two agree bit for bit in float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

_MODE_KEYS = {
    "tencrop": {"crop_ranges"},
    "center": {"hflip"},
    "random": {"count", "mid_reso", "hflip", "seed"},
    "shifts": {"pad", "stride", "hflip"},
}


@dataclass(frozen=True)
class ViewSpec:
    mode: str
    image_size: int
    crop_ranges: tuple[float, ...] = (1.1, 1.05)  # tencrop: one ten-crop per range
    hflip: bool = False  # center/shifts: add mirrored views; random: flip with p = 0.5 (VAR --hflip)
    count: int = 1  # random: cached draws per image
    mid_reso: float = 1.125  # random: resize the shorter side to round(mid_reso * image_size) before cropping
    seed: int = 0  # random: seed of the cached draws
    pad: int = 1  # shifts: largest translation in pixels
    stride: int = 1  # shifts: translation step in pixels

    @classmethod
    def from_dict(cls, d: dict, image_size: int | None = None) -> ViewSpec:
        """Build from a config mapping; ``image_size`` is the default when the mapping has none."""
        d = dict(d)
        mode = d.pop("mode", None)
        if mode not in _MODE_KEYS:
            raise ValueError(f"views.mode must be one of {sorted(_MODE_KEYS)}, got {mode!r}")
        size = d.pop("image_size", image_size)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"views.image_size must be a positive integer, got {size!r}")
        unknown = set(d) - _MODE_KEYS[mode]
        if unknown:
            raise ValueError(f"views mode {mode!r} takes {sorted(_MODE_KEYS[mode])}, not {sorted(unknown)}")
        if "crop_ranges" in d:
            d["crop_ranges"] = tuple(float(r) for r in d["crop_ranges"])
        spec = cls(mode=mode, image_size=size, **d)
        if mode == "shifts" and (spec.pad < 0 or spec.stride < 1 or (2 * spec.pad) % spec.stride):
            raise ValueError(f"views: shifts need pad >= 0 and stride dividing 2 * pad, got {spec}")
        if mode == "tencrop" and any(int(size * r) < size for r in spec.crop_ranges):
            raise ValueError(f"views: every crop range must be >= 1, got {spec.crop_ranges}")
        if mode == "random" and spec.count < 1:
            raise ValueError(f"views: random needs count >= 1, got {spec.count}")
        return spec

    def to_dict(self) -> dict:
        """The fields that matter for this mode (what the cache manifest records)."""
        d = asdict(self)
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in d.items()
            if k in ("mode", "image_size") or k in _MODE_KEYS[self.mode]
        }

    @property
    def num_views(self) -> int:
        if self.mode == "tencrop":
            return 10 * len(self.crop_ranges)
        if self.mode == "center":
            return 2 if self.hflip else 1
        if self.mode == "random":
            return self.count
        n = 2 * self.pad // self.stride + 1
        return n * n * (2 if self.hflip else 1)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop as LlamaGen uses it: BOX-halve while large, BICUBIC-resize the short side, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def _random_crop(img: Image.Image, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    import torchvision.transforms.functional as TF  # only the tencrop/random modes need torchvision
    from torchvision.transforms import InterpolationMode

    if spec.hflip and rng.random() < 0.5:
        img = TF.hflip(img)
    img = TF.resize(img, round(spec.mid_reso * spec.image_size), interpolation=InterpolationMode.LANCZOS)
    w, h = img.size
    top, left = int(rng.integers(0, h - spec.image_size + 1)), int(rng.integers(0, w - spec.image_size + 1))
    return np.asarray(img)[top : top + spec.image_size, left : left + spec.image_size]


def make_views(img: Image.Image, spec: ViewSpec, index: int = 0) -> np.ndarray:
    """All views of one RGB image: (num_views, S, S, 3) uint8. ``index`` seeds the ``random`` mode."""
    s = spec.image_size
    if spec.mode == "tencrop":
        import torchvision.transforms.functional as TF

        crops = [c for r in spec.crop_ranges for c in TF.ten_crop(center_crop_arr(img, int(s * r)), s)]
        views = [np.asarray(c) for c in crops]
    elif spec.mode == "center":
        views = [np.asarray(center_crop_arr(img, s))]
        if spec.hflip:
            views.append(views[0][:, ::-1])
    elif spec.mode == "random":
        views = [
            _random_crop(img, spec, np.random.default_rng([spec.seed, index, k])) for k in range(spec.count)
        ]
    else:
        p = spec.pad
        arr = np.pad(np.asarray(center_crop_arr(img, s)), ((p, p), (p, p), (0, 0)))
        offsets = range(0, 2 * p + 1, spec.stride)
        views = [arr[dy : dy + s, dx : dx + s] for dy in offsets for dx in offsets]
        if spec.hflip:
            views += [v[:, ::-1] for v in views]
    return np.stack(views)


def random_view(img: Image.Image, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    """One view drawn on the fly: a fresh random crop in ``random`` mode, else a uniform pick of the views."""
    if spec.mode == "random":
        return _random_crop(img, spec, rng)
    return make_views(img, spec)[rng.integers(spec.num_views)]


def to_model_input(views: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (…, H, W, 3) → float32 (…, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(views).movedim(-1, -3).float().div(255)
    return x.add(x).sub_(1)


def preprocess(pil_image: Image.Image, image_size: int) -> torch.Tensor:
    """LlamaGen's c2i code-extraction transform: centre crop to ``image_size``, then (3, S, S) in [-1, 1].

    ToTensor + Normalize(0.5, 0.5) computes ``(x/255 - 0.5) / 0.5``, equal to :func:`to_model_input`'s
    ``2·x/255 - 1`` bit for bit (scaling by 2 is exact and commutes with rounding).
    """
    crop = center_crop_arr(pil_image.convert("RGB"), image_size)
    return to_model_input(np.array(crop, dtype=np.uint8))
