"""Challenge metrics as pure functions: GAP (recognition), mAP@k (GLDv2 retrieval), Revisited mAP.

Nothing here reads or writes files; :mod:`landmarks.submission` parses the Kaggle CSVs and
``landmarks evaluate`` glues the two together. Definitions follow the Google Landmarks challenges
(the ``metrics.py`` shipped with GLDv2) and the Revisited Oxford/Paris protocol (``compute_map`` of
``revisitop``); the tests hold each function against a slow loop written from those definitions.

Conventions
-----------
- Query, landmark and image ids are strings and compare by code point (as Python does).
- ``solution`` maps *every scored query* to its truth: a list of landmark ids (recognition; ``[]`` is a
  non-landmark query) or of index image ids (retrieval). Ignored queries are simply not in it.
- A metric over an empty set (no landmark query for GAP, no query for mAP) is ``nan``, never a crash.
- A prediction for a query that is not in ``solution`` is a :class:`ValueError` (it cannot be scored).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The ranks at which GLDv2 reports mean precision.
PRECISION_RANKS: tuple[int, ...] = (1, 5, 10, 50, 100)

#: Revisited Oxford/Paris protocols: (positive sets, sets treated as junk) built from a ``gnd`` entry.
REVISITED_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


# --------------------------------------------------------------------------------------------------
# Recognition: GAP and top-1
# --------------------------------------------------------------------------------------------------


def _ranked_recognition(
    predictions: Mapping[str, tuple[str, float] | None],
    solution: Mapping[str, Sequence[str]],
    group_of: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank the non-blank predictions the challenge's way and flag each one.

    Returns ``(correct (N,) bool, landmark_query (N,) bool, group (N,) int64)`` in ranking order
    (score descending, then query id ascending): ``correct`` says the predicted landmark is one of the
    query's true landmarks, ``landmark_query`` that the query has at least one true landmark, ``group``
    is ``group_of[query]`` (-1 when absent or without ``group_of``).
    """
    groups: list[int] = []
    qids: list[str] = []
    scores: list[float] = []
    correct: list[bool] = []
    landmark_query: list[bool] = []
    for q, pred in predictions.items():
        truth = solution.get(q)
        if truth is None:
            raise ValueError(f"prediction for query {q!r}, which is not in the solution")
        if pred is None:
            continue
        qids.append(q)
        scores.append(pred[1])
        correct.append(pred[0] in truth)
        landmark_query.append(len(truth) > 0)
        if group_of is not None:
            groups.append(group_of.get(q, -1))
    score_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(score_arr).any():
        bad = qids[int(np.flatnonzero(np.isnan(score_arr))[0])]
        raise ValueError(f"prediction for query {bad!r} has a NaN score")
    # One prediction per query, so the landmark-id tie-break never decides. lexsort: last key is
    # primary; both sorts are stable. Strings compare by code point, as in Python.
    order = np.lexsort((np.asarray(qids, dtype=str), -score_arr)) if qids else np.zeros(0, dtype=np.int64)
    group = (
        np.asarray(groups, dtype=np.int64) if group_of is not None else np.full(len(qids), -1, dtype=np.int64)
    )
    return (
        np.asarray(correct, dtype=bool).reshape(-1)[order],
        np.asarray(landmark_query, dtype=bool).reshape(-1)[order],
        group.reshape(-1)[order],
    )


def _num_landmark_queries(solution: Mapping[str, Sequence[str]]) -> int:
    """M: how many queries have at least one true landmark."""
    return sum(1 for truth in solution.values() if len(truth) > 0)


def _gap_from_ranked(rel: np.ndarray, num_positives: int) -> float:
    """``1/M · Σ_i P(i)·rel(i)`` for ``rel`` (N,) bool in ranking order."""
    if num_positives == 0:
        return math.nan
    cum_correct = np.cumsum(rel, dtype=np.float64)
    rank = np.arange(1, rel.size + 1, dtype=np.float64)
    return float(np.sum(cum_correct[rel] / rank[rel]) / num_positives)


