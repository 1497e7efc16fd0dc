"""Local re-ranking end to end: ``index --local``, ``recognize --rerank local``, add/remove, determinism.

Images are textured synthetic scenes seen through random homographies (``_rerank_support``), so RootSIFT
finds 35-85 inliers between views of one scene and fewer than 10 between different scenes. The global
model is a random-init ``test_resnet`` run (CLI tests) or the deterministic tiny embedder (API tests).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from _index_support import TinyEmbedder, write_bad_images
from _rerank_support import make_queries, make_run, make_scenes, save, scene, warp
from landmarks.errors import ConfigError, LandmarksError
from landmarks.index import LandmarkIndex
from landmarks.local_features import LocalFeatureStore, SiftExtractor
from landmarks.pipeline import build_index, recognize_queries
from landmarks.recognize import RecognizeConfig, Recognizer, neighbour_scores
from landmarks.rerank import (
    Candidates,
    LocalReranker,
    local_meta,
    local_scores,
    rerank_order,
    retrieval_order,
    verify_candidates,
)
from landmarks.verify import verify

LANDMARKS = {"arch": 1, "bridge": 2, "castle": 3, "dome": 4, "eye": 5}


def cli(*args: str | Path, check: bool = True) -> tuple[int, str, str]:
    """``landmarks ARGS`` in this process: (exit status, stdout, stderr)."""
    from landmarks.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if check and code:
        raise AssertionError(f"exit {code}\n{out.getvalue()}\n{err.getvalue()}")
    return code, out.getvalue(), err.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rerank")
    make_scenes(root / "coll", LANDMARKS, per_landmark=3)
    write_bad_images(root / "coll" / "arch" / "broken")
    for i in range(6):
        save(warp(scene(900 + i), i), root / "nonlm" / f"n{i}.jpg")
    make_queries(root / "queries", LANDMARKS)
    save(warp(scene(999), 3), root / "queries" / "q_none.jpg")
    make_run(root / "run")
    return root


@pytest.fixture(scope="module")
def sift_index(data: Path) -> Path:
    cli(
        "index",
        "--model",
        data / "run",
        "--images",
        data / "coll",
        "--out",
        data / "index",
        "--non-landmarks",
        data / "nonlm",
        "--local",
        "sift",
        "--workers",
        "0",
        "--local-workers",
        "0",
    )
    return data / "index"


# --- pure scoring -------------------------------------------------------------------------------------


def test_local_scores_match_the_per_query_formula() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(-0.5, 1.0, (6, 9)).astype(np.float32)
    base[2, 7:] = -np.inf
    inl = rng.integers(-1, 120, (6, 9))
    got = local_scores(base, inl, c=70.0, min_inliers=10)
    for q in range(6):  # the slow, obvious version
        for j in range(9):
            if not np.isfinite(base[q, j]):
                continue
            n = inl[q, j] if inl[q, j] >= 10 else 0
            assert got[q, j] == pytest.approx(base[q, j] + min(n, 70) / 70, rel=1e-6)
    assert np.isneginf(got[2, 7:]).all()
    hand = local_scores(np.array([[0.9, 0.8, 0.7, 0.6]]), np.array([[0, 35, 140, 5]]), c=70)
    np.testing.assert_allclose(hand, [[0.9, 1.3, 1.7, 0.6 + 5 / 70]], rtol=1e-6)
    order = rerank_order(np.array([[0.5, 0.9, 0.5, -np.inf]]))
    assert order.tolist() == [[1, 0, 2, 3]]  # ties keep the global order
    with pytest.raises(ValueError):
        local_scores(base, inl[:, :3])


def test_retrieval_order_puts_verified_candidates_first_by_inliers() -> None:
    sims = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7])
    inl = np.array([3, 40, 0, 40, 100, 12])
    # Verified (>= 10): 4 (100), then 1 and 3 (40, input order), then 5 (12); then 0, 2 by similarity.
    assert retrieval_order(sims, inl, min_inliers=10).tolist() == [4, 1, 3, 5, 0, 2]
    assert retrieval_order(sims[::-1], np.zeros(6, int), min_inliers=10).tolist() == [5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError):
        retrieval_order(sims, inl[:2])


def test_pool_verification_equals_a_serial_loop_of_verify(tmp_path: Path) -> None:
    """LocalReranker's worker pool (2 processes, candidates split) returns the inliers of verify() pair by pair."""
    ex = SiftExtractor(max_features=300)
    images = {f"s{i}_{v}": warp(scene(20 + i), 100 * i + v) for i in range(3) for v in range(2)}
    store = LocalFeatureStore.create(tmp_path / "local", ex.dim, ex.to_info())
    feats = {k: ex(img) for k, img in images.items()}
    store.write_chunk(list(feats), list(feats.values()))
    query = warp(scene(21), 999)
    ids = [*images, "not_stored"]
    cands = Candidates(
        ids=[ids],
        similarities=np.linspace(0.9, 0.2, len(ids))[None].astype(np.float32),
        scores=np.linspace(0.9, 0.2, len(ids))[None].astype(np.float32),
    )
    results = {}
    for workers in (0, 2):
        rr = LocalReranker(tmp_path, local_meta(ex), ex, workers=workers, seed=5, min_inliers=10)
        try:
            results[workers] = rr.rerank([query], cands)
        finally:
            rr.close()
    qf = ex(query)
    oracle = [
        verify(qf, feats[i], "fundamental", 5, max_iters=2000).num_inliers if i in feats else 0 for i in ids
    ]
    assert results[0].inliers[0].tolist() == results[2].inliers[0].tolist() == oracle
    assert oracle[2] >= 20 and oracle[3] >= 20 and max(oracle[:2] + oracle[4:]) < 10  # scene 21 = s1_*
    np.testing.assert_array_equal(results[0].scores, results[2].scores)
    assert results[2].retrieval[0].tolist()[:2] == ([3, 2] if oracle[3] > oracle[2] else [2, 3])
    assert [v.num_inliers for v in verify_candidates(qf, [None, feats["s1_0"]], seed=5, max_iters=2000)] == [
        0,
        oracle[2],
    ]


