"""PCA-whitening (landmarks.whiten) against numpy oracles, and whitened indexes end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from landmarks.errors import ConfigError, IncompatibleArtifactError
from landmarks.index import IndexConfig, LandmarkIndex
from landmarks.whiten import (
    WhitenConfig,
    apply_whitening,
    effective_dim,
    learn_whitening,
    load_whitening,
    save_whitening,
)

MODEL = {"fingerprint": "w" * 40, "name": "unit", "embedding_dim": 24}


def anisotropic(n: int, d: int = 24, seed: int = 0) -> np.ndarray:
    """Unit rows with a strong shared direction and very unequal variances (like ImageNet GeM features)."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3.0, 0.05, d)
    x = rng.normal(size=(n, d)) * scales + 4.0 * np.eye(d)[0]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def oracle_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance by explicit loops over rows."""
    x = x.astype(np.float64)
    mean = np.zeros(x.shape[1])
    for row in x:
        mean += row
    mean /= len(x)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for row in x:
        c = row - mean
        cov += np.outer(c, c)
    return mean, cov / len(x)


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_learned_projection_matches_the_eigendecomposition(shrinkage: float) -> None:
    x = anisotropic(300)
    w = learn_whitening(x, dim=10, shrinkage=shrinkage)
    mean, cov = oracle_cov(x)
    lam, vec = np.linalg.eig(cov)  # general solver, not eigh: an independent route
    order = np.argsort(-lam.real)
    lam, vec = lam.real[order], vec.real[:, order]
    np.testing.assert_allclose(w.mean, mean, atol=1e-12)
    np.testing.assert_allclose(w.eigenvalues, lam[:10], rtol=1e-8, atol=1e-12)
    expected = vec[:, :10] / np.sqrt(lam[:10] + shrinkage * lam.mean())
    # columns agree up to sign
    signs = np.sign(np.sum(w.proj * expected, axis=0))
    np.testing.assert_allclose(w.proj, expected * signs, rtol=1e-6, atol=1e-9)
    # the projected training rows have covariance diag(λ / (λ + s·mean λ)): identity without shrinkage
    y = (x.astype(np.float64) - mean) @ w.proj
    np.testing.assert_allclose(
        y.T @ y / len(x), np.diag(lam[:10] / (lam[:10] + shrinkage * lam.mean())), atol=1e-8
    )


def test_apply_centres_projects_and_normalises_like_a_loop() -> None:
    x = anisotropic(200)
    w = learn_whitening(x, dim=8)
    q = anisotropic(7, seed=3)
    out = apply_whitening(q, w)
    assert out.shape == (7, 8) and out.dtype == np.float32
    for i, row in enumerate(q):
        y = (row.astype(np.float64) - w.mean) @ w.proj
        np.testing.assert_allclose(out[i], y / np.linalg.norm(y), atol=1e-6)
    assert apply_whitening(np.zeros((0, 24), np.float32), w).shape == (0, 8)
    with pytest.raises(IncompatibleArtifactError, match="24"):
        apply_whitening(np.zeros((2, 16), np.float32), w)


def test_dim_is_capped_by_the_rank_and_determinism() -> None:
    assert effective_dim(1280, 50, None) == 49 and effective_dim(1280, 5000, None) == 256
    assert effective_dim(24, 5000, 100) == 24
    x = anisotropic(6)
    w = learn_whitening(x)
    assert w.dim == 5 and np.isfinite(w.proj).all()
    w2 = learn_whitening(x.copy())
    assert w.digest() == w2.digest()
    with pytest.raises(ConfigError):
        learn_whitening(x[:1])
    with pytest.raises(ConfigError):
        WhitenConfig(dim=0)


def test_whitening_separates_what_a_shared_direction_hides() -> None:
    """Two classes that differ only in low-variance directions: whitening makes kNN find them."""
    rng = np.random.default_rng(0)
    d, n = 24, 400
    labels = rng.integers(0, 2, n)
    offset = np.zeros(d)
    offset[-1] = 0.08  # the class signal lives in the weakest direction
    x = (
        rng.normal(size=(n, d)) * np.geomspace(3.0, 0.02, d)
        + 4.0 * np.eye(d)[0]
        + np.outer(2 * labels - 1, offset)
    )
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def knn_acc(z: np.ndarray) -> float:
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        return float((labels[np.argmax(s, axis=1)] == labels).mean())

    assert knn_acc(apply_whitening(x, learn_whitening(x, shrinkage=0.0))) > knn_acc(x) + 0.2


def test_file_roundtrip_and_tamper(tmp_path: Path) -> None:
    w = learn_whitening(anisotropic(100), dim=6)
    save_whitening(tmp_path / "w.safetensors", w)
    back = load_whitening(tmp_path / "w.safetensors", expect_sha256=w.digest())
    assert back.digest() == w.digest() and back.n_train == 100
    w.proj[0, 0] += 1e-3
    save_whitening(tmp_path / "w.safetensors", w)
    with pytest.raises(IncompatibleArtifactError, match="do not match"):
        load_whitening(tmp_path / "w.safetensors", expect_sha256=back.digest())


def test_whitened_index_search_add_ood_and_roundtrip(tmp_path: Path) -> None:
    x = anisotropic(120)
    nl = anisotropic(15, seed=9)
    ids = [f"i{j}" for j in range(len(x))]
    idx = LandmarkIndex.build(
        x,
        ids,
        [f"lm{j % 10}" for j in range(len(x))],
        model=MODEL,
        conf=IndexConfig(),
        non_landmarks=nl,
        non_landmark_ids=[f"n{j}" for j in range(15)],
        whiten=WhitenConfig(dim=12, shrinkage=0.2),
    )
    w = idx.whitening
    assert w is not None and idx.d == 12 and idx.model_d == 24 and idx.info().whitening["dim"] == 12
    assert w.n_train == 120 + 15  # learned on the index and the non-landmark images (no labels)
    np.testing.assert_allclose(w.mean, np.concatenate([x, nl]).astype(np.float64).mean(axis=0), atol=1e-9)
    xw, nlw = apply_whitening(x, w), apply_whitening(nl, w)
    np.testing.assert_allclose(np.asarray(idx.embeddings), xw, atol=1e-6)
    # the index-side penalty is computed in the whitened space (loop oracle)
    for j in (0, 57):
        top = np.sort(nlw @ xw[j])[::-1][:5]
        assert idx.penalty[j] == pytest.approx(top.mean(), abs=1e-5)
    q = anisotropic(5, seed=4)
    D, rows = idx.search(idx.project(q), 3)
    sims = apply_whitening(q, w) @ xw.T
    np.testing.assert_array_equal(rows, np.argsort(-sims, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(D, np.take_along_axis(sims, rows, axis=1), atol=1e-5)
    # add projects with the same (frozen) whitening
    extra = anisotropic(3, seed=5)
    idx.add(extra, ["a0", "a1", "a2"], ["lm1"] * 3)
    np.testing.assert_allclose(np.asarray(idx.embeddings)[-3:], apply_whitening(extra, w), atol=1e-6)
    assert idx.whitening is w
    idx.save(tmp_path / "ix")
    back = LandmarkIndex.load(tmp_path / "ix")
    assert back.whitening is not None and back.whitening.digest() == w.digest()
    np.testing.assert_allclose(back.project(q), idx.project(q), atol=0)
    # a replaced whitening file is refused on load
    [data] = [p for p in (tmp_path / "ix").iterdir() if p.name.startswith("data-")]
    other = learn_whitening(anisotropic(50, seed=7), dim=12)
    save_whitening(data / "whitening.safetensors", other)
    with pytest.raises(IncompatibleArtifactError, match="whitening"):
        LandmarkIndex.load(tmp_path / "ix")


def test_whitened_index_with_sift_rerank_end_to_end(tmp_path: Path) -> None:
    """OOD handling and local re-ranking work on a whitened index as on any other (pipeline + Recognizer)."""
    import csv

    from _index_support import TinyEmbedder, pattern, save_jpeg, view
    from _rerank_support import make_queries, make_scenes
    from landmarks.extract import ExtractConfig
    from landmarks.pipeline import build_index, recognize_queries
    from landmarks.recognize import RecognizeConfig

    landmarks = {"arch": 1, "bridge": 2, "castle": 3}
    coll = make_scenes(tmp_path / "coll", landmarks, per_landmark=3)
    for j in range(6):
        save_jpeg(view(pattern(700 + j), j), tmp_path / "nl" / f"n{j}.jpg")
    out = build_index(
        TinyEmbedder(),
        coll,
        tmp_path / "ix",
        non_landmarks=tmp_path / "nl",
        local="sift",
        whiten=WhitenConfig(dim=6),
        extract_conf=ExtractConfig(num_workers=0, batch_size=4),
        local_workers=0,
        show_progress=False,
    )
    assert LandmarkIndex.load(out).d == 6
    truth = make_queries(tmp_path / "q", landmarks)
    stats = recognize_queries(
        out,
        tmp_path / "q",
        tmp_path / "p.csv",
        embedder=TinyEmbedder(),
        num_workers=0,
        conf=RecognizeConfig(rerank="local", rerank_workers=0),
    )
    assert stats.ood_active and stats.rerank == "local"
    with open(tmp_path / "p.csv", newline="") as f:
        got = {row["id"]: row["landmarks"].split()[0] for row in csv.DictReader(f)}
    assert got == truth  # the verified views win