def global_average_precision(
    predictions: Mapping[str, tuple[str, float] | None],
    solution: Mapping[str, Sequence[str]],
    ignore_non_landmarks: bool = False,
) -> float:
    """Global Average Precision (micro-AP) of the Google Landmark Recognition challenges.

    ``GAP = 1/M · Σ_i P(i)·rel(i)`` over all predictions ranked together by score (descending), ties
    broken by query id (ascending) then landmark id (ascending; one prediction per query so this never
    decides). ``M`` is the number of queries in ``solution`` with at least one true landmark.
    A prediction on a non-landmark query is wrong at its rank (it lowers the precision of everything
    ranked after it) unless ``ignore_non_landmarks``, which drops those predictions from the ranking.
    A ``None`` (blank) prediction is left out of the ranking; so is a query with no entry.

    Args:
        predictions: ``{query_id: (landmark_id, score)}`` or ``None`` for no prediction.
        solution: ``{query_id: [landmark_id, ...]}``; ``[]`` marks a non-landmark query.
        ignore_non_landmarks: leave predictions on non-landmark queries out of the ranking.

    Returns:
        GAP in [0, 1]; ``nan`` when no query of ``solution`` has a landmark.

    Raises:
        ValueError: a prediction names a query that is not in ``solution``, or has a NaN score.
    """
    correct, landmark_query, _ = _ranked_recognition(predictions, solution)
    if ignore_non_landmarks:
        correct = correct[landmark_query]
    return _gap_from_ranked(correct, _num_landmark_queries(solution))


def top1_accuracy(
    predictions: Mapping[str, tuple[str, float] | None], solution: Mapping[str, Sequence[str]]
) -> float:
    """Share of landmark queries (non-empty truth) whose predicted landmark is one of the true ones.

    Non-landmark queries are not counted; a landmark query without a prediction counts as wrong.

    Returns:
        Accuracy in [0, 1]; ``nan`` when no query of ``solution`` has a landmark.

    Raises:
        ValueError: a prediction names a query that is not in ``solution``.
    """
    unknown = next((q for q in predictions if q not in solution), None)
    if unknown is not None:
        raise ValueError(f"prediction for query {unknown!r}, which is not in the solution")
    num_positives = 0
    num_correct = 0
    for q, truth in solution.items():
        if len(truth) == 0:
            continue
        num_positives += 1
        pred = predictions.get(q)
        if pred is not None and pred[0] in truth:
            num_correct += 1
    return num_correct / num_positives if num_positives else math.nan


def _recognition_figures(
    correct: np.ndarray, landmark_query: np.ndarray, num_positives: int
) -> dict[str, float]:
    return {
        "gap": _gap_from_ranked(correct, num_positives),
        "gap_ignore_non_landmarks": _gap_from_ranked(correct[landmark_query], num_positives),
        # A landmark query has at most one prediction: top-1 = correct predictions / M.
        "top1_accuracy": float(np.count_nonzero(correct)) / num_positives if num_positives else math.nan,
    }


