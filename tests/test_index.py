"""The index folder (landmarks.index): exact search, approximate presets vs exact, add/remove, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from landmarks.errors import IncompatibleArtifactError, LandmarksError
from landmarks.index import IndexConfig, LandmarkIndex, auto_nlist, auto_pq_m, mean_topk_similarity

faiss.omp_set_num_threads(1)
MODEL = {"fingerprint": "f" * 40, "name": "unit", "embedding_dim": 32}


def clustered(
    n: int, d: int = 32, n_classes: int = 50, seed: int = 0, spread: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random class centres, and their class ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, n)
    x = centres[labels] + spread * rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def brute(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow exact oracle: full similarity matrix, stable descending sort."""
    sims = xq @ xb.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def build(x: np.ndarray, labels: np.ndarray, **kw: object) -> LandmarkIndex:
    ids = [f"img{i}" for i in range(len(x))]
    return LandmarkIndex.build(
        x,
        ids,
        [f"lm{c}" for c in labels],
        model=MODEL,
        paths=[f"/p/{i}.jpg" for i in ids],
        conf=IndexConfig(**kw),
    )  # type: ignore[arg-type]


def test_exact_search_matches_brute_force() -> None:
    x, labels = clustered(500)
    xq, _ = clustered(40, seed=1)
    idx = build(x, labels)
    D, rows = idx.search(xq, 7)
    Db, Ib = brute(xq, x, 7)
    np.testing.assert_allclose(D, Db, atol=1e-5)
    assert (rows == Ib).mean() > 0.99  # ties aside, the same rows
    np.testing.assert_allclose(np.take_along_axis(xq @ x.T, rows, axis=1), D, atol=1e-5)


