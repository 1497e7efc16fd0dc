"""αQE and DBA (landmarks.expansion) against loops over an explicit similarity matrix; DBA in the index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from landmarks.errors import ConfigError
from landmarks.expansion import (
    ExpansionConfig,
    apply_dba,
    database_side_augmentation,
    exact_search,
    query_expansion,
)
from landmarks.index import IndexConfig, LandmarkIndex


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 8), d))
    return _unit(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, d)))


def expand_loop(x: np.ndarray, xb: np.ndarray, n: int, alpha: float, exclude: int | None) -> np.ndarray:
    """The definition, one vector at a time: x + Σ max(s, 0)^α x_i over the n most similar rows."""
    sims = [(float(np.dot(x, xb[j])), j) for j in range(len(xb)) if j != exclude]
    sims.sort(key=lambda t: -t[0])
    acc = x.astype(np.float64).copy()
    for s, j in sims[:n]:
        acc += (max(s, 0.0) ** alpha if alpha > 0 else 1.0) * xb[j]
    return acc / np.linalg.norm(acc)


@pytest.mark.parametrize(("n", "alpha"), [(1, 3.0), (3, 0.0), (5, 3.0), (10, 1.5)])
def test_query_expansion_matches_loop(n: int, alpha: float) -> None:
    xb = _data(200)
    xq = _data(30, seed=1)
    got = query_expansion(xq, xb, exact_search(xb), ExpansionConfig(n=n, alpha=alpha))
    want = np.stack([expand_loop(q, xb, n, alpha, None) for q in xq])
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("n", "alpha", "chunk"), [(1, 3.0, 7), (4, 0.0, 50), (6, 3.0, 1000), (2, 2.0, 1)])
def test_dba_matches_loop_in_any_chunking(n: int, alpha: float, chunk: int) -> None:
    xb = _data(120)
    got = database_side_augmentation(xb, ExpansionConfig(n=n, alpha=alpha), chunk=chunk)
    want = np.stack([expand_loop(x, xb, n, alpha, i) for i, x in enumerate(xb)])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_off_and_edge_cases() -> None:
    xb = _data(10)
    np.testing.assert_array_equal(database_side_augmentation(xb, ExpansionConfig(n=0)), xb)
    np.testing.assert_array_equal(query_expansion(xb, xb, exact_search(xb), ExpansionConfig(n=0)), xb)
    # more neighbours than rows: every other row is used once, nothing else
    got = database_side_augmentation(xb[:3], ExpansionConfig(n=10, alpha=0.0))
    want = np.stack([expand_loop(x, xb[:3], 10, 0.0, i) for i, x in enumerate(xb[:3])])
    np.testing.assert_allclose(got, want, atol=2e-5)
    # negative similarities weigh nothing (alpha > 0) instead of flipping the sum
    pair = _unit(np.array([[1.0, 0.1], [-1.0, 0.1]]))
    np.testing.assert_allclose(
        database_side_augmentation(pair, ExpansionConfig(n=1, alpha=3.0)), pair, atol=1e-6
    )
    for bad in ({"n": -1}, {"n": 1.5}, {"alpha": -1.0}, {"alpha": float("nan")}):
        with pytest.raises(ConfigError):
            ExpansionConfig(**bad)  # type: ignore[arg-type]


def _index(xb: np.ndarray, type_: str = "flat") -> LandmarkIndex:
    ids = [f"i{j:04d}" for j in range(len(xb))]
    return LandmarkIndex.build(
        xb,
        ids,
        [f"L{j % 7}" for j in range(len(xb))],
        model={"fingerprint": "f" * 40},
        conf=IndexConfig(type=type_),
    )  # type: ignore[arg-type]


def test_index_dba_save_load_add_remove(tmp_path: Path) -> None:
    xb = _data(150)
    conf = ExpansionConfig(n=3, alpha=3.0)
    idx = _index(xb[:120])
    apply_dba(idx, conf)
    want = database_side_augmentation(xb[:120], conf)
    np.testing.assert_allclose(np.asarray(idx.embeddings), want, atol=1e-6)
    # search runs on the augmented rows
    D, rows = idx.search(want[:5], 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))
    idx.save(tmp_path / "ix")
    back = LandmarkIndex.load(tmp_path / "ix")
    assert back.dba == {"n": 3, "alpha": 3.0}
    np.testing.assert_allclose(np.asarray(back.raw_embeddings), xb[:120], atol=0)
    # add: every row's DBA equals a fresh DBA of all raw rows (neighbour sets of old rows change too)
    back.add(xb[120:], [f"n{j}" for j in range(30)], ["L0"] * 30)
    np.testing.assert_allclose(np.asarray(back.embeddings), database_side_augmentation(xb, conf), atol=1e-6)
    # remove: likewise for the remaining rows
    gone = [f"i{j:04d}" for j in range(0, 120, 3)]
    back.remove(gone)
    keep = np.array([j for j in range(150) if not (j < 120 and j % 3 == 0)])
    np.testing.assert_allclose(
        np.asarray(back.embeddings), database_side_augmentation(xb[keep], conf), atol=1e-6
    )
    back.save(tmp_path / "ix")
    again = LandmarkIndex.load(tmp_path / "ix")
    np.testing.assert_allclose(
        np.asarray(again.embeddings), database_side_augmentation(xb[keep], conf), atol=1e-6
    )
    # n = 0 removes DBA: the raw rows come back
    apply_dba(again, ExpansionConfig(n=0))
    assert again.dba is None and again.raw_embeddings is None
    np.testing.assert_allclose(np.asarray(again.embeddings), xb[keep], atol=0)


def test_dba_resumes_after_a_kill(tmp_path: Path) -> None:
    xb = _data(100)
    conf = ExpansionConfig(n=4, alpha=3.0)
    idx = _index(xb)
    calls = {"n": 0}
    real_search = idx.search

    def dying_search(xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed in the 4th chunk
        return real_search(xq, k)

    idx.search = dying_search  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        apply_dba(idx, conf, work_dir=tmp_path / "dba", chunk=16)
    calls["n"] = 0
    idx.search = real_search  # type: ignore[method-assign]
    counted = {"n": 0}

    def counting_search(xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        counted["n"] += 1
        return real_search(xq, k)

    idx.search = counting_search  # type: ignore[method-assign]
    apply_dba(idx, conf, work_dir=tmp_path / "dba", chunk=16)
    assert counted["n"] == 7 - 3  # 7 chunks of 16 rows, 3 finished before the kill
    np.testing.assert_allclose(np.asarray(idx.embeddings), database_side_augmentation(xb, conf), atol=1e-6)


@pytest.mark.parametrize("type_", ["hnsw", "ivfpq"])
def test_dba_through_an_approximate_index_is_close_to_exact(type_: str) -> None:
    xb = _data(2000, d=32)
    conf = ExpansionConfig(n=5, alpha=3.0)
    idx = _index(xb, type_)
    apply_dba(idx, conf, chunk=500)
    exact = database_side_augmentation(xb, conf)
    cos = np.sum(np.asarray(idx.embeddings) * exact, axis=1)
    assert np.mean(cos > 0.9999) > 0.9  # the approximate search finds the same neighbours for most rows


def test_recognizer_searches_with_the_expanded_query() -> None:
    from _index_support import TinyEmbedder
    from landmarks.recognize import RecognizeConfig, Recognizer

    emb = TinyEmbedder(dim=16)
    xb = _data(200)
    idx = LandmarkIndex.build(
        xb, [f"i{j}" for j in range(200)], [f"L{j % 9}" for j in range(200)], model=emb.describe()
    )
    xq = _data(12, seed=5)
    rec = Recognizer(idx, emb, RecognizeConfig(k=5, qe_n=3, qe_alpha=3.0, qe_vote=True))
    out = rec.recognize_embeddings(xq, retrieval_k=20)
    for q, r in zip(xq, out):
        expanded = expand_loop(q, xb, 3, 3.0, None)
        want = np.argsort(-(xb @ expanded), kind="stable")[:20]
        assert r.retrieval == [f"i{j}" for j in want]
        assert [n.score for n in r.neighbours] == pytest.approx(list((xb @ expanded)[want[:5]]), abs=1e-5)
    plain = Recognizer(idx, emb, RecognizeConfig(k=5, qe_n=0)).recognize_embeddings(xq, retrieval_k=20)
    assert any(a.retrieval != b.retrieval for a, b in zip(out, plain))
    # without qe_vote only the retrieval list is expanded: the voting neighbours are the plain ones
    split = Recognizer(idx, emb, RecognizeConfig(k=5, qe_n=3, qe_alpha=3.0)).recognize_embeddings(
        xq, retrieval_k=20
    )
    for a, b, c in zip(split, out, plain):
        assert a.retrieval == b.retrieval
        assert [n.id for n in a.neighbours] == [n.id for n in c.neighbours]
        assert (a.landmark, a.confidence) == (c.landmark, pytest.approx(c.confidence))


def test_build_index_with_dba_stores_it_and_add_keeps_it_exact(tmp_path: Path) -> None:
    from _index_support import TinyEmbedder, make_collection
    from landmarks.data.collection import load_folder_collection
    from landmarks.extract import ExtractConfig, extract_embeddings
    from landmarks.pipeline import build_index
    from landmarks.recognize import Recognizer

    coll = make_collection(tmp_path / "c", {"a": 1, "b": 2, "c": 3}, per_landmark=5)
    emb = TinyEmbedder()
    conf = ExpansionConfig(n=2, alpha=3.0)
    out = build_index(
        emb, coll, tmp_path / "ix", extract_conf=ExtractConfig(num_workers=0), show_progress=False, dba=conf
    )
    idx = LandmarkIndex.load(out)
    assert idx.dba == {"n": 2, "alpha": 3.0}
    raw = extract_embeddings(
        emb, load_folder_collection(coll), tmp_path / "e", ExtractConfig(num_workers=0), show_progress=False
    ).embeddings
    np.testing.assert_allclose(np.asarray(idx.raw_embeddings), raw, atol=1e-6)
    np.testing.assert_allclose(np.asarray(idx.embeddings), database_side_augmentation(raw, conf), atol=1e-6)
    assert not (out / "work").exists()
    # `landmarks add` (Recognizer.add) keeps every row's DBA exact
    more = make_collection(tmp_path / "m", {"d": 4}, per_landmark=3)
    rec = Recognizer.load(out, embedder=emb)
    assert len(rec.add(load_folder_collection(more), num_workers=0).added) == 3
    again = LandmarkIndex.load(out)
    raw2 = np.asarray(again.raw_embeddings)
    assert len(raw2) == 18
    np.testing.assert_allclose(
        np.asarray(again.embeddings), database_side_augmentation(raw2, conf), atol=1e-6
    )