def recognition_metrics(
    predictions: Mapping[str, tuple[str, float] | None], solution: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """``{"gap", "gap_ignore_non_landmarks", "top1_accuracy"}`` for one set of queries, ranking once.

    Same definitions as :func:`global_average_precision` and :func:`top1_accuracy`.
    """
    correct, landmark_query, _ = _ranked_recognition(predictions, solution)
    return _recognition_figures(correct, landmark_query, _num_landmark_queries(solution))


def recognition_metrics_by_group(
    predictions: Mapping[str, tuple[str, float] | None],
    solution: Mapping[str, Sequence[str]],
    group_of: Mapping[str, str],
) -> dict[str, dict[str, float]]:
    """:func:`recognition_metrics` for all queries (``"all"``) and for each group of queries.

    ``group_of`` maps query ids to a group name (e.g. ``"public"``/``"private"``); each group is scored
    as if ``solution`` and ``predictions`` held only its queries (the ranking is computed once: a
    subset of a ranking keeps its order). Groups appear in order of first appearance in ``group_of``.
    """
    names = list(dict.fromkeys(group_of.values()))
    if "all" in names:
        raise ValueError("a group may not be named 'all' (that key holds every query)")
    code = {name: i for i, name in enumerate(names)}
    group_code = {q: code[g] for q, g in group_of.items()}
    correct, landmark_query, group = _ranked_recognition(predictions, solution, group_code)
    positives = np.zeros(len(names), dtype=np.int64)
    for q, truth in solution.items():
        g = group_code.get(q, -1)
        if g >= 0 and len(truth) > 0:
            positives[g] += 1
    out = {"all": _recognition_figures(correct, landmark_query, _num_landmark_queries(solution))}
    for name, g in code.items():
        mask = group == g
        out[name] = _recognition_figures(correct[mask], landmark_query[mask], int(positives[g]))
    return out


# --------------------------------------------------------------------------------------------------
# Retrieval: mAP@k, mean precision@k, first-correct position (GLDv2 retrieval challenge)
# --------------------------------------------------------------------------------------------------


class _RankedHits:
    """Flattened ranked lists, one row per (query, position) up to a depth, in query-then-rank order.

    Attributes: ``query`` (N,) int64 index into ``query_ids``; ``pos`` (N,) int64 0-based rank;
    ``hit`` (N,) bool (id is relevant); ``rel`` (N,) bool (relevant and the first occurrence of the id
    in its list: a repeated id earns nothing but keeps its rank); ``cum_rel`` (N,) int64 (count of
    ``rel`` up to and including this rank, within the query); ``num_truth`` (Q,) int64 (length of each
    truth list, as given); ``query_ids`` list of the Q solution query ids.
    """

    def __init__(
        self, predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]], depth: int
    ):
        self.query_ids = list(solution.keys())
        qindex = {q: i for i, q in enumerate(self.query_ids)}
        codes: dict[str, int] = {}
        code = codes.setdefault

        pred_q: list[int] = []
        pred_len: list[int] = []
        pred_codes: list[int] = []
        for q, ranked in predictions.items():
            qi = qindex.get(q)
            if qi is None:
                raise ValueError(f"prediction for query {q!r}, which is not in the solution")
            head = list(ranked[:depth])
            pred_q.append(qi)
            pred_len.append(len(head))
            pred_codes.extend(code(x, len(codes)) for x in head)
        truth_len = [len(t) for t in solution.values()]
        truth_codes = [code(x, len(codes)) for t in solution.values() for x in t]
        vocab = max(len(codes), 1)

        lengths = np.asarray(pred_len, dtype=np.int64)
        query = np.repeat(np.asarray(pred_q, dtype=np.int64), lengths)
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(query.size, dtype=np.int64) - np.repeat(starts, lengths)
        pred_key = query * vocab + np.asarray(pred_codes, dtype=np.int64)
        truth_q = np.repeat(np.arange(len(truth_len), dtype=np.int64), np.asarray(truth_len, dtype=np.int64))
        truth_key = truth_q * vocab + np.asarray(truth_codes, dtype=np.int64)

        hit = np.isin(pred_key, truth_key)
        first = np.zeros(query.size, dtype=bool)
        first[np.unique(pred_key, return_index=True)[1]] = True
        rel = hit & first
        cum = np.cumsum(rel, dtype=np.int64)
        before = np.concatenate([[0], cum])[starts]  # cumulative count before each list starts
        self.query, self.pos, self.hit, self.rel = query, pos, hit, rel
        self.cum_rel = cum - np.repeat(before, lengths)
        self.num_truth = np.asarray(truth_len, dtype=np.int64)

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    def average_precisions(self, k: int) -> np.ndarray:
        """``(Q,)`` float64: AP@k of each solution query (0 when it has no prediction or no truth)."""
        m = self.rel & (self.pos < k)
        sums = np.bincount(
            self.query[m], weights=self.cum_rel[m] / (self.pos[m] + 1.0), minlength=self.num_queries
        ).astype(np.float64)  # bincount of nothing is int64
        norm = np.minimum(self.num_truth, k).astype(np.float64)
        return np.divide(sums, norm, out=np.zeros_like(sums), where=norm > 0)

    def precisions(self, k: int) -> np.ndarray:
        """``(Q,)`` float64: precision@k (distinct relevant ids in the first k, over k)."""
        m = self.rel & (self.pos < k)
        return np.bincount(self.query[m], minlength=self.num_queries).astype(np.float64) / k

    def first_positions(self, k: int) -> np.ndarray:
        """``(Q,)`` float64: 1-based rank of the first relevant result within the first k, else k + 1."""
        out = np.full(self.num_queries, k + 1, dtype=np.float64)
        m = self.hit & (self.pos < k)
        # Rows are in query-then-rank order, so the first hit of each query comes first.
        q, first = np.unique(self.query[m], return_index=True)
        out[q] = self.pos[m][first] + 1.0
        return out


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def mean_average_precision(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]], k: int = 100
) -> float:
    """mAP@k of the Google Landmark Retrieval challenges.

    ``AP(q) = 1/min(|gt(q)|, k) · Σ_{i≤k} P(i)·rel(i)``: ``P(i)`` counts distinct relevant ids among
    the first ``i`` results; an id repeated in a list earns nothing the second time but keeps its rank.
    ``|gt(q)|`` is the length of the truth list as given. The mean runs over every query of
    ``solution``: a query without a prediction, or with an empty truth list, scores 0.

    Args:
        predictions: ``{query_id: [index_id, ...]}`` ranked best first (longer lists are cut at k).
        solution: ``{query_id: [index_id, ...]}`` the relevant index images of each query.
        k: rank cut-off (GLDv2: 100).

    Returns:
        mAP@k in [0, 1]; ``nan`` when ``solution`` is empty.

    Raises:
        ValueError: a prediction names a query that is not in ``solution``, or ``k < 1``.
    """
    k = _check_k(k)
    hits = _RankedHits(predictions, solution, k)
    if hits.num_queries == 0:
        return math.nan
    return float(hits.average_precisions(k).mean())


