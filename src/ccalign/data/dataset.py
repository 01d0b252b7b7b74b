"""Datasets the training loops read: cached codes (``CodeDataset``) or images tokenized on the fly.

``CodeDataset`` memory-maps the cache shards (opened lazily in each worker process, nothing is copied but
the one view returned) and draws one cached view per image per epoch, uniformly, as LlamaGen's
``CustomDataset`` does (it picks the crop range with probability 1/2, then one of its 10 ten-crop views:
uniform over the 20 views). On opening, each process of a job checks its share of the shards against their
records (sha256, shape, codes inside the vocabulary, labels inside the classes; one streaming read each).
The draw is a function of (seed, epoch, index) only: ``set_epoch`` changes it, the DataLoader's worker count
and the world size do not.

``ImageViewDataset`` is the on-the-fly mode that skips the cache (VAR's official training): each item is one
freshly drawn view of the image; the caller tokenizes the batch with ``Family.encode``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ccalign.data.cache import load_manifest, scan_shard, shard_files
from ccalign.data.folder import list_image_folder
from ccalign.data.views import ViewSpec, random_view, to_model_input
from ccalign.device import world
from ccalign.io import sha256_file


class CodeDataset(Dataset):
    """Items ``(codes (T,) int64, label int64)`` from a code cache, checked with :meth:`verify` unless
    ``verify`` is False."""

    def __init__(
        self, cache_dir: str | os.PathLike, seed: int = 0, epoch: int = 0, verify: bool = True
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = load_manifest(self.cache_dir)
        if verify:
            self.verify(*world())
        counts = [s["count"] for s in self.manifest["shards"]]
        self._starts = np.cumsum([0] + counts)  # image index where each shard starts
        self._codes: list[np.ndarray] | None = None
        self._labels: list[np.ndarray] | None = None
        self.seed = seed
        self.set_epoch(epoch)

    @property
    def manifest_sha256(self) -> str:
        """The identity of the cache: the sha256 of its manifest, which records every shard's hash."""
        return sha256_file(self.cache_dir / "manifest.json")

    # manifest fields the training loop needs
    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def num_views(self) -> int:
        return self.manifest["num_views"]

    def verify(self, rank: int = 0, world_size: int = 1) -> None:
        """Check shards ``rank``, ``rank + world_size``, ... (the processes of a job share the work); raise a
        ValueError naming the first bad shard file and how to repair it."""
        for k, entry in enumerate(self.manifest["shards"]):
            if k % world_size != rank:
                continue
            problems = scan_shard(self.cache_dir, entry, self.manifest)
            if problems:
                record = self.cache_dir / shard_files(entry.get("index", k))["record"]
                raise ValueError(
                    f"code cache shard {self.cache_dir / problems[0]}; delete {record} and run "
                    "`ccalign tokenize` again with the same arguments to re-extract that shard "
                    f"(`ccalign cache-verify --cache {self.cache_dir}` lists every bad shard)"
                )

    def set_epoch(self, epoch: int) -> None:
        """Choose this epoch's view of every image (uniform, from (seed, epoch))."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        # (N,) this epoch's view of every image
        self.view_of = rng.integers(0, self.num_views, size=len(self), dtype=np.int32)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _open(self) -> None:
        shards = self.manifest["shards"]
        self._codes = [np.load(self.cache_dir / s["codes"], mmap_mode="r") for s in shards]
        self._labels = [np.load(self.cache_dir / s["labels"], mmap_mode="r") for s in shards]

    def __getstate__(self) -> dict:  # worker processes re-open the memory maps instead of pickling them
        return {**self.__dict__, "_codes": None, "_labels": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._codes is None:
            self._open()
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[k])
        codes = torch.from_numpy(self._codes[k][j, self.view_of[i]].astype(np.int64))  # (T,)
        return codes, int(self._labels[k][j])


class ImageViewDataset(Dataset):
    """Items ``(image (3, S, S) in [-1, 1], label)``: one view per image drawn from (seed, epoch, index)."""

    def __init__(
        self,
        root: str | os.PathLike,
        views: ViewSpec,
        num_classes: int | None = None,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.folder = list_image_folder(root, num_classes)
        self.views, self.seed, self.epoch = views, seed, epoch
        self.num_classes = len(self.folder.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        view = random_view(self.folder.load(i), self.views, rng)  # (S, S, 3) uint8
        return to_model_input(np.array(view)), self.folder.label(i)
