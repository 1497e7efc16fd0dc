"""A yes/no that means something: the ``is_landmark`` threshold, calibrated on the index's own data.

At index time (``landmarks index``, default on when the index has a non-landmark set), every labelled
index image whose landmark has another image is queried against the rest of the index (leave-one-out,
same kNN voting and out-of-domain penalties as :class:`~landmarks.recognize.Recognizer`), and every
non-landmark image against the index (its own query-side penalty leaves itself out). With

- ``c(t)``: share of the landmark queries recognised correctly with confidence ≥ t,
- ``w(t)``: share of the landmark queries recognised wrongly with confidence ≥ t,
- ``f(t)``: share of the non-landmark queries with confidence ≥ t,
- ``π``: the share of queries expected to show no landmark (``ood_share``),

the precision of a "yes" at threshold t is ``(1 − π) c / ((1 − π)(c + w) + π f)``. The threshold is the
smallest t whose precision reaches the target (``precision``, default 0.9): the most "yes" answers at
that precision. Without a non-landmark set there is nothing to calibrate against, and ``is_landmark``
stays "a landmark was voted". GAP's ranking is not touched: predictions keep their confidences; only
``is_landmark`` (service, API, neighbours JSON) uses the threshold.

:func:`choose_threshold` is pure and tested against a loop; :func:`calibrate_index` gathers the
confidences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from landmarks.errors import ConfigError

#: How the stored threshold was derived (saved with it).
METHOD = (
    "leave-one-out kNN confidences of the index images (landmarks with >= 2 images) vs the "
    "confidences of the non-landmark set"
)


@dataclass
class CalibrationConfig:
    """How ``landmarks index`` calibrates ``is_landmark``."""

    enabled: bool = True  # calibrate when the index has a non-landmark set
    precision: float = 0.9  # target precision of a "yes" (a landmark said to be there is the right one)
    ood_share: float = 0.5  # share of queries expected to show no landmark (the prior behind the precision)
    max_queries: int = 5000  # index images queried at most (a seeded sample beyond)
    seed: int = 0  # seed of that sample

    def __post_init__(self) -> None:
        if not 0.0 < self.precision < 1.0 or not 0.0 < self.ood_share < 1.0:
            raise ConfigError(
                f"calibration precision and ood_share must lie in (0, 1), got {self.precision}, "
                f"{self.ood_share}"
            )
        if self.max_queries < 1:
            raise ConfigError(f"calibration max_queries must be >= 1, got {self.max_queries}")


@dataclass
class ThresholdChoice:
    """The chosen threshold and what it achieves on the calibration data."""

    threshold: float  # "yes" when confidence >= threshold
    reached: bool  # whether the target precision is reached (else: the threshold of the best precision)
    precision: float  # precision of "yes" at the threshold (with the ood_share prior)
    landmark_recall: float  # c(t): share of landmark queries answered "yes" with the right landmark
    landmark_yes: float  # c(t) + w(t): share of landmark queries answered "yes"
    nonlandmark_yes: float  # f(t): share of non-landmark queries answered "yes" (false alarms)


def choose_threshold(
    conf_lm: np.ndarray,
    correct: np.ndarray,
    conf_nl: np.ndarray,
    precision: float = 0.9,
    ood_share: float = 0.5,
) -> ThresholdChoice:
    """The smallest confidence threshold whose "yes" precision reaches ``precision``.

    Args:
        conf_lm: ``(n1,)`` float confidences of landmark queries.
        correct: ``(n1,)`` bool, whether each landmark query's voted landmark is right.
        conf_nl: ``(n2,)`` float confidences of non-landmark queries.
        precision: the target. ood_share: π, the expected share of non-landmark queries.

    Returns:
        :class:`ThresholdChoice`. Candidates are the observed confidences; when none reaches the target,
        the candidate with the best precision (ties: the lowest) and ``reached=False``.
    """
    conf_lm = np.asarray(conf_lm, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    conf_nl = np.asarray(conf_nl, dtype=np.float64)
    if len(conf_lm) == 0 or len(conf_nl) == 0 or len(correct) != len(conf_lm):
        raise ConfigError(
            "calibration needs landmark and non-landmark confidences (and one flag per landmark query)"
        )
    cand = np.unique(np.concatenate([conf_lm, conf_nl]))
    cand = cand[np.isfinite(cand)]
    right = np.sort(conf_lm[correct])
    wrong = np.sort(conf_lm[~correct])
    nl = np.sort(conf_nl)

    def share_at_least(sorted_x: np.ndarray, n: int) -> np.ndarray:
        return (len(sorted_x) - np.searchsorted(sorted_x, cand, side="left")) / n

    c = share_at_least(right, len(conf_lm))
    w = share_at_least(wrong, len(conf_lm))
    f = share_at_least(nl, len(conf_nl))
    num = (1 - ood_share) * c
    den = (1 - ood_share) * (c + w) + ood_share * f
    prec = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    ok = np.flatnonzero((prec >= precision) & (c > 0))
    i = int(ok[0]) if len(ok) else int(np.argmax(prec))
    return ThresholdChoice(
        threshold=float(cand[i]),
        reached=bool(len(ok)),
        precision=float(prec[i]),
        landmark_recall=float(c[i]),
        landmark_yes=float(c[i] + w[i]),
        nonlandmark_yes=float(f[i]),
    )


def _drop_self(sims: np.ndarray, rows: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from ``(n, k + 1)`` results (else the last column); keep ``k`` columns."""
    is_self = rows == own[:, None]
    none = ~is_self.any(axis=1)
    is_self[none, -1] = True
    keep = ~is_self
    return sims[keep].reshape(len(sims), k), rows[keep].reshape(len(rows), k)


