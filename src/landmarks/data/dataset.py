"""Torch datasets over :class:`~landmarks.data.collection.ImageRecord` lists, and the epoch sampler.

DataLoader workers decode (:func:`landmarks.data.decode.decode_image`) and resize/augment; they ship
``(S, S, 3)`` uint8 arrays and the main process normalises whole batches
(:func:`landmarks.data.transforms.normalize_batch`).

A bad image never stops training: :class:`TrainDataset` substitutes another image of the same
landmark (else any image), deterministically, and reports the bad one in the batch's ``"skipped"``
list; the training loop writes it to ``skipped.csv`` in the run folder (one writer: the main process).

:class:`EpochSampler` makes the order of an epoch a pure function of ``(seed, epoch)``, gives each
sample its own augmentation seed and can start in the middle of an epoch, so a killed run resumes
exactly where it stopped; under DDP each rank takes its slice of every global batch (the role of
``DistributedSampler``, plus mid-epoch resumption).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from landmarks.data.collection import ImageRecord
from landmarks.data.decode import decode_image
from landmarks.data.transforms import TrainTransform, resize_square
from landmarks.errors import ImageDecodeError, LandmarksError

logger = logging.getLogger("landmarks")

#: Substitutes tried for one bad image before giving up.
MAX_SUBSTITUTES = 20


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of ``epoch`` (a 63-bit int)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, position]).generate_state(1, np.uint64)
    return int(state[0]) & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)`` for this rank's share of one epoch.

    The epoch order is ``default_rng([seed, epoch]).permutation(n)`` truncated to whole global batches
    (``drop_last``). Global batch ``b`` (size ``batch_size``) is split into ``world_size`` contiguous
    slices; rank ``r`` takes slice ``r``. ``set_epoch(epoch, start_batch)`` starts at global batch
    ``start_batch`` (for resuming mid-epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise LandmarksError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        if n < batch_size:
            raise LandmarksError(f"{n} training images are fewer than one batch of {batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (drop_last)."""
        return self.n // self.batch_size

    @property
    def local_batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self.batch_size // self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0, stop_batch: int | None = None) -> None:
        """Select the epoch and the global batch range ``[start_batch, stop_batch)`` to yield."""
        self.epoch = epoch
        self.start_batch = start_batch
        self.stop_batch = (
            self.batches_per_epoch if stop_batch is None else min(stop_batch, self.batches_per_epoch)
        )

    def order(self) -> np.ndarray:
        """``(n,)`` int64: the permutation of this epoch."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.order()
        per = self.local_batch_size
        stop = getattr(self, "stop_batch", self.batches_per_epoch)
        for b in range(self.start_batch, stop):
            base = b * self.batch_size + self.rank * per
            for pos in range(base, base + per):
                yield int(perm[pos]), sample_seed(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        stop = getattr(self, "stop_batch", self.batches_per_epoch)
        return max(0, stop - self.start_batch) * self.local_batch_size


class TrainDataset(Dataset[dict[str, Any]]):
    """Training samples: ``dataset[(index, seed)] -> {"image": (S, S, 3) uint8, "label": int, "index": int,
    "skipped": [(path, reason), ...]}``.

    Args:
        records: the training images.
        labels: ``(len(records),)`` class index of each record.
        transform: the augmentation (called with a Generator seeded by ``seed``).
        decode_min_side_px: lets JPEG decoding use DCT scaling down to this shorter side.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        labels: Sequence[int],
        transform: TrainTransform,
        decode_min_side_px: int | None = None,
    ):
        if len(records) != len(labels):
            raise ValueError("records and labels differ in length")
        self.records = list(records)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.decode_min_side_px = decode_min_side_px
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, lab in enumerate(self.labels.tolist()):
            by_label[lab].append(i)
        self._by_label = {k: np.asarray(v) for k, v in by_label.items()}
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> np.ndarray:
        """Decode record ``index`` to ``(H, W, 3)`` uint8. Raises ImageDecodeError."""
        r = self.records[index]
        return decode_image(r.path, name=str(r.path), min_side_px=self.decode_min_side_px)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (key, index_seed(key)) if isinstance(key, int) else (int(key[0]), int(key[1]))
        rng = np.random.default_rng(seed)
        skipped: list[tuple[str, str]] = []
        candidate = index
        for _ in range(MAX_SUBSTITUTES + 1):
            if candidate not in self._bad:
                try:
                    img = self.load(candidate)
                    out = self.transform(img, rng)
                    return {
                        "image": out,
                        "label": int(self.labels[candidate]),
                        "index": candidate,
                        "skipped": skipped,
                    }
                except ImageDecodeError as e:
                    self._bad.add(candidate)
                    skipped.append((str(self.records[candidate].path), e.reason))
            candidate = self._substitute(index, rng)
        raise LandmarksError(
            f"{self.records[index].path}: unreadable, and {MAX_SUBSTITUTES} substitutes "
            f"failed too (last: {skipped[-1][1] if skipped else '?'})"
        )

    def _substitute(self, index: int, rng: np.random.Generator) -> int:
        same = self._by_label[int(self.labels[index])]
        pool = same if len(same) > 1 else np.arange(len(self.records))
        return int(pool[rng.integers(len(pool))])


def index_seed(index: int) -> int:
    """Augmentation seed when a dataset is indexed by a plain int (no sampler)."""
    return sample_seed(0, 0, index)


class EvalDataset(Dataset[dict[str, Any]]):
    """Inference samples: ``dataset[i] -> {"image": (S, S, 3) uint8 squashed, "index": i, "ok": bool,
    "skipped": [(path, reason)]}``; an unreadable image gives ``ok=False`` and a black image."""

    def __init__(self, records: Sequence[ImageRecord], image_size: int):
        self.records = list(records)
        self.size = int(image_size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        try:
            img = decode_image(r.path, name=str(r.path), min_side_px=self.size)
            return {"image": resize_square(img, self.size), "index": i, "ok": True, "skipped": []}
        except ImageDecodeError as e:
            return {
                "image": np.zeros((self.size, self.size, 3), np.uint8),
                "index": i,
                "ok": False,
                "skipped": [(str(r.path), e.reason)],
            }


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: ``image`` -> ``(B, S, S, 3)`` uint8 tensor, ints -> int64 tensors, ``ok`` -> bool
    tensor, ``skipped`` lists concatenated."""
    out: dict[str, Any] = {"image": torch.from_numpy(np.stack([b["image"] for b in batch]))}
    for key in ("label", "index"):
        if key in batch[0]:
            out[key] = torch.tensor([b[key] for b in batch], dtype=torch.int64)
    if "ok" in batch[0]:
        out["ok"] = torch.tensor([b["ok"] for b in batch], dtype=torch.bool)
    out["skipped"] = [s for b in batch for s in b["skipped"]]
    return out
