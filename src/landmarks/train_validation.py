"""Validation during training: kNN GAP of held-out images against the training images (rank 0).

:class:`Validator` embeds the validation queries and a subsample of the training images with the
current weights (eval mode, autocast, pinned batches on a GPU), votes with :func:`knn_predict` (exact
search, then recognition's own :func:`landmarks.recognize.vote`) and scores with the challenge metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from landmarks.data.collection import ImageRecord
from landmarks.data.dataset import EvalDataset, collate
from landmarks.data.transforms import normalize_batch
from landmarks.models.net import LandmarkNet
from landmarks.utils import precision
from landmarks.utils.io import SkippedLog
from landmarks.utils.workers import worker_context

logger = logging.getLogger("landmarks")


def knn_predict(
    xq: np.ndarray, xb: np.ndarray, yb: np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """kNN voting by summed cosine similarity: exact search, then recognition's :func:`landmarks.recognize.vote`.

    Args:
        xq: ``(nq, d)`` float32 L2-normalised queries.
        xb: ``(nb, d)`` float32 L2-normalised database.
        yb: ``(nb,)`` int64 database labels.
        k: neighbours (clipped to ``nb``).

    Returns:
        ``(labels (nq,) int64, scores (nq,) float32)``: the label with the largest sum of similarities
        among the ``k`` nearest neighbours (ties: the label of the nearer neighbour) and that sum: the
        confidence recognition reports (without the out-of-domain terms).
    """
    from landmarks.recognize import vote

    k = max(1, min(k, len(xb)))
    labels = np.empty(len(xq), dtype=np.int64)
    scores = np.empty(len(xq), dtype=np.float32)
    tb = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))
    yb = np.asarray(yb, dtype=np.int64)
    for s in range(0, len(xq), chunk):
        sims = torch.from_numpy(np.ascontiguousarray(xq[s : s + chunk], dtype=np.float32)) @ tb.T
        top_s, top_i = sims.topk(k, dim=1)
        labels[s : s + chunk], scores[s : s + chunk] = vote(top_s.numpy(), yb[top_i.numpy()])
    return labels, scores


class Validator:
    """kNN validation of a training run.

    Args:
        val_records: the held-out queries (labelled).
        db_records: the training images of the kNN database.
        class_names: the class map (index -> landmark id).
        image_size: the side S images are squashed to.
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images (0: in this process).
        knn_k: neighbours that vote.
        mean, std: the model's input normalisation (RGB, [0, 1] units).
        device: where the model is; amp_dtype: its autocast dtype (None: fp32).
        skipped_csv: where unreadable images are listed (None: not listed, e.g. on ranks other than 0).
    """

    def __init__(
        self,
        val_records: Sequence[ImageRecord],
        db_records: Sequence[ImageRecord],
        class_names: Sequence[str],
        *,
        image_size: int,
        batch_size: int,
        num_workers: int,
        knn_k: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        amp_dtype: torch.dtype | None,
        skipped_csv: Path | None,
    ):
        self.val_records = list(val_records)
        self.db_records = list(db_records)
        self.class_names = list(class_names)
        self.class_index = {lm: i for i, lm in enumerate(self.class_names)}
        self.image_size = image_size
        self.batch_size = max(1, batch_size)
        self.num_workers = num_workers
        self.knn_k = knn_k
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = device
        self.amp_dtype = amp_dtype
        self.skipped_csv = skipped_csv

    @property
    def num_images(self) -> int:
        """Images one validation embeds (queries + database)."""
        return len(self.val_records) + len(self.db_records)

    def loader(self, records: Sequence[ImageRecord]) -> torch.utils.data.DataLoader:
        """Batches of ``records`` for inference (``EvalDataset``: squashed to S, no augmentation), pinned on a GPU."""
        workers = self.num_workers
        return torch.utils.data.DataLoader(
            EvalDataset(records, self.image_size),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context=worker_context() if workers > 0 else None,
        )

    def _log_skipped(self, skipped: list[tuple[str, str]]) -> None:
        if skipped and self.skipped_csv is not None:
            log = SkippedLog(self.skipped_csv)
            for path, reason in skipped:
                log.add(path, reason)

    @torch.no_grad()
    def embed(
        self, net: LandmarkNet, records: Sequence[ImageRecord], timing: dict[str, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Embed ``records`` with ``net``'s current weights: ``(N, D)`` float32 L2-normalised, ``(N,)`` ok mask,
        and the local head's ``(N,)`` predicted classes (None without a local head).

        ``timing``, when given, receives ``s_per_image`` measured after the first batch (the steady
        rate, without worker start-up)."""
        was_training = net.training
        net.eval()
        embs = np.zeros((len(records), net.embedding_dim), np.float32)
        ok = np.zeros(len(records), bool)
        local_pred = np.zeros(len(records), np.int64) if net.has_local_head else None
        t_first, n_after = 0.0, 0
        try:
            for batch in self.loader(records):
                if t_first:
                    n_after += int(batch["image"].shape[0])
                x = normalize_batch(batch["image"], self.mean, self.std, self.device)
                with precision.autocast(self.device, self.amp_dtype):
                    if net.local is not None:
                        fmap, fmap16 = net.backbone.forward_with_local(x)
                        local_logits = net.local(fmap16)["logits"]
                    else:
                        fmap = net.backbone(x)
                    emb = F.normalize(net.neck(net.pool(fmap)).float(), dim=1)
                idx = batch["index"].numpy()
                self._log_skipped(batch["skipped"])
                embs[idx] = emb.cpu().numpy()
                ok[idx] = batch["ok"].numpy()
                if local_pred is not None:
                    local_pred[idx] = local_logits.argmax(1).cpu().numpy()
                if not t_first:
                    t_first = time.perf_counter()
        finally:
            net.train(was_training)
        if timing is not None and n_after:
            timing["s_per_image"] = (time.perf_counter() - t_first) / n_after
        return embs, ok, local_pred

    def evaluate(self, net: LandmarkNet) -> dict[str, Any]:
        """kNN GAP / top-1 of the validation queries against the training images ({} without queries).

        Also returns ``eval_s``, the wall time it took."""
        from landmarks.metrics import global_average_precision, top1_accuracy

        if not self.val_records:
            return {}
        t = time.perf_counter()
        xq, okq, local_pred = self.embed(net, self.val_records)
        xb, okb, _ = self.embed(net, self.db_records)
        yb = np.array([self.class_index[r.landmark or ""] for r in self.db_records], np.int64)
        q_idx = np.flatnonzero(okq)
        pred, score = knn_predict(xq[q_idx], xb[okb], yb[okb], k=self.knn_k)
        names = self.class_names
        predictions = {self.val_records[i].id: (names[p], float(s)) for i, p, s in zip(q_idx, pred, score)}
        solution = {r.id: [r.landmark or ""] for r in self.val_records}
        out: dict[str, Any] = {
            "val_gap": float(global_average_precision(predictions, solution)),
            "val_top1": float(top1_accuracy(predictions, solution)),
            "val_queries": len(self.val_records),
            "val_db": int(okb.sum()),
        }
        if local_pred is not None:
            yq = np.array([self.class_index[r.landmark or ""] for r in self.val_records], np.int64)
            out["val_local_acc"] = float((local_pred[q_idx] == yq[q_idx]).mean()) if len(q_idx) else 0.0
        out["eval_s"] = round(time.perf_counter() - t, 3)
        return out