def test_k_larger_than_index_pads() -> None:
    x, labels = clustered(3)
    D, rows = build(x, labels).search(x[:2], 5)
    assert (rows[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_presets_recall_vs_exact(kind: str) -> None:
    x, labels = clustered(6000, n_classes=300, spread=0.6)
    xq, _ = clustered(200, n_classes=300, seed=0, spread=0.6)
    xq = xq[::-1].copy()
    _, Ie = build(x, labels).search(xq, 10)
    approx = build(x, labels, type=kind, nlist=64, nprobe=8, pq_m=8)
    Da, Ia = approx.search(xq, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(Ia, Ie)])
    assert recall >= 0.9, recall
    # reported similarities are exact inner products of the returned rows
    np.testing.assert_allclose(Da, np.einsum("qd,qkd->qk", xq, x[Ia]), atol=1e-4)
    assert np.all(np.diff(Da, axis=1) <= 1e-6)


def test_ivfpq_refuses_tiny_index() -> None:
    x, labels = clustered(100)
    with pytest.raises(LandmarksError, match="flat"):
        build(x, labels, type="ivfpq")


def test_auto_parameters() -> None:
    assert auto_nlist(1_000_000) == 1024 and auto_nlist(100) == 2 and auto_nlist(10) == 1
    assert auto_pq_m(512) == 64 and auto_pq_m(100) == 10 and auto_pq_m(7) == 1


def test_mean_topk_similarity_matches_loop() -> None:
    xq, _ = clustered(30, seed=3)
    xb, _ = clustered(20, seed=4)
    got = mean_topk_similarity(xq, xb, 5)
    want = [np.mean(sorted((float(q @ b) for b in xb), reverse=True)[:5]) for q in xq]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert mean_topk_similarity(xq, xb[:2], 5).shape == (30,)  # k capped at the set size
    assert (mean_topk_similarity(xq, xb[:0], 5) == 0).all()


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_add_remove_and_roundtrip(kind: str, tmp_path: Path) -> None:
    x, labels = clustered(3000, n_classes=100, spread=0.5)
    nonlm, _ = clustered(40, seed=9)
    kw = {"nlist": 32, "pq_m": 8, "nprobe": 32} if kind == "ivfpq" else {}
    idx = build(x[:2000], labels[:2000], type=kind, **kw)
    idx.set_non_landmarks(nonlm, [f"n{i}" for i in range(40)])
    # add: new images of known landmarks and a new landmark; no retraining
    new_ids = [f"new{i}" for i in range(1000)]
    lms = [f"lm{c}" for c in labels[2000:]]
    lms[:10] = ["brand-new"] * 10
    assert idx.add(x[2000:], new_ids, lms) == 1000
    with pytest.raises(LandmarksError, match="already in the index"):
        idx.add(x[:1], ["img0"], ["lm0"])
    np.testing.assert_allclose(idx.penalty, mean_topk_similarity(x, nonlm, 5), atol=1e-4)
    D, rows = idx.search(x[2000:2010], 1)
    assert [idx.ids[r] for r in rows[:, 0]] == new_ids[:10] and all(
        idx.landmarks[r] == "brand-new" for r in rows[:, 0]
    )
    # remove: gone from results, rows realigned
    gone = [f"img{i}" for i in range(0, 2000, 3)] + new_ids[:5]
    assert idx.remove(gone) == len(gone)
    with pytest.raises(LandmarksError, match="not in the index"):
        idx.remove(["img0"])
    keep = np.array([i for i in range(3000) if i >= 2005 or (i < 2000 and i % 3)])
    assert len(idx) == len(keep) and idx.faiss_index.ntotal == len(keep)
    D, rows = idx.search(x[keep[:50]], 1)
    assert [idx.ids[r] for r in rows[:, 0]] == [idx.ids[j] for j in range(50)]
    D, rows = idx.search(x[:30:3], 5)
    assert not set(idx.ids[r] for r in rows.ravel()) & set(gone)
    # save / load round trip gives the same answers
    idx.save(tmp_path / "ix")
    loaded = LandmarkIndex.load(tmp_path / "ix", fingerprint=MODEL["fingerprint"])
    assert isinstance(loaded.embeddings, np.memmap)
    assert loaded.ids == idx.ids and loaded.landmarks == idx.landmarks and loaded.paths == idx.paths
    xq, _ = clustered(20, n_classes=100, seed=5, spread=0.5)
    for a, b in zip(loaded.search(xq, 5), idx.search(xq, 5)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(loaded.query_ood(xq), idx.query_ood(xq), atol=1e-6)
    assert loaded.non_landmark_ids == [f"n{i}" for i in range(40)]
    # the loaded index keeps growing and shrinking
    loaded.add(x[:3], ["again0", "again1", "again2"], ["lm0"] * 3)
    loaded.remove(["again1"])
    assert loaded.search(x[:1], 1)[1][0, 0] == loaded.row_of("again0")


def test_float16_storage_and_info(tmp_path: Path) -> None:
    x, labels = clustered(200)
    idx = build(x, labels, dtype="float16")
    idx.save(tmp_path / "ix")
    loaded = LandmarkIndex.load(tmp_path / "ix")
    assert loaded.embeddings.dtype == np.float16
    np.testing.assert_allclose(loaded.embeddings, x, atol=2e-3)
    info = loaded.info()
    assert info.size == 200 and info.landmarks == len(set(labels)) and info.model_fingerprint == "f" * 40
    assert info.type == "flat" and info.dtype == "float16" and info.generation == 1
    assert info.to_dict()["size"] == 200


def test_other_model_is_refused(tmp_path: Path) -> None:
    x, labels = clustered(50)
    build(x, labels).save(tmp_path / "ix")
    with pytest.raises(
        IncompatibleArtifactError,
        match="built with model ffffffffffff .unit.*not with the model given, abcdef",
    ):
        LandmarkIndex.load(tmp_path / "ix", fingerprint="abcdef" * 6, model_name="other")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, labels = clustered(100)
    idx = build(x, labels)
    idx.save(tmp_path / "ix")
    idx.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["data-000002", "meta.json"]
    idx.add(x[:1] * -1, ["neg"], ["lmX"])

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError):
        idx.save(tmp_path / "ix")
    monkeypatch.undo()
    old = LandmarkIndex.load(tmp_path / "ix")
    assert len(old) == 100 and old.row_of("neg") is None
    assert json.loads((tmp_path / "ix" / "meta.json").read_text())["generation"] == "data-000002"
    idx.save(tmp_path / "ix")  # the next save cleans up the half-written folder
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["data-000003", "meta.json"]
    assert len(LandmarkIndex.load(tmp_path / "ix")) == 101


def test_bad_inputs_are_named() -> None:
    x, labels = clustered(10)
    with pytest.raises(LandmarksError, match="duplicate image ids: a"):
        LandmarkIndex.build(x[:2], ["a", "a"], ["l", "l"], model=MODEL)
    with pytest.raises(LandmarksError, match="width"):
        LandmarkIndex.build(x[:, :16], [str(i) for i in range(10)], ["l"] * 10, model=MODEL)
    with pytest.raises(LandmarksError, match="NaN"):
        build(x, labels).search(np.full((1, 32), np.nan, np.float32), 3)
    with pytest.raises(LandmarksError, match="not an index folder"):
        LandmarkIndex.load("/nonexistent/index")


def test_unlabelled_rows(tmp_path: Path) -> None:
    x, _ = clustered(6)
    idx = LandmarkIndex.build(x, list("abcdef"), ["l2", None, "l1", None, "l2", "l1"], model=MODEL)
    codes, names = idx.landmark_codes()
    assert names == ["l1", "l2"] and codes.tolist() == [1, -1, 0, -1, 1, 0] and idx.num_landmarks == 2
    idx.save(tmp_path / "ix")
    loaded = LandmarkIndex.load(tmp_path / "ix")
    assert loaded.landmarks == ["l2", None, "l1", None, "l2", "l1"] and loaded.info().landmarks == 2
    with pytest.raises(LandmarksError, match="whitespace"):
        LandmarkIndex.build(x[:1], ["z"], ["bad id"], model=MODEL)
