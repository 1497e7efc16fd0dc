"""Voting and out-of-domain handling (landmarks.recognize) against loop versions, and the Recognizer API."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from _index_support import TinyEmbedder, make_collection, pattern, view
from landmarks.data.collection import load_folder_collection
from landmarks.errors import ConfigError, IncompatibleArtifactError
from landmarks.extract import embed_images
from landmarks.index import LandmarkIndex
from landmarks.recognize import (
    Neighbour,
    RecognizeConfig,
    Recognizer,
    demote,
    neighbour_scores,
    neighbours_row,
    query_confidence,
    vote,
)
from landmarks.rerank import Candidates, Reranked

torch.set_num_threads(1)


# --- pure functions vs loops ------------------------------------------------------------------------


def vote_loop(scores: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[float]]:
    best, conf = [], []
    for s_row, l_row in zip(scores, labels):
        totals: dict[int, float] = defaultdict(float)
        order: list[int] = []
        for s, lab in zip(s_row, l_row):
            if lab < 0 or not np.isfinite(s):
                continue
            if lab not in totals:
                order.append(int(lab))
            totals[int(lab)] += float(s)
        if not order:
            best.append(-1)
            conf.append(-np.inf)
            continue
        top = max(totals.values())
        winner = next(lab for lab in order if totals[lab] == top)  # ties: the nearer neighbour's landmark
        best.append(winner)
        conf.append(totals[winner])
    return best, conf


def test_vote_matches_loop() -> None:
    rng = np.random.default_rng(0)
    for k in (1, 3, 5, 10):
        scores = np.sort(rng.uniform(-0.5, 1, size=(300, k)).astype(np.float32), axis=1)[:, ::-1].copy()
        labels = rng.integers(-1, 4, size=(300, k))
        scores[rng.random((300, k)) < 0.05] = -np.inf
        # exact ties: two landmarks with equal sums
        scores[:20] = 0.5
        best, conf = vote(scores, labels)
        want_best, want_conf = vote_loop(scores, labels)
        assert best.tolist() == want_best
        np.testing.assert_allclose(conf, want_conf, atol=1e-5)


def test_vote_sums_similarities() -> None:
    best, conf = vote(np.array([[0.9, 0.5, 0.45]]), np.array([[1, 2, 2]]))
    assert best.tolist() == [2] and conf[0] == pytest.approx(0.95)


def test_neighbour_scores_and_query_penalty_match_loops() -> None:
    rng = np.random.default_rng(1)
    sims = rng.uniform(-0.3, 1.2, size=(50, 4)).astype(np.float32)
    sims[0, 3] = -np.inf
    pen = rng.uniform(0, 0.6, size=(50, 4)).astype(np.float32)
    got = neighbour_scores(sims, pen)
    for q in range(50):
        for j in range(4):
            want = -np.inf if not np.isfinite(sims[q, j]) else min(max(sims[q, j], 0.0), 1.0) - pen[q, j]
            assert got[q, j] == pytest.approx(want, abs=1e-6)
    np.testing.assert_array_equal(neighbour_scores(sims, None), sims)
    conf = rng.uniform(0, 3, 50).astype(np.float32)
    ood = rng.uniform(0, 1, 50).astype(np.float32)
    np.testing.assert_allclose(
        query_confidence(conf, ood, 0.7), [c - 0.7 * o for c, o in zip(conf, ood)], atol=1e-6
    )
    np.testing.assert_array_equal(query_confidence(conf, None), conf)


def test_demote_matches_loop() -> None:
    rng = np.random.default_rng(2)
    best = rng.integers(-1, 6, 200)
    conf = rng.uniform(0, 2, 200).astype(np.float32)
    for above in (0, 10, 30, 60, 1000):
        counts = {b: int((best == b).sum()) for b in set(best.tolist())}
        want = [c - 0.5 if b >= 0 and counts[b] > above else c for b, c in zip(best, conf)]
        np.testing.assert_allclose(demote(best, conf, above, 0.5), want, atol=1e-6)
    np.testing.assert_array_equal(demote(best, conf, None), conf)


def test_ood_handling_ranks_out_of_domain_queries_last() -> None:
    """GLR-2020: out-of-domain queries look like the index images that look like non-landmarks."""
    rng = np.random.default_rng(3)
    d = 64

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    generic = unit(rng.normal(size=d))  # "people, interiors, products": a region of embedding space
    landmarks = unit(rng.normal(size=(20, d)))
    xb, lab = [], []
    for c in range(20):
        for _ in range(5):  # good photos of the landmark
            xb.append(unit(landmarks[c] + 0.25 * rng.normal(size=d) / np.sqrt(d)))
            lab.append(c)
        if c < 4:  # a few landmarks also hold photos of generic content (interiors, people, ...)
            for _ in range(8):
                xb.append(unit(0.2 * landmarks[c] + generic + 0.3 * rng.normal(size=d) / np.sqrt(d)))
                lab.append(c)
    xb_a = np.stack(xb)
    nonlm = unit(generic + 0.35 * rng.normal(size=(200, d)) / np.sqrt(d))
    q_lm = unit(landmarks[np.arange(40) % 20] + 1.0 * rng.normal(size=(40, d)) / np.sqrt(d))
    q_ood = unit(generic + 0.35 * rng.normal(size=(160, d)) / np.sqrt(d))
    xq = np.concatenate([q_lm, q_ood])
    truth = list(np.arange(40) % 20) + [None] * 160
    model = {"fingerprint": "x" * 40}
    ids = [str(i) for i in range(len(xb_a))]
    idx = LandmarkIndex.build(xb_a, ids, [str(c) for c in lab], model=model, non_landmarks=nonlm)

    def gap(conf: RecognizeConfig) -> float:
        rec = Recognizer(idx, _FakeEmbedder(model["fingerprint"], d), conf)
        out = rec.recognize_embeddings(xq)
        order = np.argsort([-r.confidence for r in out], kind="stable")
        hits, total = 0, 0.0
        for rank, q in enumerate(order, start=1):
            if out[q].landmark is not None and truth[q] is not None and out[q].landmark == str(truth[q]):
                hits += 1
                total += hits / rank
        return total / 40

    plain, handled = gap(RecognizeConfig(ood=False)), gap(RecognizeConfig())
    assert handled > plain + 0.2, (plain, handled)


class _FakeEmbedder:
    def __init__(self, fingerprint: str, d: int):
        self.fingerprint, self.embedding_dim, self.image_size = fingerprint, d, 8

    def describe(self) -> dict[str, str]:
        return {"fingerprint": self.fingerprint, "name": "fake"}


# --- the Recognizer on images ----------------------------------------------------------------------


@pytest.fixture()
def index_dir(tmp_path: Path) -> Path:
    emb = TinyEmbedder()
    root = make_collection(tmp_path / "coll", {"eiffel": 1, "bigben": 2, "colosseum": 3}, per_landmark=4)
    records = load_folder_collection(root)
    from landmarks.extract import ExtractConfig, extract_embeddings

    res = extract_embeddings(
        emb, records, tmp_path / "work", ExtractConfig(batch_size=4, num_workers=0), show_progress=False
    )
    nl = embed_images(emb, [view(pattern(100 + i), i) for i in range(12)])
    idx = LandmarkIndex.build(
        res.embeddings,
        res.ids,
        [str(r.landmark) for r in records],
        paths=[str(r.path) for r in records],
        model=emb.describe(),
        non_landmarks=nl,
    )
    idx.save(tmp_path / "index")
    return tmp_path / "index"


def test_recognizer_on_images(index_dir: Path) -> None:
    rec = Recognizer.load(index_dir, embedder=TinyEmbedder())
    queries = [view(pattern(2), 77), view(pattern(3), 78), view(pattern(555), 79)]
    out = rec.recognize(queries, ids=["q1", "q2", "q3"])
    assert [r.landmark for r in out[:2]] == ["bigben", "colosseum"]
    assert out[0].is_landmark and len(out[0].neighbours) == 3
    nb = out[0].neighbours[0]
    assert isinstance(nb, Neighbour) and nb.landmark == "bigben" and nb.path and nb.inliers is None
    assert nb.score > 0.9 and out[0].confidence > out[2].confidence
    assert set(out[0].timings_ms) >= {"embed", "search", "ood", "vote", "total"}
    row = neighbours_row("q1", "/q1.jpg", out[0])
    assert set(row) == {"id", "path", "landmark", "confidence", "neighbours"}
    assert set(row["neighbours"][0]) == {"id", "landmark", "score", "inliers", "path"}
    # a threshold turns low confidences into "no landmark"
    hi, lo = (0, 1) if out[0].confidence > out[1].confidence else (1, 0)
    thr = (out[0].confidence + out[1].confidence) / 2
    strict = Recognizer.load(index_dir, RecognizeConfig(threshold=thr), embedder=TinyEmbedder())
    out2 = strict.recognize(queries)
    assert out2[hi].is_landmark and not out2[lo].is_landmark and out2[lo].landmark == out[lo].landmark
    info = rec.info()
    assert info.index.size == 12 and info.index.landmarks == 3 and info.ood_active


def test_recognizer_refuses_other_model(index_dir: Path) -> None:
    with pytest.raises(IncompatibleArtifactError, match="tiny-1"):
        Recognizer.load(index_dir, embedder=TinyEmbedder(seed=1))


def test_add_new_landmark_makes_it_recognizable(index_dir: Path, tmp_path: Path) -> None:
    rec = Recognizer.load(index_dir, embedder=TinyEmbedder())
    query = view(pattern(42), 4242)
    before = rec.recognize([query])[0]
    assert before.landmark != "tower"
    root = make_collection(tmp_path / "new", {"tower": 42}, per_landmark=3)
    assert len(rec.add(load_folder_collection(root)).added) == 3
    again_res = rec.add(load_folder_collection(root))
    assert again_res.added == [] and len(again_res.known) == 3  # already there
    assert rec.recognize([query])[0].landmark == "tower"
    again = Recognizer.load(index_dir, embedder=TinyEmbedder())  # saved
    after = again.recognize([query])[0]
    assert after.landmark == "tower" and after.confidence > before.confidence
    assert not (index_dir / "work").exists()


def test_rerank_hook(index_dir: Path) -> None:
    with pytest.raises(ConfigError, match="re-ranker"):
        Recognizer.load(index_dir, RecognizeConfig(rerank="local"), embedder=TinyEmbedder())

    class Eiffel:
        """Scores 1 the candidates of landmark "eiffel", 0 the others; 7 inliers each; retrieval reversed."""

        seen: list[int] = []
        closed = 0

        def rerank(self, queries: object, cands: Candidates) -> Reranked:
            self.seen += [len(ids) for ids in cands.ids]
            lms = [[rec.index.landmarks[rec.index.row_of(i)] for i in ids] for ids in cands.ids]
            scores = np.array([[1.0 if lm == "eiffel" else 0.0 for lm in row] for row in lms], np.float32)
            return Reranked(
                scores, np.full(scores.shape, 7, np.int64), [np.arange(len(ids))[::-1] for ids in cands.ids]
            )

        def close(self) -> None:
            self.closed += 1

    hook = Eiffel()
    rec = Recognizer.load(
        index_dir, RecognizeConfig(rerank_candidates=10, qe_n=0), embedder=TinyEmbedder(), reranker=hook
    )
    xq = rec.embed([view(pattern(2), 5)])
    plain = rec.retrieve(xq, 12)[0]
    out = rec.recognize_embeddings(xq, queries=[view(pattern(2), 5)], retrieval_k=12)[0]
    assert hook.seen == [10] and out.landmark == "eiffel" and out.neighbours[0].inliers == 7
    assert out.neighbours[0].landmark == "eiffel" and out.neighbours[0].score == 1.0
    q_ood = float(rec.index.query_ood(xq, rec.conf.ood_query_k)[0]) if rec.index.has_non_landmarks else 0.0
    assert out.confidence == pytest.approx(3 * 1.0 - q_ood, abs=1e-6)  # k = 3 eiffel candidates score 1 each
    assert out.retrieval == plain[:10][::-1] + plain[10:]
    rec.close()
    assert hook.closed == 1


def test_demotion_over_a_batch(index_dir: Path) -> None:
    queries = [view(pattern(2), 100 + i) for i in range(4)] + [view(pattern(3), 200)]
    plain = Recognizer.load(index_dir, embedder=TinyEmbedder()).recognize(queries)
    rec = Recognizer.load(
        index_dir, RecognizeConfig(demote_above=3, demote_penalty=2.0), embedder=TinyEmbedder()
    )
    out = rec.recognize(queries)
    for a, b in zip(plain[:4], out[:4]):
        assert b.confidence == pytest.approx(a.confidence - 2.0, abs=1e-5)
    assert out[4].confidence == pytest.approx(plain[4].confidence, abs=1e-6)