# --- the CLI, end to end ------------------------------------------------------------------------------


def test_index_local_sift_then_recognize_rerank_local(sift_index: Path, data: Path, tmp_path: Path) -> None:
    meta = json.loads((sift_index / "meta.json").read_text())
    assert meta["local"]["features"] == "sift" and meta["local"]["extractor"]["name"] == "rootsift"
    store = LocalFeatureStore.open(sift_index / "local")
    assert sorted(store.ids()) == sorted(LandmarkIndex.load(sift_index).ids) and len(store) == 15
    assert {Path(r["path"]).name for r in read_csv(sift_index / "skipped.csv")} == {
        "empty.jpg",
        "notes.jpg",
        "truncated.jpg",
    }

    cli(
        "recognize",
        "--index",
        sift_index,
        data / "queries",
        "--out",
        tmp_path / "g.csv",
        "--neighbours",
        tmp_path / "g.jsonl",
        "--workers",
        "0",
    )
    _, out, _ = cli(
        "recognize",
        "--index",
        sift_index,
        data / "queries",
        "--out",
        tmp_path / "r.csv",
        "--neighbours",
        tmp_path / "r.jsonl",
        "--retrieval",
        tmp_path / "ret.csv",
        "--rerank",
        "local",
        "--rerank-candidates",
        "8",
        "--rerank-workers",
        "0",
        "--workers",
        "0",
    )
    assert "re-ranked (local" in out
    glob = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()}
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    preds = {r["id"]: r["landmarks"].split() for r in read_csv(tmp_path / "r.csv")}
    for row in rows:
        assert all(isinstance(n["inliers"], int) for n in row["neighbours"])
        if row["id"] == "q_none":
            assert max(n["inliers"] for n in row["neighbours"]) < 10
            continue
        truth = row["id"][2:]
        top = row["neighbours"][0]
        assert top["landmark"] == truth and top["inliers"] >= 20, row  # verified images first
        assert top["score"] == pytest.approx(0.0 + top["score"])  # finite
        assert preds[row["id"]][0] == truth
        assert row["confidence"] > glob[row["id"]]["confidence"]  # the inlier bonus adds to the vote
    retrieval = {r["id"]: r["images"].split() for r in read_csv(tmp_path / "ret.csv")}
    for name in LANDMARKS:
        assert retrieval[f"q_{name}"][0].startswith(name) and len(retrieval[f"q_{name}"]) == 15