def _penalties_without_self(index: Any, nl_index: Any, rows: np.ndarray) -> np.ndarray:
    """``(m, k)`` index-side penalties of the neighbours ``rows`` of non-landmark query ``j`` with ``j`` left
    out of N (mean of the top ``ood_top_k`` similarities to N minus ``{j}``)."""
    top = int(index.conf.ood_top_k)
    m = int(nl_index.ntotal)
    pen = index.penalty[np.maximum(rows, 0)].astype(np.float64)
    uniq = np.unique(rows[rows >= 0])
    if not len(uniq) or m < 2:
        return pen.astype(np.float32)
    kk = min(top + 1, m)
    xr = np.ascontiguousarray(index.embeddings[uniq], dtype=np.float32)
    d, i = nl_index.search(xr, kk)
    pos = {int(r): p for p, r in enumerate(uniq)}
    for j in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            r = int(rows[j, c])
            if r < 0:
                continue
            p = pos[r]
            hit = np.flatnonzero(i[p] == j)
            if len(hit) and hit[0] < min(top, m):  # j is among r's top-k: take the next one instead
                rest = np.delete(d[p], hit[0])[: min(top, m - 1)]
                pen[j, c] = rest.mean()
    return pen.astype(np.float32)


def loo_confidences(
    index: Any,
    k: int = 3,
    ood: bool = True,
    ood_weight: float = 1.0,
    ood_query_k: int = 10,
    max_queries: int = 5000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out confidences of an index's images and the confidences of its non-landmark set.

    Args:
        index: a :class:`~landmarks.index.LandmarkIndex` (its stored, index-space embeddings are the queries).
        k, ood, ood_weight, ood_query_k: the voting settings (:class:`~landmarks.recognize.RecognizeConfig`).
        max_queries: landmark queries at most (seeded sample).

    Returns:
        ``(conf_lm (n1,) float32, correct (n1,) bool, conf_nl (n2,) float32)``: the landmark queries are
        the labelled images whose landmark has >= 2 images; ``conf_nl`` is empty without a non-landmark set.
    """
    import faiss

    from landmarks.recognize import neighbour_scores, query_confidence, vote

    codes, _ = index.landmark_codes()
    counts = np.bincount(codes[codes >= 0], minlength=max(1, int(codes.max(initial=-1)) + 1))
    eligible = np.flatnonzero((codes >= 0) & (counts[np.maximum(codes, 0)] >= 2))
    if len(eligible) > max_queries:
        rng = np.random.default_rng(seed)
        eligible = np.sort(rng.choice(eligible, max_queries, replace=False))
    use_ood = ood and index.has_non_landmarks
    xb = (
        np.asarray(index.embeddings[eligible], dtype=np.float32)
        if len(eligible)
        else np.zeros((0, index.d), np.float32)
    )

    def score(
        sims: np.ndarray, rows: np.ndarray, q_ood: np.ndarray | None, pen: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        labels = np.where(rows >= 0, codes[np.maximum(rows, 0)], -1)
        if pen is None and use_ood:
            pen = index.penalty[np.maximum(rows, 0)]
        best, conf = vote(neighbour_scores(sims, pen if use_ood else None), labels)
        return best, query_confidence(conf, q_ood if use_ood else None, ood_weight)

    conf_lm = np.zeros(0, np.float32)
    correct = np.zeros(0, bool)
    if len(eligible):
        sims, rows = index.search(xb, k + 1)
        sims, rows = _drop_self(sims, rows, eligible, k)
        q_ood = index.query_ood(xb, ood_query_k) if use_ood else None
        best, conf_lm = score(sims, rows, q_ood)
        correct = best == codes[eligible]
    conf_nl = np.zeros(0, np.float32)
    if index.has_non_landmarks:
        xn = np.ascontiguousarray(index.non_landmarks, dtype=np.float32)
        sims, rows = index.search(xn, k)
        q_ood, pen = None, None
        if (
            use_ood
        ):  # leave each non-landmark out of N: in its query-side penalty and its neighbours' penalties
            m = len(xn)
            flat = faiss.IndexFlatIP(xn.shape[1])
            flat.add(xn)
            kk = min(ood_query_k + 1, m)
            d_nl, i_nl = flat.search(xn, kk)
            d_nl, _ = _drop_self(d_nl, i_nl, np.arange(m), kk - 1)
            q_ood = d_nl.mean(axis=1) if kk > 1 else np.zeros(m, np.float32)
            pen = _penalties_without_self(index, flat, rows)
        _, conf_nl = score(sims, rows, q_ood, pen)
    conf_lm = np.where(np.isfinite(conf_lm), conf_lm, -np.inf).astype(np.float32)
    return conf_lm, correct.astype(bool), np.asarray(conf_nl, np.float32)


def calibrate_index(
    index: Any,
    conf: CalibrationConfig | None = None,
    k: int = 3,
    ood: bool = True,
    ood_weight: float = 1.0,
    ood_query_k: int = 10,
) -> dict[str, Any] | None:
    """Calibrate ``is_landmark`` for an index; the JSON entry for its ``meta.json`` (None: cannot).

    The entry: ``{"threshold", "reached", "precision", "landmark_recall", "landmark_yes",
    "nonlandmark_yes", "precision_target", "ood_share", "landmark_queries", "nonlandmark_queries",
    "voting": {"k", "ood", "ood_weight", "ood_query_k"}, "method"}``. None when the index has no
    non-landmark set or no landmark with two images.
    """
    conf = conf or CalibrationConfig()
    if not conf.enabled or not index.has_non_landmarks:
        return None
    conf_lm, correct, conf_nl = loo_confidences(
        index, k, ood, ood_weight, ood_query_k, conf.max_queries, conf.seed
    )
    if not len(conf_lm) or not correct.any():
        return None
    choice = choose_threshold(conf_lm, correct, conf_nl, conf.precision, conf.ood_share)
    return {
        **asdict(choice),
        "precision_target": conf.precision,
        "ood_share": conf.ood_share,
        "landmark_queries": int(len(conf_lm)),
        "nonlandmark_queries": int(len(conf_nl)),
        "voting": {"k": k, "ood": ood, "ood_weight": ood_weight, "ood_query_k": ood_query_k},
        "method": METHOD,
    }


def recalibrate(index: Any) -> None:
    """Redo an index's calibration in place after its images changed (``add``, ``remove``), with the
    targets and voting settings it was made with; nothing when it has none."""
    old = index.meta.pop("calibration", None)
    if not old:
        return
    v = old.get("voting", {})
    entry = calibrate_index(
        index,
        CalibrationConfig(precision=old["precision_target"], ood_share=old["ood_share"]),
        k=int(v.get("k", 3)),
        ood=bool(v.get("ood", True)),
        ood_weight=float(v.get("ood_weight", 1.0)),
        ood_query_k=int(v.get("ood_query_k", 10)),
    )
    if entry is not None:
        index.meta["calibration"] = entry


def voting_matches(entry: dict[str, Any], k: int, ood: bool, ood_weight: float, ood_query_k: int) -> bool:
    """Whether a calibration entry was made with these voting settings (else its threshold does not apply)."""
    v = entry.get("voting") or {}
    return (
        int(v.get("k", -1)) == k
        and bool(v.get("ood")) == ood
        and float(v.get("ood_weight", -1)) == ood_weight
        and int(v.get("ood_query_k", -1)) == ood_query_k
    )
