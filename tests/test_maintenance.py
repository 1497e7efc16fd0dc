"""One writer per index: the writer lock, concurrent adds, generations, add/remove stages.

CLI writers run as subprocesses through ``_index_cli_main.py`` (the tiny embedder stands in for a trained
run), so the lock is exercised between real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _index_support import TinyEmbedder, make_collection, write_tiny_run
from landmarks.data.collection import ImageRecord, load_folder_collection
from landmarks.extract import ExtractConfig
from landmarks.index import LandmarkIndex
from landmarks.maintenance import (
    IndexBusyError,
    IndexConflictError,
    add_to_index,
    describe_holder,
    index_generation,
    index_writer,
    remove_from_index,
)
from landmarks.pipeline import build_index

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli_proc(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TESTS / "_index_cli_main.py"), *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


@pytest.fixture()
def ix(tmp_path: Path) -> Path:
    run = write_tiny_run(tmp_path / "run")
    make_collection(tmp_path / "coll", {"a": 1, "b": 2}, per_landmark=3)
    return build_index(
        TinyEmbedder.from_run(run),
        tmp_path / "coll",
        tmp_path / "ix",
        extract_conf=ExtractConfig(num_workers=0),
        show_progress=False,
    )


def test_second_writer_is_refused_naming_the_holder(ix: Path) -> None:
    with index_writer(ix, "first writer"):
        assert describe_holder(ix) == f"{os.getpid()} first writer"
        with pytest.raises(
            IndexBusyError, match=rf"index .* is being written by PID {os.getpid()} \(first writer\)"
        ):
            with index_writer(ix, "second"):
                pass
    assert describe_holder(ix) is None
    with index_writer(ix, "after"):  # released
        pass


def test_waiting_writer_gets_the_lock_after_the_holder_releases(ix: Path) -> None:
    order: list[str] = []
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with index_writer(ix, "holder"):
            held.set()
            release.wait(30)
            order.append("holder done")

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    with pytest.raises(IndexBusyError):
        with index_writer(ix, "impatient", wait_s=0.2):
            pass
    release.set()
    with index_writer(ix, "patient", wait_s=30):
        order.append("patient")
    t.join(30)
    assert order == ["holder done", "patient"]


def test_a_killed_holder_leaves_the_index_unlocked(ix: Path) -> None:
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from landmarks.maintenance import index_writer\n"
        "with index_writer(sys.argv[2], 'sleeper'):\n    print('held', flush=True); time.sleep(120)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(TESTS.parent / "src"), str(ix)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        assert describe_holder(ix) == f"{p.pid} sleeper"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    with index_writer(ix, "next"):
        pass


def test_cli_add_is_refused_while_another_process_writes(ix: Path, tmp_path: Path) -> None:
    new = make_collection(tmp_path / "new", {"c": 3}, per_landmark=2)
    with index_writer(ix, "test holder"):
        p = cli_proc("add", ix, new, "--workers", "0")
        out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    lines = [x for x in err.splitlines() if x.strip() and " INFO " not in x]
    assert lines == [
        f"landmarks add: error: index {ix} is being written by PID {os.getpid()} (test holder); "
        "try again when it has finished (or pass --wait SECONDS)"
    ]
    assert len(LandmarkIndex.load(ix)) == 6


def test_concurrent_cli_adds_lose_nothing(ix: Path, tmp_path: Path) -> None:
    """Two ``landmarks add --wait`` at once (the probe of issue 11 lost one side in 5 of 5 trials)."""
    a = make_collection(tmp_path / "na", {"c": 3}, per_landmark=3)
    b = make_collection(tmp_path / "nb", {"d": 4}, per_landmark=3)
    g0 = index_generation(ix)
    procs = [cli_proc("add", ix, src, "--workers", "0", "--wait", "120") for src in (a, b)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.startswith("added 3 images (1 new landmarks)")
    index = LandmarkIndex.load(ix)
    assert len(index) == 12 and sorted(set(index.landmarks)) == ["a", "b", "c", "d"]
    assert index_generation(ix) == g0 + 2 and index.faiss_index.ntotal == 12


def test_add_starts_from_the_disk_not_from_a_stale_copy(ix: Path, tmp_path: Path) -> None:
    from landmarks.recognize import Recognizer

    rec = Recognizer.load(ix, embedder=TinyEmbedder.from_run(tmp_path / "run"))  # a long-lived reader
    other = make_collection(tmp_path / "other", {"c": 3}, per_landmark=2)
    mine = make_collection(tmp_path / "mine", {"d": 4}, per_landmark=2)
    add_to_index(ix, load_folder_collection(other), rec.embedder, num_workers=0, show_progress=False)
    newer = rec.load_newer()  # the reader notices the newer generation ...
    assert newer is not None and newer.generation == rec.generation + 1 and len(newer) == 8
    res = rec.add(
        load_folder_collection(mine), num_workers=0, show_progress=False
    )  # ... and never writes from its copy
    assert len(res.index) == 10 and len(LandmarkIndex.load(ix)) == 10 and len(rec.index) == 10
    assert rec.load_newer() is None
    assert not rec.replace_index(newer)  # an older generation never replaces a newer one


def test_relabelling_on_add_is_refused_and_remove_by_landmark(ix: Path, tmp_path: Path) -> None:
    index = LandmarkIndex.load(ix)
    first = index.ids[0]
    path = Path(str(index.paths[0]))
    with pytest.raises(IndexConflictError, match=rf"{first} \(indexed as a, given zz\)"):
        add_to_index(
            ix, [ImageRecord(first, path, "zz")], TinyEmbedder.from_run(tmp_path / "run"), num_workers=0
        )
    same = add_to_index(
        ix, [ImageRecord(first, path, "a")], TinyEmbedder.from_run(tmp_path / "run"), num_workers=0
    )
    assert same.added == [] and same.known == [first] and same.generation == index.generation
    res = remove_from_index(ix, ["b"], landmarks=True)
    assert sorted(res.removed) == sorted(i for i, lm in zip(index.ids, index.landmarks) if lm == "b")
    assert set(LandmarkIndex.load(ix).landmarks) == {"a"}
    with pytest.raises(Exception, match="not in"):
        remove_from_index(ix, ["nope"])
    assert remove_from_index(ix, ["nope"], missing_ok=True).missing == ["nope"]