def test_rerank_is_deterministic_and_parallel_equals_serial(
    sift_index: Path, data: Path, tmp_path: Path
) -> None:
    outs = []
    for i, workers in enumerate(("2", "2", "0")):
        csv_path, jsonl = tmp_path / f"p{i}.csv", tmp_path / f"n{i}.jsonl"
        cli(
            "recognize",
            "--index",
            sift_index,
            data / "queries",
            "--out",
            csv_path,
            "--neighbours",
            jsonl,
            "--rerank",
            "local",
            "--rerank-workers",
            workers,
            "--seed",
            "3",
            "--workers",
            "0",
        )
        outs.append((csv_path.read_bytes(), jsonl.read_bytes()))
    assert outs[0] == outs[1] == outs[2]
    assert b'"inliers": null' not in outs[0][1]


def test_rerank_needs_an_index_with_local_features(data: Path, tmp_path: Path) -> None:
    cli(
        "index",
        "--model",
        data / "run",
        "--images",
        data / "coll",
        "--out",
        tmp_path / "plain",
        "--workers",
        "0",
    )
    code, _, err = cli(
        "recognize",
        "--index",
        tmp_path / "plain",
        data / "queries",
        "--out",
        tmp_path / "p.csv",
        "--rerank",
        "local",
        check=False,
    )
    assert code == 2 and "--local sift" in err
    code, _, err = cli(
        "index",
        "--model",
        data / "run",
        "--images",
        data / "coll",
        "--out",
        tmp_path / "m",
        "--local",
        "model",
        "--workers",
        "0",
        check=False,
    )
    assert code == 2 and "no local-feature head" in err and not (tmp_path / "m" / "meta.json").exists()


