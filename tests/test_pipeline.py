"""The library stages (``landmarks.pipeline``): build_index / recognize_queries, unlabelled indexes, resumption.

The model is the deterministic tiny embedder; the GLDv2-layout data is the session's ``tiny_synth``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from _index_support import TinyEmbedder, write_bad_images
from _rerank_support import make_queries, make_scenes, save, scene, warp
from landmarks.data.collection import ImageRecord, load_folder_collection
from landmarks.errors import LandmarksError
from landmarks.extract import ExtractConfig
from landmarks.index import LandmarkIndex
from landmarks.local_features import LocalFeatures, LocalFeatureStore, SiftExtractor
from landmarks.pipeline import build_index, recognize_queries
from landmarks.recognize import RecognizeConfig
from landmarks.rerank import extract_local_features

LANDMARKS = {"arch": 1, "bridge": 2, "castle": 3}
NO_WORKERS = ExtractConfig(num_workers=0, batch_size=4)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_build_index_refuses_to_replace_an_index_unless_overwrite(tmp_path: Path) -> None:
    coll = make_scenes(tmp_path / "coll", LANDMARKS, per_landmark=2)
    out = build_index(
        TinyEmbedder(),
        coll,
        tmp_path / "ix",
        local="sift",
        extract_conf=NO_WORKERS,
        local_workers=0,
        show_progress=False,
    )
    assert out == tmp_path / "ix" and len(LandmarkIndex.load(out)) == 6
    with pytest.raises(LandmarksError, match="already holds an index"):
        build_index(TinyEmbedder(), coll, out, extract_conf=NO_WORKERS)
    build_index(TinyEmbedder(), coll, out, overwrite=True, extract_conf=NO_WORKERS, show_progress=False)
    idx = LandmarkIndex.load(out)
    assert "local" not in idx.meta and not (out / "local").exists()  # the old local features went too
    with pytest.raises(LandmarksError, match="--unlabelled"):
        build_index(TinyEmbedder(), tmp_path / "nothing-labelled.csv", tmp_path / "x")


def test_unlabelled_gldv2_index_for_retrieval(tiny_synth: Path, tmp_path: Path) -> None:
    from landmarks import metrics, submission

    ix = build_index(
        TinyEmbedder(),
        tiny_synth / "index.csv",
        tmp_path / "retrieval",
        unlabelled=True,
        local="sift",
        extract_conf=NO_WORKERS,
        local_workers=0,
        show_progress=False,
    )
    idx = LandmarkIndex.load(ix)
    assert idx.num_landmarks == 0 and all(lm is None for lm in idx.landmarks)
    n_index = len(read_csv(tiny_synth / "index.csv"))
    assert len(idx) == n_index and len(LocalFeatureStore.open(ix / "local")) == n_index
    for rerank in ("none", "local"):
        out = tmp_path / rerank
        stats = recognize_queries(
            ix,
            tiny_synth / "test.csv",
            out / "p.csv",
            retrieval_csv=out / "r.csv",
            embedder=TinyEmbedder(),
            num_workers=0,
            conf=RecognizeConfig(rerank=rerank, rerank_workers=0),
        )
        assert stats.with_landmark == 0 and stats.recognized == stats.queries == 40
        assert all(r["landmarks"] == "" for r in read_csv(out / "p.csv"))
        rsol = submission.read_retrieval_solution(tiny_synth / "retrieval_solution.csv")
        ranked = submission.read_retrieval_predictions(
            out / "r.csv"
        )  # every query; the solution scores a few
        assert len(ranked) == 40 and all(len(v) == min(100, n_index) for v in ranked.values())
        ranked = {q: v for q, v in ranked.items() if q in rsol.truth}
        assert 0.0 <= metrics.mean_average_precision(ranked, rsol.truth, k=100) <= 1.0


def test_rerank_puts_verified_images_first_in_the_retrieval_csv(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name, s in LANDMARKS.items():
        for i in range(2):
            save(warp(scene(s), 10 * s + i), folder / f"{name}{i}.jpg")
    for i in range(6):
        save(warp(scene(100 + i), i), folder / f"other{i}.jpg")
    ix = build_index(
        TinyEmbedder(),
        folder,
        tmp_path / "ix",
        unlabelled=True,
        local="sift",
        extract_conf=NO_WORKERS,
        local_workers=0,
        show_progress=False,
    )
    make_queries(tmp_path / "q", LANDMARKS)
    recognize_queries(
        ix,
        tmp_path / "q",
        tmp_path / "p.csv",
        retrieval_csv=tmp_path / "r.csv",
        retrieval_k=5,
        embedder=TinyEmbedder(),
        num_workers=0,
        conf=RecognizeConfig(rerank="local", rerank_workers=0),
    )
    for row in read_csv(tmp_path / "r.csv"):
        name = row["id"][2:]
        assert (
            sorted(row["images"].split()[:2]) == [f"{name}0", f"{name}1"] and len(row["images"].split()) == 5
        )


def test_local_extraction_resumes_and_skips_unreadable_images(tmp_path: Path) -> None:
    coll = make_scenes(tmp_path / "coll", LANDMARKS, per_landmark=2)
    records = load_folder_collection(coll)
    bad = write_bad_images(tmp_path / "bad")
    records += [ImageRecord(f"bad{i}", p, "arch") for i, p in enumerate(bad)]
    calls: list[int] = []

    class Counting(SiftExtractor):
        def __call__(self, img: np.ndarray) -> LocalFeatures:
            calls.append(1)
            return super().__call__(img)

    ext = Counting()
    store = LocalFeatureStore.create(tmp_path / "store", ext.dim, ext.to_info())
    first = extract_local_features(
        ext, records[:2], store, num_workers=0, show_progress=False
    )  # "killed" here
    assert first.done == 2 and len(calls) == 2
    res = extract_local_features(
        ext,
        records,
        store,
        skipped_csv=tmp_path / "skipped.csv",
        chunk_size=3,
        num_workers=0,
        show_progress=False,
    )
    assert res.resumed == 2 and res.done == len(records) - 2 and len(calls) == 6  # only the readable rest
    assert len(res.skipped) == 3 and len(read_csv(tmp_path / "skipped.csv")) == 3
    again = LocalFeatureStore.open(tmp_path / "store")
    assert len(again) == len(records) and len(again.get("bad0")) == 0 and len(again.get(records[0].id)) > 20
    # worker processes give the same features as this process
    par = LocalFeatureStore.create(tmp_path / "par", ext.dim, ext.to_info())
    extract_local_features(SiftExtractor(), records, par, num_workers=2, show_progress=False)
    for r in records:
        a, b = again.get(r.id), par.get(r.id)
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)


def test_recognize_queries_reports_and_keeps_unreadable_queries(tmp_path: Path) -> None:
    coll = make_scenes(tmp_path / "coll", LANDMARKS, per_landmark=2)
    ix = build_index(TinyEmbedder(), coll, tmp_path / "ix", extract_conf=NO_WORKERS, show_progress=False)
    truth = make_queries(tmp_path / "q", LANDMARKS)
    (tmp_path / "q" / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    stats = recognize_queries(
        ix,
        [tmp_path / "q"],
        tmp_path / "out" / "p.csv",
        neighbours_jsonl=tmp_path / "out" / "n.jsonl",
        embedder=TinyEmbedder(),
        num_workers=0,
    )
    assert stats.queries == 4 and stats.recognized == 3 and stats.unreadable == 1
    assert stats.rerank == "none" and stats.ms_per_query > 0
    rows = {r["id"]: r["landmarks"] for r in read_csv(tmp_path / "out" / "p.csv")}
    assert rows["broken"] == "" and set(rows) == set(truth) | {"broken"}
    assert [Path(r["path"]).name for r in read_csv(tmp_path / "out" / "skipped.csv")] == ["broken.jpg"]
    assert len((tmp_path / "out" / "n.jsonl").read_text().splitlines()) == 3
