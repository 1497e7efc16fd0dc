"""The calibrated is_landmark threshold (landmarks.calibrate): loop oracles and the index -> service path."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from _index_support import TinyEmbedder, make_collection, pattern, save_jpeg, view
from landmarks.calibrate import CalibrationConfig, calibrate_index, choose_threshold, loo_confidences
from landmarks.extract import ExtractConfig
from landmarks.index import IndexConfig, LandmarkIndex
from landmarks.pipeline import build_index, recognize_queries
from landmarks.recognize import RecognizeConfig, Recognizer

MODEL = {"fingerprint": "c" * 40, "name": "unit", "embedding_dim": 16}
NO_WORKERS = ExtractConfig(num_workers=0, batch_size=8)


def precision_loop(
    t: float, conf_lm: np.ndarray, correct: np.ndarray, conf_nl: np.ndarray, pi: float
) -> float:
    c = sum(1 for x, ok in zip(conf_lm, correct) if ok and x >= t) / len(conf_lm)
    w = sum(1 for x, ok in zip(conf_lm, correct) if not ok and x >= t) / len(conf_lm)
    f = sum(1 for x in conf_nl if x >= t) / len(conf_nl)
    den = (1 - pi) * (c + w) + pi * f
    return (1 - pi) * c / den if den > 0 else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choose_threshold_matches_a_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    conf_lm = np.round(rng.normal(1.0, 0.6, 80), 2)
    correct = rng.random(80) < 0.8
    conf_nl = np.round(rng.normal(0.2, 0.5, 60), 2)
    for target, pi in ((0.9, 0.5), (0.8, 0.3), (0.95, 0.7)):
        got = choose_threshold(conf_lm, correct, conf_nl, target, pi)
        cands = sorted(set(conf_lm.tolist()) | set(conf_nl.tolist()))
        ok = [
            t
            for t in cands
            if precision_loop(t, conf_lm, correct, conf_nl, pi) >= target
            and any(x >= t and c for x, c in zip(conf_lm, correct))
        ]
        if ok:
            assert got.reached and got.threshold == ok[0]
        else:
            best = max(precision_loop(t, conf_lm, correct, conf_nl, pi) for t in cands)
            assert not got.reached and got.precision == pytest.approx(best)
        assert got.precision == pytest.approx(precision_loop(got.threshold, conf_lm, correct, conf_nl, pi))
        assert got.nonlandmark_yes == pytest.approx(float(np.mean(conf_nl >= got.threshold)))


def _toy_index(seed: int = 0) -> LandmarkIndex:
    """6 landmarks (one a singleton) around random centres, and 12 non-landmarks."""
    rng = np.random.default_rng(seed)
    d = 16
    centres = rng.normal(size=(6, d))
    labels = np.array([0] * 5 + [1] * 4 + [2] * 4 + [3] * 3 + [4] * 3 + [5])
    x = centres[labels] + 0.9 * rng.normal(size=(len(labels), d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nl = rng.normal(size=(12, d))
    nl /= np.linalg.norm(nl, axis=1, keepdims=True)
    return LandmarkIndex.build(
        x.astype(np.float32),
        [f"i{j}" for j in range(len(x))],
        [f"lm{c}" for c in labels],
        model=MODEL,
        non_landmarks=nl.astype(np.float32),
        non_landmark_ids=[f"n{j}" for j in range(12)],
        conf=IndexConfig(),
    )


def _vote_loop(sims: list[float], lms: list[str], pens: list[float]) -> tuple[str, float]:
    totals: dict[str, float] = {}
    for s, lm, p in zip(sims, lms, pens):
        totals[lm] = totals.get(lm, 0.0) + min(max(s, 0.0), 1.0) - p
    best = max(totals, key=lambda k: (totals[k], -lms.index(k)))
    return best, totals[best]


def test_leave_one_out_confidences_match_a_loop() -> None:
    idx = _toy_index()
    k, qk, top = 3, 4, idx.conf.ood_top_k
    conf_lm, correct, conf_nl = loo_confidences(idx, k=k, ood=True, ood_weight=1.0, ood_query_k=qk)
    xb = np.asarray(idx.embeddings, np.float64)
    xn = np.asarray(idx.non_landmarks, np.float64)
    eligible = [i for i, lm in enumerate(idx.landmarks) if idx.landmarks.count(lm) >= 2]
    assert len(conf_lm) == len(eligible) == len(idx) - 1
    for n, i in enumerate(eligible):
        others = [j for j in range(len(idx)) if j != i]
        sims = sorted(((float(xb[i] @ xb[j]), j) for j in others), key=lambda t: -t[0])[:k]
        lm, c = _vote_loop(
            [s for s, _ in sims],
            [str(idx.landmarks[j]) for _, j in sims],
            [float(idx.penalty[j]) for _, j in sims],
        )
        q_ood = np.mean(sorted(xn @ xb[i], reverse=True)[:qk])
        assert conf_lm[n] == pytest.approx(c - q_ood, abs=1e-5)
        assert correct[n] == (lm == idx.landmarks[i])
    for m in range(len(xn)):
        rest = np.delete(xn, m, axis=0)  # the non-landmark itself leaves N
        sims = sorted(((float(xn[m] @ xb[j]), j) for j in range(len(idx))), key=lambda t: -t[0])[:k]
        pens = [float(np.mean(sorted(rest @ xb[j], reverse=True)[:top])) for _, j in sims]
        _, c = _vote_loop([s for s, _ in sims], [str(idx.landmarks[j]) for _, j in sims], pens)
        q_ood = np.mean(sorted(rest @ xn[m], reverse=True)[:qk])
        assert conf_nl[m] == pytest.approx(c - q_ood, abs=1e-5)


def test_no_non_landmarks_no_calibration() -> None:
    idx = _toy_index()
    idx.set_non_landmarks(None)
    assert calibrate_index(idx) is None


def _nonlandmark_images(folder: Path, n: int = 10) -> Path:
    for j in range(n):
        save_jpeg(view(pattern(500 + j), j), folder / f"nl{j}.jpg")
    return folder


def test_index_calibrates_and_the_recognizer_says_no_to_a_photo_of_nothing_it_knows(tmp_path: Path) -> None:
    coll = make_collection(tmp_path / "coll", {f"lm{j}": j + 1 for j in range(6)}, per_landmark=4)
    nl = _nonlandmark_images(tmp_path / "nl")
    out = build_index(
        TinyEmbedder(),
        coll,
        tmp_path / "ix",
        non_landmarks=nl,
        extract_conf=NO_WORKERS,
        show_progress=False,
        calibration=CalibrationConfig(precision=0.9),
    )
    idx = LandmarkIndex.load(out)
    cal = idx.meta["calibration"]
    assert (
        cal["landmark_queries"] == 24 and cal["nonlandmark_queries"] == 10 and cal["precision_target"] == 0.9
    )
    rec = Recognizer(idx, TinyEmbedder(), RecognizeConfig(), index_dir=out)
    assert (
        rec.is_landmark_threshold == cal["threshold"]
        and rec.info().is_landmark_threshold["source"] == "calibrated"
    )
    known = [view(pattern(3), 777 + j) for j in range(3)]
    unknown = [view(pattern(900 + j), j) for j in range(20)]
    res = rec.recognize(known + unknown)
    for r in res:
        assert r.is_landmark == (r.confidence >= cal["threshold"])
    assert all(r.is_landmark and r.landmark == "lm2" for r in res[:3])
    # calibrated on 10 non-landmarks to let at most 1 of them through; unseen ones do about as well
    assert cal["nonlandmark_yes"] <= 0.1 and sum(r.is_landmark for r in res[3:]) <= 5
    assert all(r.landmark for r in res)  # a landmark is still voted for every query (GAP ranks them)
    # an explicit threshold wins; and GAP's CSV keeps every voted landmark unless one is given
    assert Recognizer(idx, TinyEmbedder(), RecognizeConfig(threshold=-5.0)).is_landmark_threshold == -5.0
    assert Recognizer(idx, TinyEmbedder(), RecognizeConfig(k=5)).is_landmark_threshold is None  # other voting
    qdir = tmp_path / "q"
    for j, img in enumerate(known + unknown):
        save_jpeg(img, qdir / f"q{j}.jpg")
    recognize_queries(out, qdir, tmp_path / "pred.csv", embedder=TinyEmbedder(), num_workers=0)
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 23 and all(r["landmarks"] for r in rows)
    # add: the new landmark is recognised and the calibration is redone over the grown index
    more = make_collection(tmp_path / "more", {"lm9": 42}, per_landmark=3)
    from landmarks.data.collection import load_collection

    rec.add(load_collection(more), num_workers=0)
    again = LandmarkIndex.load(out)
    assert again.meta["calibration"]["landmark_queries"] == 27
    assert rec.recognize([view(pattern(42), 5)])[0].landmark == "lm9"


def test_index_cli_whitens_calibrates_and_reports(tmp_path: Path) -> None:
    """`landmarks index --whiten 8 --non-landmarks`, then `recognize`: a real (random-init) run through the CLI."""
    import contextlib
    import io

    import torch

    from landmarks.checkpoint import save_model
    from landmarks.cli import main
    from landmarks.config import to_dict
    from landmarks.data.transforms import Preprocess
    from landmarks.models.net import LandmarkNet, ModelConfig

    torch.manual_seed(0)
    conf = ModelConfig(backbone="test_resnet", embedding_dim=32)
    save_model(
        tmp_path / "run",
        LandmarkNet(conf, num_classes=4),
        {
            "config": {"model": to_dict(conf)},
            "classes": {},
            "num_classes": 4,
            "preprocessing": Preprocess(64).to_dict(),
        },
    )
    coll = make_collection(tmp_path / "coll", {f"lm{j}": j + 1 for j in range(4)}, per_landmark=4)
    nl = _nonlandmark_images(tmp_path / "nl", 8)

    def run(*argv: object) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([str(a) for a in argv]) == 0
        return out.getvalue()

    text = run(
        "index",
        "--model",
        tmp_path / "run",
        "--images",
        coll,
        "--out",
        tmp_path / "ix",
        "--non-landmarks",
        nl,
        "--whiten",
        "8",
        "--precision",
        "0.8",
        "--workers",
        "0",
    )
    idx = LandmarkIndex.load(tmp_path / "ix")
    cal = idx.meta["calibration"]
    assert "whitened 32 -> 8" in text and f"confidence >= {cal['threshold']:.4f}" in text
    assert idx.d == 8 and idx.meta["whitening"]["shrinkage"] == 1.0 and cal["precision_target"] == 0.8
    text = run("recognize", "--index", tmp_path / "ix", nl, "--out", tmp_path / "p.csv", "--workers", "0")
    assert "is_landmark for" in text and "calibrated" in text
    with open(tmp_path / "p.csv", newline="") as f:
        assert sum(1 for row in csv.DictReader(f) if row["landmarks"]) == 8  # GAP's CSV: every voted landmark
    assert cal["landmark_queries"] == 16
    run("remove", tmp_path / "ix", "lm0", "--landmarks")  # fewer images: calibrated again
    assert LandmarkIndex.load(tmp_path / "ix").meta["calibration"]["landmark_queries"] == 12