def test_index_local_model_uses_the_runs_local_head(data: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run-local", local_head=True)
    coll = make_scenes(tmp_path / "coll", {"arch": 1, "bridge": 2}, per_landmark=2)
    ix = tmp_path / "ix"
    cli("index", "--model", run, "--images", coll, "--out", ix, "--local", "model", "--workers", "0")
    meta = json.loads((ix / "meta.json").read_text())
    assert meta["local"]["features"] == "model" and meta["local"]["extractor"]["name"] == "delg"
    assert len(LocalFeatureStore.open(ix / "local")) == 4
    cli(
        "recognize",
        "--index",
        ix,
        data / "queries" / "q_arch.jpg",
        "--out",
        tmp_path / "p.csv",
        "--neighbours",
        tmp_path / "n.jsonl",
        "--rerank",
        "local",
        "--rerank-workers",
        "0",
        "--workers",
        "0",
    )
    row = json.loads((tmp_path / "n.jsonl").read_text())
    assert all(isinstance(n["inliers"], int) for n in row["neighbours"])


# --- the library: scoring against an oracle, add / remove ----------------------------------------------


@pytest.fixture()
def tiny_index(data: Path, tmp_path: Path) -> Path:
    from landmarks.extract import ExtractConfig

    return build_index(
        TinyEmbedder(),
        data / "coll",
        tmp_path / "tiny",
        non_landmarks=data / "nonlm",
        local="sift",
        extract_conf=ExtractConfig(num_workers=0),
        local_workers=0,
        show_progress=False,
    )


def test_recognizer_rerank_scores_against_a_loop_oracle(tiny_index: Path, data: Path) -> None:
    conf = RecognizeConfig(
        rerank="local", rerank_candidates=6, rerank_workers=0, k=3, rerank_c=50.0, rerank_min_inliers=10
    )
    rec = Recognizer.load(tiny_index, conf, embedder=TinyEmbedder())
    rng = np.random.default_rng(1)
    fake = {i: int(rng.integers(0, 80)) for i in rec.index.ids}
    assert rec.local is not None and rec.local is rec.reranker
    rec.local.inliers = lambda queries, cands: [np.array([fake[c] for c in cs], np.int64) for cs in cands]  # type: ignore[method-assign]
    queries = [data / "queries" / f"q_{n}.jpg" for n in LANDMARKS]
    from landmarks.data.decode import decode_image

    images = [decode_image(q) for q in queries]
    xq = rec.embed(images)
    got = rec.recognize_embeddings(xq, queries=images)
    sims, rows = rec.index.search(xq, 6)
    q_ood = rec.index.query_ood(xq, conf.ood_query_k)
    for q in range(len(images)):  # the slow, obvious version
        cands = []
        for s, r in zip(sims[q], rows[q]):
            base = float(neighbour_scores(np.array([[s]]), np.array([[rec.index.penalty[r]]]))[0, 0])
            n = fake[rec.index.ids[r]]
            cands.append((base + (min(n, 50) / 50 if n >= 10 else 0.0), rec.index.landmarks[r], n))
        cands.sort(key=lambda t: -t[0])  # stable: ties keep the global order
        totals: dict[str, float] = {}
        for score, lm, _ in cands[:3]:
            totals[lm] = totals.get(lm, 0.0) + score
        best = max(totals, key=lambda lm: totals[lm])
        assert got[q].landmark == best
        assert got[q].confidence == pytest.approx(totals[best] - float(q_ood[q]), abs=1e-5)
        assert [nb.inliers for nb in got[q].neighbours] == [n for _, _, n in cands[:3]]
        np.testing.assert_allclose(
            [nb.score for nb in got[q].neighbours], [t[0] for t in cands[:3]], atol=1e-5
        )


def test_add_and_remove_keep_the_local_features_consistent(
    tiny_index: Path, data: Path, tmp_path: Path
) -> None:
    new = make_scenes(tmp_path / "new", {"fort": 11}, per_landmark=2)
    conf = RecognizeConfig(rerank="local", rerank_workers=0, rerank_candidates=10)
    with Recognizer.load(tiny_index, conf, embedder=TinyEmbedder()) as rec:
        from landmarks.data.collection import load_folder_collection

        records = load_folder_collection(new)
        assert len(rec.add(records).added) == 2
        new_ids = [r.id for r in records]
        assert set(new_ids) <= set(LocalFeatureStore.open(tiny_index / "local").ids())
        query = warp(scene(11), 4242)
        out = rec.recognize([query])[0]
        assert (
            out.landmark == "fort"
            and out.neighbours[0].inliers is not None
            and out.neighbours[0].inliers >= 20
        )
    cli("remove", tiny_index, *new_ids)
    rec = Recognizer.load(tiny_index, conf, embedder=TinyEmbedder())
    out = rec.recognize([query])[0]
    assert out.landmark != "fort" and all(n.id not in new_ids for n in out.neighbours)
    assert all(n.inliers is not None and n.inliers < 10 for n in out.neighbours)
    rec.close()


def test_recognize_queries_reports_rerank_timings(tiny_index: Path, data: Path, tmp_path: Path) -> None:
    stats = recognize_queries(
        tiny_index,
        data / "queries",
        tmp_path / "p.csv",
        embedder=TinyEmbedder(),
        conf=RecognizeConfig(rerank="local", rerank_workers=0),
        num_workers=0,
    )
    assert stats.rerank == "local" and stats.recognized == 6 and stats.timings_ms["rerank"] > 0
    with pytest.raises(ConfigError):
        RecognizeConfig(rerank="global")
    with pytest.raises(LandmarksError, match="sift or model"):
        build_index(TinyEmbedder(), data / "coll", tmp_path / "x", local="orb")


def test_cli_add_extracts_local_features_of_new_images(data: Path, tmp_path: Path) -> None:
    ix = tmp_path / "ix"
    cli(
        "index",
        "--model",
        data / "run",
        "--images",
        data / "coll",
        "--out",
        ix,
        "--local",
        "sift",
        "--workers",
        "0",
        "--local-workers",
        "0",
    )
    new = make_scenes(tmp_path / "new", {"fort": 11}, per_landmark=2)
    cli("add", ix, new, "--workers", "0")
    ids = set(LandmarkIndex.load(ix).ids)
    assert ids == set(LocalFeatureStore.open(ix / "local").ids()) and len(ids) == 17
    save(warp(scene(11), 4242), tmp_path / "q" / "q_fort.jpg")
    cli(
        "recognize",
        "--index",
        ix,
        tmp_path / "q",
        "--out",
        tmp_path / "p.csv",
        "--neighbours",
        tmp_path / "n.jsonl",
        "--rerank",
        "local",
        "--rerank-workers",
        "0",
        "--workers",
        "0",
    )
    row = json.loads((tmp_path / "n.jsonl").read_text())
    assert row["landmark"] == "fort" and row["neighbours"][0]["inliers"] >= 20


def test_remove_then_readd_same_id_with_another_image_replaces_its_local_features(
    tiny_index: Path, tmp_path: Path
) -> None:
    """The bug of issue 11/12: re-adding a removed id with another photo kept the removed photo's features."""
    from landmarks.data.collection import ImageRecord
    from landmarks.data.decode import decode_image
    from landmarks.maintenance import add_to_index, remove_from_index
    from landmarks.rerank import extractor_from_meta

    index = LandmarkIndex.load(tiny_index)
    victim = index.ids[0]
    old_store = LocalFeatureStore.open(tiny_index / index.meta["local"]["dir"])
    old_feats = old_store.get(victim)
    res = remove_from_index(tiny_index, [victim])
    assert res.removed == [victim] and res.index is not None and res.index.generation == index.generation + 1
    store = LocalFeatureStore.open(tiny_index / res.index.meta["local"]["dir"])
    assert victim not in store and set(store.ids()) == set(res.index.ids)  # pruned (compacted)
    other = save(warp(scene(77), 1), tmp_path / "other.jpg")
    added = add_to_index(
        tiny_index, [ImageRecord(victim, other, "fort")], TinyEmbedder(), num_workers=0, show_progress=False
    )
    assert added.added == [victim]
    reloaded = LandmarkIndex.load(tiny_index)
    store = LocalFeatureStore.open(tiny_index / reloaded.meta["local"]["dir"])
    want = extractor_from_meta(reloaded.meta["local"])(
        decode_image(other)
    )  # oracle: the new photo's features
    got = store.get(victim)
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got.keypoints, want.keypoints, atol=1e-3)
    assert len(got) != len(old_feats) or not np.allclose(got.keypoints, old_feats.keypoints, atol=1e-3)
    assert set(store.ids()) == set(reloaded.ids)
    # the removal's old store folder goes at the next write, not while a reader may still use it
    dirs = sorted(p.name for p in tiny_index.iterdir() if p.name.startswith("local"))
    assert dirs == [reloaded.meta["local"]["dir"]]


def test_a_reader_with_local_reranking_follows_a_removal_on_disk(tiny_index: Path) -> None:
    """A long-lived recognizer (a server) swaps in the newer generation and its compacted local store."""
    from landmarks.maintenance import remove_from_index

    conf = RecognizeConfig(rerank="local", rerank_workers=0, rerank_candidates=10)
    with Recognizer.load(tiny_index, conf, embedder=TinyEmbedder()) as rec:
        query = warp(scene(LANDMARKS["castle"]), 31337)
        before = rec.recognize([query])[0]
        assert before.landmark == "castle" and before.neighbours[0].inliers is not None
        gone = [i for i, lm in zip(rec.index.ids, rec.index.landmarks) if lm == "castle"]
        remove_from_index(tiny_index, gone)
        newer = rec.load_newer()
        assert newer is not None and rec.replace_index(newer)
        assert rec.local is not None and rec.local.store_root.name == newer.meta["local"]["dir"] != "local"
        after = rec.recognize([query])[0]
        assert after.landmark != "castle" and not {n.id for n in after.neighbours} & set(gone)
        assert all(n.inliers is not None and n.inliers < 10 for n in after.neighbours)
