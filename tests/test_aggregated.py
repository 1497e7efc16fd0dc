"""ASMK over local descriptors (landmarks.aggregated) against a loop written from the paper's definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from landmarks.aggregated import AsmkConfig, AsmkIndex, fuse_scores, train_codebook
from landmarks.errors import ConfigError


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def asmk_loop(
    codebook: np.ndarray, db: list[np.ndarray], q: np.ndarray, ma: int, alpha: float, tau: float
) -> np.ndarray:
    """score(q, i) = Σ_{w ∈ Wq ∩ Wi} idf(w) σ(Vq(w)·Vi(w)) / sqrt(Σ_{Wi} idf · Σ_{Wq} idf) (non-binary ASMK)."""

    def words(x: np.ndarray, m: int) -> list[list[int]]:
        out = []
        for v in x:
            d = [float(np.sum((v - c) ** 2)) for c in codebook]
            out.append(sorted(range(len(codebook)), key=lambda j: d[j])[:m])
        return out

    def aggregate(x: np.ndarray, m: int) -> dict[int, np.ndarray]:
        acc: dict[int, np.ndarray] = {}
        for v, ws in zip(x, words(x, m)):
            for w in ws:
                acc[w] = acc.get(w, np.zeros(x.shape[1])) + (v - codebook[w])
        return {w: a / (np.linalg.norm(a) + 1e-6) for w, a in acc.items()}

    agg = [aggregate(x, 1) for x in db]
    n = len(db)
    df = {w: sum(1 for a in agg if w in a) for w in range(len(codebook))}
    idf = {w: (math.log(n / df[w]) ** 2 if df[w] else 1.0) for w in df}
    qa = aggregate(q, ma)
    qnorm = sum(idf[w] for w in qa)
    out = np.zeros(n)
    for i, a in enumerate(agg):
        s = 0.0
        for w, vq in qa.items():
            if w in a:
                u = float(np.dot(vq, a[w]))
                if u >= tau:
                    s += idf[w] * u**alpha
        norm = sum(idf[w] for w in a)
        out[i] = s / math.sqrt(norm) / math.sqrt(qnorm) if norm > 0 else 0.0
    return out


@pytest.mark.parametrize(("ma", "alpha", "tau"), [(1, 3.0, 0.0), (3, 3.0, 0.0), (2, 1.0, -1.0)])
def test_asmk_matches_loop(ma: int, alpha: float, tau: float) -> None:
    rng = np.random.default_rng(0)
    codebook = _unit(rng.normal(size=(6, 8)))
    db = [_unit(rng.normal(size=(int(rng.integers(15, 40)), 8))) for _ in range(9)]
    conf = AsmkConfig(
        codebook_size=6,
        train_points=100,
        binary=False,
        query_assignment=ma,
        alpha=alpha,
        similarity_threshold=tau,
    )
    index = AsmkIndex.build(codebook, db, conf)
    for qi in range(4):
        q = _unit(rng.normal(size=(25, 8))) if qi else db[3][:20] + 0.01
        np.testing.assert_allclose(
            index.scores(q), asmk_loop(codebook, db, q, ma, alpha, tau), rtol=1e-4, atol=1e-6
        )
    rows, scores = index.search(db[5], topk=3)
    np.testing.assert_array_equal(rows, np.argsort(-index.scores(db[5]), kind="stable")[:3])
    assert scores[0] == pytest.approx(index.scores(db[5]).max())


def test_binary_asmk_finds_the_near_duplicates_and_handles_empty_images() -> None:
    rng = np.random.default_rng(1)
    d = 32
    db = [_unit(rng.normal(size=(60, d))) for _ in range(12)]
    db[7] = np.zeros((0, d), np.float32)  # an image without features never scores
    conf = AsmkConfig(codebook_size=64, train_points=660)
    codebook = train_codebook(np.concatenate(db), conf)
    assert codebook.shape == (64, d)
    index = AsmkIndex.build(codebook, db, conf)
    assert len(index) == 12
    for i in (0, 4, 11):
        q = _unit(db[i][:40] + 0.05 * rng.normal(size=(40, d)))
        rows, _ = index.search(q, 12)
        assert rows[0] == i
        assert index.scores(q)[7] == 0.0
    assert np.all(index.scores(np.zeros((0, d), np.float32)) == 0)


def test_fusion_and_config_checks() -> None:
    g = np.array([[0.9, 0.1, 0.5]])
    a = np.array([[0.0, 1.0, 0.5]])
    np.testing.assert_allclose(fuse_scores(g, a, 0.25), 0.75 * g + 0.25 * a)
    assert np.argmax(fuse_scores(g, a, 0.0)) == 0 and np.argmax(fuse_scores(g, a, 1.0)) == 1
    with pytest.raises(ConfigError):
        fuse_scores(g, a, 1.5)
    with pytest.raises(ConfigError):
        AsmkConfig(codebook_size=1)
    with pytest.raises(ConfigError):
        AsmkConfig(codebook_size=100, train_points=10)