def mean_precisions(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    ks: Sequence[int] = PRECISION_RANKS,
) -> dict[int, float]:
    """Mean precision@k over every query of ``solution`` for each ``k`` in ``ks``.

    precision@k = (distinct relevant ids among the first k results) / k, also when fewer than k
    results were given; a query without a prediction scores 0. ``nan`` values when ``solution`` is empty.
    """
    ks = [_check_k(k, "ks") for k in ks]
    hits = _RankedHits(predictions, solution, max(ks, default=1))
    if hits.num_queries == 0:
        return {k: math.nan for k in ks}
    return {k: float(hits.precisions(k).mean()) for k in ks}


def mean_median_position(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]], k: int = 100
) -> tuple[float, float]:
    """Mean and median 1-based rank of the first relevant result within the first ``k``.

    A query with no relevant result in its first ``k`` (or no prediction) counts as ``k + 1``.
    Returns ``(nan, nan)`` when ``solution`` is empty.
    """
    k = _check_k(k)
    hits = _RankedHits(predictions, solution, k)
    if hits.num_queries == 0:
        return math.nan, math.nan
    positions = hits.first_positions(k)
    return float(positions.mean()), float(np.median(positions))


def retrieval_per_query(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]], k: int = 100
) -> dict[str, tuple[float, int | None]]:
    """Per query of ``solution``: ``(AP@k, first)``, ``first`` the 1-based rank of the first relevant
    result within the first ``k`` (None when there is none).

    Same definitions as :func:`mean_average_precision` (whose value is the mean of these APs) and
    :func:`mean_median_position`.
    """
    k = _check_k(k)
    hits = _RankedHits(predictions, solution, k)
    ap, first = hits.average_precisions(k), hits.first_positions(k)
    return {q: (float(ap[i]), int(first[i]) if first[i] <= k else None) for i, q in enumerate(hits.query_ids)}


def retrieval_metrics(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    k: int = 100,
    precision_ranks: Sequence[int] = PRECISION_RANKS,
) -> dict[str, float]:
    """All GLDv2 retrieval figures in one pass over the ranked lists.

    Keys: ``map@{k}``, ``mean_precision@{r}`` for each ``r`` in ``precision_ranks``, ``mean_position``
    and ``median_position`` (first relevant result within the first ``k``, ``k + 1`` when none).
    Same definitions as :func:`mean_average_precision`, :func:`mean_precisions` and
    :func:`mean_median_position`; ``nan`` everywhere when ``solution`` is empty.
    """
    k = _check_k(k)
    ranks = [_check_k(r, "precision_ranks") for r in precision_ranks]
    hits = _RankedHits(predictions, solution, max([k, *ranks]))
    empty = hits.num_queries == 0
    out: dict[str, float] = {f"map@{k}": math.nan if empty else float(hits.average_precisions(k).mean())}
    for r in ranks:
        out[f"mean_precision@{r}"] = math.nan if empty else float(hits.precisions(r).mean())
    positions = hits.first_positions(k)
    out["mean_position"] = math.nan if empty else float(positions.mean())
    out["median_position"] = math.nan if empty else float(np.median(positions))
    return out


