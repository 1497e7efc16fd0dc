"""The index verbs end to end: ``landmarks index / add / remove / recognize`` as subprocesses.

Most tests use a real (random-init, 64 px ``test_resnet``) run written with ``landmarks.checkpoint``;
the SIGKILL test uses a tiny embedder that hangs after three batches, so the kill lands mid-run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _index_support import make_collection, pattern, save_jpeg, view, write_bad_images, write_tiny_run
from landmarks.index import LandmarkIndex

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LANDMARKS = {"eiffel": 1, "bigben": 2, "colosseum": 3, "petra": 4}


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args: str | Path, check: bool = True, main: str | None = None, subprocess_: bool = False) -> Result:
    """Run ``landmarks ARGS`` in this process (fast), or as a subprocess (``main``: a launcher script)."""
    argv = [str(a) for a in args]
    if main or subprocess_:
        cmd = [sys.executable, str(TESTS / main)] if main else [sys.executable, "-m", "landmarks"]
        p = subprocess.run([*cmd, *argv], capture_output=True, text=True, env=ENV, timeout=300)
        res = Result(p.returncode, p.stdout, p.stderr)
    else:
        from landmarks.cli import main as landmarks_main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = landmarks_main(argv)
        res = Result(code, out.getvalue(), err.getvalue())
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def make_run(path: Path, seed: int = 0) -> Path:
    """A random-init LandmarkNet run folder (64 px, 64-d) saved by landmarks.checkpoint."""
    import torch

    from landmarks.checkpoint import save_model
    from landmarks.config import to_dict
    from landmarks.data.transforms import Preprocess
    from landmarks.models.net import LandmarkNet, ModelConfig

    torch.manual_seed(seed)
    conf = ModelConfig(backbone="test_resnet", embedding_dim=64)
    net = LandmarkNet(conf, num_classes=4)
    save_model(
        path,
        net,
        {
            "config": {"model": to_dict(conf)},
            "classes": {},
            "num_classes": 4,
            "preprocessing": Preprocess(64).to_dict(),
        },
    )
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    make_run(root / "run")
    make_run(root / "other", seed=1)
    make_collection(root / "coll", LANDMARKS, per_landmark=4)
    write_bad_images(root / "coll" / "eiffel" / "broken")  # unreadable files inside a landmark folder
    for i in range(8):
        save_jpeg(view(pattern(500 + i), i), root / "nonlm" / f"n{i}.jpg")
    q = root / "queries"
    for name, pat in LANDMARKS.items():
        save_jpeg(view(pattern(pat), 9000 + pat), q / f"q_{name}.jpg")
    save_jpeg(view(pattern(777), 1), q / "q_none.jpg")
    (q / "q_bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    make_collection(root / "new", {"tower": 42}, per_landmark=3)
    save_jpeg(view(pattern(42), 4242), root / "q_tower.jpg")
    return root


@pytest.fixture(scope="module")
def index(data: Path) -> Path:
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
        "--workers",
        "1",
        "--batch-size",
        "4",
        "--flip",
        subprocess_=True,
    )
    return data / "index"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_index_skips_bad_images_and_does_every_good_one(index: Path, data: Path) -> None:
    meta = json.loads((index / "meta.json").read_text())
    assert meta["count"] == 16 and meta["landmarks_count"] == 4 and meta["non_landmarks_count"] == 8
    assert meta["views"] == {"scales": [1.0], "flip": True}
    skipped = read_csv(index / "skipped.csv")
    assert sorted(Path(r["path"]).name for r in skipped) == ["empty.jpg", "notes.jpg", "truncated.jpg"]
    assert not (index / "work").exists()
    idx = LandmarkIndex.load(index)
    assert len(idx) == 16 and (idx.penalty > 0).all()
    res = cli("index", "--model", data / "run", "--images", data / "coll", "--out", index, check=False)
    assert res.returncode == 2 and "already holds an index" in res.stderr


def test_recognize_writes_csv_neighbours_and_retrieval(index: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    res = cli(
        "recognize",
        "--index",
        index,
        data / "queries",
        "--out",
        out,
        "--neighbours",
        tmp_path / "n.jsonl",
        "--retrieval",
        tmp_path / "r.csv",
        "--workers",
        "0",
    )
    assert "recognized 5 of 6 queries" in res.stdout
    rows = {r["id"]: r["landmarks"] for r in read_csv(out)}
    assert set(rows) == {f"q_{n}" for n in LANDMARKS} | {"q_none", "q_bad"}
    assert rows["q_bad"] == ""
    for name in LANDMARKS:
        lm, score = rows[f"q_{name}"].split()
        assert lm == name and np.isfinite(float(score))
    assert [Path(r["path"]).name for r in read_csv(tmp_path / "skipped.csv")] == ["q_bad.jpg"]
    lines = [json.loads(x) for x in (tmp_path / "n.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and set(lines[0]) == {"id", "path", "landmark", "confidence", "neighbours"}
    assert len(lines[0]["neighbours"]) == 3
    assert set(lines[0]["neighbours"][0]) == {"id", "landmark", "score", "inliers", "path"}
    retr = {r["id"]: r["images"].split() for r in read_csv(tmp_path / "r.csv")}
    assert len(retr["q_bigben"]) == 16 and retr["q_bigben"][0].startswith("bigben/") and retr["q_bad"] == []
    # without the out-of-domain handling the confidences are plain sums of cosine similarities
    cli(
        "recognize",
        "--index",
        index,
        data / "queries",
        "--out",
        tmp_path / "plain.csv",
        "--no-ood",
        "--k",
        "5",
        "--workers",
        "0",
    )
    plain = {r["id"]: r["landmarks"] for r in read_csv(tmp_path / "plain.csv")}
    assert all(float(plain[f"q_{n}"].split()[1]) > float(rows[f"q_{n}"].split()[1]) for n in LANDMARKS)


def test_gldv2_csv_queries(index: Path, tmp_path: Path) -> None:
    ids = ["a1b2c3d4", "f0e1d2c3"]
    for image_id, pat in zip(ids, (2, 3)):
        save_jpeg(
            view(pattern(pat), 31 + pat),
            tmp_path / "test" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg",
        )
    (tmp_path / "test.csv").write_text("id\n" + "\n".join(ids) + "\n")
    cli(
        "recognize", "--index", index, tmp_path / "test.csv", "--out", tmp_path / "pred.csv", "--workers", "0"
    )
    rows = {r["id"]: r["landmarks"].split()[0] for r in read_csv(tmp_path / "pred.csv")}
    assert rows == {"a1b2c3d4": "bigben", "f0e1d2c3": "colosseum"}


def test_other_model_is_refused(index: Path, data: Path, tmp_path: Path) -> None:
    res = cli(
        "recognize",
        "--index",
        index,
        data / "queries",
        "--out",
        tmp_path / "p.csv",
        "--model",
        data / "other",
        check=False,
    )
    assert res.returncode == 2
    assert (
        "was built with model" in res.stderr and "other" in res.stderr and not (tmp_path / "p.csv").exists()
    )
    res = cli("add", index, data / "new", "--model", data / "other", check=False)
    assert res.returncode == 2 and "was built with model" in res.stderr


def test_add_new_landmark_then_remove(data: Path, tmp_path: Path) -> None:
    ix = tmp_path / "index"
    cli(
        "index",
        "--model",
        data / "run",
        "--images",
        data / "coll",
        "--out",
        ix,
        "--type",
        "hnsw",
        "--dtype",
        "float16",
        "--workers",
        "0",
    )
    cli("recognize", "--index", ix, data / "q_tower.jpg", "--out", tmp_path / "before.csv", "--workers", "0")
    assert read_csv(tmp_path / "before.csv")[0]["landmarks"].split()[0] != "tower"
    res = cli("add", ix, data / "new", "--workers", "0")
    assert "added 3 images (1 new landmarks)" in res.stdout
    cli("recognize", "--index", ix, data / "q_tower.jpg", "--out", tmp_path / "after.csv", "--workers", "0")
    assert read_csv(tmp_path / "after.csv")[0]["landmarks"].split()[0] == "tower"
    # remove by id list file and by landmark
    (tmp_path / "ids.txt").write_text("# drop two\ntower/tower_0\ntower/tower_1\n")
    res = cli("remove", ix, tmp_path / "ids.txt")
    assert "removed 2 images" in res.stdout and "17 images of 5 landmarks" in res.stdout
    res = cli("remove", ix, "tower", "--landmarks")
    assert "removed 1 images" in res.stdout and "16 images of 4 landmarks" in res.stdout
    res = cli("remove", ix, "no-such-id", check=False)
    assert res.returncode == 2 and "no-such-id" in res.stderr
    cli("recognize", "--index", ix, data / "q_tower.jpg", "--out", tmp_path / "gone.csv", "--workers", "0")
    assert read_csv(tmp_path / "gone.csv")[0]["landmarks"].split()[0] != "tower"


def test_sigkilled_index_resumes_to_the_same_index(tmp_path: Path) -> None:
    coll = make_collection(tmp_path / "coll", {"a": 11, "b": 12, "c": 13}, per_landmark=6)
    write_tiny_run(tmp_path / "slow", block_after=3)  # embeds 3 batches (= 3 chunks), then hangs until killed
    write_tiny_run(tmp_path / "fast")
    args = ["index", "--images", coll, "--batch-size", "2", "--chunk-size", "2", "--workers", "1"]
    cli(*args, "--model", tmp_path / "fast", "--out", tmp_path / "whole", main="_index_cli_main.py")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TESTS / "_index_cli_main.py"),
            *map(str, args),
            "--model",
            tmp_path / "slow",
            "--out",
            tmp_path / "killed",
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    chunks = tmp_path / "killed" / "work" / "images" / "chunks"
    deadline = time.time() + 120
    while len(list(chunks.glob("*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the blocked run ended by itself"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(chunks.glob("*.json")))
    assert done == 3 and not (tmp_path / "killed" / "meta.json").exists()
    res = cli(
        *args,
        "--model",
        tmp_path / "fast",
        "--out",
        tmp_path / "killed",
        main="_index_cli_main.py",
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert f"resuming, {done} of 9 chunks already done" in res.stderr
    a, b = LandmarkIndex.load(tmp_path / "whole"), LandmarkIndex.load(tmp_path / "killed")
    assert a.ids == b.ids and a.landmarks == b.landmarks and a.paths == b.paths
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    xq = np.asarray(a.embeddings[:5], dtype=np.float32)
    for x, y in zip(a.search(xq, 4), b.search(xq, 4)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_torchrun_index_matches_single_process(tmp_path: Path) -> None:
    coll = make_collection(tmp_path / "coll", {"a": 21, "b": 22, "c": 23}, per_landmark=5)
    write_bad_images(coll / "a" / "bad")
    write_tiny_run(tmp_path / "run")
    args = [
        "index",
        "--model",
        tmp_path / "run",
        "--images",
        coll,
        "--chunk-size",
        "3",
        "--batch-size",
        "2",
        "--workers",
        "0",
    ]
    cli(*args, "--out", tmp_path / "single", main="_index_cli_main.py")
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            "--standalone",
            str(TESTS / "_index_cli_main.py"),
            *map(str, args),
            "--out",
            str(tmp_path / "dist"),
        ],
        check=True,
        env=ENV,
        timeout=180,
        capture_output=True,
    )
    a, b = LandmarkIndex.load(tmp_path / "single"), LandmarkIndex.load(tmp_path / "dist")
    assert a.ids == b.ids and len(a) == 15
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    assert len(read_csv(tmp_path / "dist" / "skipped.csv")) == 3


def test_unlabelled_retrieval_index_and_rerank_hook(data: Path, tmp_path: Path) -> None:
    ix = tmp_path / "retrieval"
    res = cli(
        "index",
        "--model",
        data / "run",
        "--images",
        data / "nonlm",
        "--out",
        ix,
        "--unlabelled",
        "--workers",
        "0",
    )
    assert "indexed 8 images of 0 landmarks" in res.stdout
    cli(
        "recognize",
        "--index",
        ix,
        data / "nonlm" / "n3.jpg",
        "--out",
        tmp_path / "p.csv",
        "--retrieval",
        tmp_path / "r.csv",
        "--neighbours",
        tmp_path / "n.jsonl",
        "--workers",
        "0",
    )
    assert read_csv(tmp_path / "p.csv") == [{"id": "n3", "landmarks": ""}]
    assert read_csv(tmp_path / "r.csv")[0]["images"].split()[0] == "n3"
    row = json.loads((tmp_path / "n.jsonl").read_text())
    assert row["landmark"] is None and row["neighbours"][0]["landmark"] == ""
    res = cli(
        "recognize",
        "--index",
        ix,
        data / "nonlm",
        "--out",
        tmp_path / "q.csv",
        "--rerank",
        "local",
        check=False,
    )
    assert res.returncode == 2 and "re-ranker" in res.stderr
    res = cli(
        "index", "--model", data / "run", "--images", data / "nonlm", "--out", tmp_path / "x", check=False
    )
    assert res.returncode == 2 and "--unlabelled" in res.stderr