# --------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# --------------------------------------------------------------------------------------------------


def _index_array(gnd_entry: Mapping[str, Any], keys: Sequence[str]) -> np.ndarray:
    parts = [np.asarray(gnd_entry.get(key, []), dtype=np.int64).reshape(-1) for key in keys]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _revisited_query(
    ranked: np.ndarray, positives: np.ndarray, junk: np.ndarray, kappas: Sequence[int]
) -> tuple[float, np.ndarray]:
    """AP (trapezoid rule) and precision@kappas of one query with junk removed from its ranking.

    ``ranked`` (L,) int database indices, best first; ``positives``/``junk`` database indices.
    """
    pos = np.flatnonzero(np.isin(ranked, positives))
    junk_pos = np.flatnonzero(np.isin(ranked, junk))
    # Rank among non-junk results: subtract the junk images ranked strictly before each positive.
    pos = pos - np.searchsorted(junk_pos, pos, side="left")
    j = np.arange(pos.size, dtype=np.float64)
    rank = pos.astype(np.float64)
    # Precision just before (1 at rank 0) and just after each recall step; trapezoid of width 1/n.
    prec_before = np.divide(j, rank, out=np.ones_like(j), where=rank > 0)
    prec_after = (j + 1.0) / (rank + 1.0)
    ap = float(np.sum(prec_before + prec_after) / (2.0 * positives.size))
    prs = np.zeros(len(kappas), dtype=np.float64)
    if pos.size:
        pos1 = pos + 1
        last = int(pos1.max())
        for i, kappa in enumerate(kappas):
            # revisitop's convention: the cut-off stops at the last positive found.
            kq = min(last, int(kappa))
            prs[i] = np.count_nonzero(pos1 <= kq) / kq
    return ap, prs


def revisited_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, Any]]:
    """Revisited Oxford/Paris evaluation (Radenović et al., CVPR 2018): easy, medium and hard.

    Protocols (``gnd`` entries hold database indices under ``"easy"``, ``"hard"``, ``"junk"``):
    easy = positives ``easy``, junk ``junk + hard``; medium = positives ``easy + hard``, junk ``junk``;
    hard = positives ``hard``, junk ``junk + easy``. Junk images are removed from each ranking; AP is the
    trapezoid-rule area under the precision-recall curve; mP@k follows ``revisitop`` (the cut-off is
    ``min(k, rank of the last positive found)``). A query without positives under a protocol is left
    out of that protocol's means.

    Args:
        ranks: ``(n_queries, n_db)`` integer database indices, best first (a truncated ``(n_queries, L)``
            list is accepted: positives not in it earn nothing). Note: ``revisitop`` stores the transpose.
        gnd: one mapping per query, e.g. ``{"easy": [...], "hard": [...], "junk": [...]}``.
        kappas: ranks for the mean precision.

    Returns:
        ``{"easy": {"map": float, "mp@k": [float per kappa]}, "medium": {...}, "hard": {...}}``;
        values are ``nan`` for a protocol where no query has positives.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or (ranks.size and not np.issubdtype(ranks.dtype, np.integer)):
        raise ValueError(
            f"ranks must be a 2-D integer array (n_queries, n_db), got {ranks.dtype} {ranks.shape}"
        )
    if ranks.shape[0] != len(gnd):
        raise ValueError(
            f"ranks has {ranks.shape[0]} rows but gnd has {len(gnd)} queries "
            "(ranks is (n_queries, n_db); revisitop's is the transpose)"
        )
    kappas = [_check_k(kp, "kappas") for kp in kappas]
    out: dict[str, dict[str, Any]] = {}
    for name, (pos_keys, junk_keys) in REVISITED_PROTOCOLS.items():
        aps: list[float] = []
        prs: list[np.ndarray] = []
        for i, entry in enumerate(gnd):
            positives = _index_array(entry, pos_keys)
            if positives.size == 0:
                continue
            ap, pr = _revisited_query(ranks[i], positives, _index_array(entry, junk_keys), kappas)
            aps.append(ap)
            prs.append(pr)
        if aps:
            out[name] = {"map": float(np.mean(aps)), "mp@k": [float(v) for v in np.mean(prs, axis=0)]}
        else:
            out[name] = {"map": math.nan, "mp@k": [math.nan] * len(kappas)}
    return out
