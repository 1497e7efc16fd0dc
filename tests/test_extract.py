"""Batched, chunked, resumable extraction (landmarks.extract) with a tiny deterministic embedder."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _index_support import TinyEmbedder, make_collection, write_bad_images
from landmarks.data.collection import ImageRecord, load_folder_collection
from landmarks.data.decode import decode_image
from landmarks.errors import IncompatibleArtifactError
from landmarks.extract import (
    MULTISCALE,
    Embedder,
    ExtractConfig,
    embed_batch,
    embed_images,
    extract_embeddings,
    extract_resumable,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRecord]:
    root = make_collection(tmp_path_factory.mktemp("coll"), {"a": 1, "b": 2, "c": 3}, per_landmark=5)
    return load_folder_collection(root)


def _oracle(emb: TinyEmbedder, records: list[ImageRecord], conf: ExtractConfig) -> np.ndarray:
    imgs = [decode_image(r.path, min_side_px=emb.image_size) for r in records]
    return embed_images(emb, imgs, conf)


def test_tiny_embedder_is_an_embedder() -> None:
    assert isinstance(TinyEmbedder(), Embedder)


def test_embed_batch_views_match_loop() -> None:
    emb = TinyEmbedder(dim=16)
    x = torch.randn(3, 3, 32, 32)
    one = embed_batch(emb, x)
    assert torch.allclose(one, emb.embed(x), atol=1e-6)
    assert torch.allclose(one.norm(dim=1), torch.ones(3), atol=1e-5)
    both = embed_batch(emb, x, MULTISCALE, flip=True)
    total = torch.zeros(3, 16)
    for s in MULTISCALE:
        for i in range(3):
            xi = x[i : i + 1]
            if s != 1.0:
                size = round(32 * s)
                xi = F.interpolate(
                    xi, size=(size, size), mode="bilinear", align_corners=False, antialias=s < 1
                )
            total[i] += emb.embed(xi)[0] + emb.embed(xi.flip(-1))[0]
    assert torch.allclose(both, F.normalize(total, dim=1), atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_extraction_matches_in_memory_embedding(
    collection: list[ImageRecord], tmp_path: Path, workers: int
) -> None:
    emb = TinyEmbedder()
    conf = ExtractConfig(batch_size=4, chunk_size=6, num_workers=workers, flip=True)
    res = extract_embeddings(emb, collection, tmp_path / "out", conf, show_progress=False)
    assert res.ids == [r.id for r in collection]
    assert res.rows.tolist() == list(range(len(collection)))
    assert res.embeddings.dtype == np.float32 and res.embeddings.shape == (len(collection), 32)
    np.testing.assert_allclose(res.embeddings, _oracle(emb, collection, conf), atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out" / "chunks").iterdir()) == [
        f"{c:05d}.{ext}" for c in range(3) for ext in ("json", "npy")
    ]


def test_resume_redoes_only_missing_chunks(collection: list[ImageRecord], tmp_path: Path) -> None:
    conf = ExtractConfig(batch_size=2, chunk_size=4, num_workers=0)
    full = extract_embeddings(TinyEmbedder(), collection, tmp_path / "full", conf, show_progress=False)

    class Crash(TinyEmbedder):
        def embed(self, batch: torch.Tensor) -> torch.Tensor:
            if self.calls == 5:  # dies in the third chunk
                raise KeyboardInterrupt
            return super().embed(batch)

    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(Crash(), collection, tmp_path / "part", conf, show_progress=False)
    chunks = tmp_path / "part" / "chunks"
    assert sorted(p.name for p in chunks.glob("*.json")) == ["00000.json", "00001.json"]
    assert not list(chunks.glob(".*"))  # no temporary files left behind
    mtime = (chunks / "00000.npy").stat().st_mtime_ns
    again = TinyEmbedder()
    res = extract_embeddings(again, collection, tmp_path / "part", conf, show_progress=False)
    assert again.calls == 4  # 15 images, 4 per chunk: chunks 2 and 3 = 7 images = 4 batches of <= 2
    assert (chunks / "00000.npy").stat().st_mtime_ns == mtime
    assert res.ids == full.ids
    np.testing.assert_array_equal(res.embeddings, full.embeddings)


def test_bad_images_are_skipped_and_logged(collection: list[ImageRecord], tmp_path: Path) -> None:
    bad = write_bad_images(tmp_path / "bad")
    missing = tmp_path / "bad" / "missing.jpg"
    records = list(collection[:3]) + [ImageRecord(f"bad{i}", p, "x") for i, p in enumerate(bad)]
    records += [ImageRecord("missing", missing, "x")] + list(collection[3:6])
    res = extract_embeddings(
        TinyEmbedder(),
        records,
        tmp_path / "out",
        ExtractConfig(batch_size=3, chunk_size=4, num_workers=1),
        show_progress=False,
    )
    good = [r.id for r in records if not r.id.startswith(("bad", "missing"))]
    assert res.ids == good
    assert len(res.skipped) == 4
    with open(tmp_path / "out" / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"] for r in rows} == {str(p) for p in [*bad, missing]}
    reasons = {Path(r["path"]).name: r["reason"] for r in rows}
    assert "empty" in reasons["empty.jpg"] and "not found" in reasons["missing.jpg"]
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]


def test_all_bad_chunk_and_other_inputs_refused(tmp_path: Path, collection: list[ImageRecord]) -> None:
    bad = write_bad_images(tmp_path / "bad")
    records = [ImageRecord(f"bad{i}", p, "x") for i, p in enumerate(bad)] + list(collection[:2])
    conf = ExtractConfig(batch_size=2, chunk_size=3, num_workers=0)
    res = extract_embeddings(TinyEmbedder(), records, tmp_path / "out", conf, show_progress=False)
    assert res.ids == [r.id for r in collection[:2]]
    with pytest.raises(IncompatibleArtifactError, match="other inputs or settings"):
        extract_embeddings(TinyEmbedder(seed=1), records, tmp_path / "out", conf, show_progress=False)
    with pytest.raises(IncompatibleArtifactError, match="flip"):
        extract_embeddings(
            TinyEmbedder(),
            records,
            tmp_path / "out",
            ExtractConfig(batch_size=2, chunk_size=3, num_workers=0, flip=True),
            show_progress=False,
        )
    res2 = extract_embeddings(
        TinyEmbedder(seed=1), records, tmp_path / "out", conf, overwrite=True, show_progress=False
    )
    assert res2.ids == res.ids and not np.allclose(res2.embeddings, res.embeddings)
    # a private work folder (queries, `add`) starts over instead of refusing
    res3 = extract_resumable(TinyEmbedder(), records, tmp_path / "out", conf, show_progress=False)
    np.testing.assert_array_equal(res3.embeddings, res.embeddings)


_DIST_SCRIPT = """
import sys, json
sys.path.insert(0, {tests!r})
import numpy as np, torch
torch.set_num_threads(1)
from _index_support import TinyEmbedder
from landmarks.data.collection import load_folder_collection
from landmarks.extract import ExtractConfig, extract_embeddings
recs = load_folder_collection({root!r})
res = extract_embeddings(TinyEmbedder(), recs, {out!r}, ExtractConfig(batch_size=2, chunk_size=3, num_workers=0),
                         show_progress=False)
import os
np.save({out!r} + f"/result-{{os.environ['RANK']}}.npy", res.embeddings)
"""


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(collection: list[ImageRecord], tmp_path: Path) -> None:
    root = str(collection[0].path.parent.parent)
    script = tmp_path / "dist.py"
    out = tmp_path / "dist"
    script.write_text(_DIST_SCRIPT.format(tests=str(Path(__file__).parent), root=root, out=str(out)))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--standalone", str(script)],
        check=True,
        env=env,
        timeout=180,
        capture_output=True,
    )
    single = extract_embeddings(
        TinyEmbedder(),
        collection,
        tmp_path / "single",
        ExtractConfig(batch_size=2, chunk_size=3, num_workers=0),
        show_progress=False,
    )
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(out / f"result-{rank}.npy"), single.embeddings)


# --- real timm models with DataLoader workers -------------------------------------------------------------


def _save_random_run(run: Path, backbone: str, size: int = 64) -> int:
    """A run folder holding an untrained LandmarkNet on ``backbone``; returns its number of tensors."""
    import dataclasses
    import json

    from landmarks import checkpoint as ckpt
    from landmarks.data.transforms import Preprocess
    from landmarks.models.net import LandmarkNet, ModelConfig

    conf = ModelConfig(backbone=backbone, embedding_dim=32)
    torch.manual_seed(0)
    net = LandmarkNet(conf, num_classes=3, class_counts=[1, 1, 1])
    meta = {
        "config": {"model": json.loads(json.dumps(dataclasses.asdict(conf)))},
        "num_classes": 3,
        "classes": [{"landmark": c, "count": 1} for c in "abc"],
        "preprocessing": Preprocess(size).to_dict(),
    }
    ckpt.save_model(run, net, meta)
    return len(net.state_dict())


def _preset_backbones() -> list[str]:
    from landmarks.models.presets import PRESETS

    return sorted({p["model"]["backbone"] for p in PRESETS.values()} | {"tf_efficientnet_lite0"})


@pytest.mark.parametrize("backbone", _preset_backbones())
def test_real_models_index_with_workers(backbone: str, tmp_path: Path) -> None:
    """The DataLoader workers receive the preprocessor only: a model of hundreds of tensors (EfficientNet)
    once travelled to every worker as file descriptors through the forkserver ("too many fds")."""
    from landmarks.extract import load_embedder

    records = load_folder_collection(make_collection(tmp_path / "c", {"a": 1, "b": 2}, per_landmark=3))
    n_tensors = _save_random_run(tmp_path / "run", backbone)
    if backbone == "tf_efficientnet_lite0":
        assert n_tensors >= 300
    emb = load_embedder(tmp_path / "run")
    res = extract_embeddings(
        emb, records, tmp_path / "out", ExtractConfig(batch_size=4, num_workers=2), show_progress=False
    )
    assert res.embeddings.shape == (6, 32)
    direct = embed_images(emb, [decode_image(r.path) for r in records])
    np.testing.assert_allclose(res.embeddings, direct, atol=1e-4)


def test_index_cli_killed_then_resumed_with_efficientnet(tmp_path: Path) -> None:
    """`landmarks index` with workers on EfficientNet-Lite0: SIGKILL mid-run, the same command resumes."""
    import signal
    import time

    make_collection(tmp_path / "c", {f"l{i}": i for i in range(4)}, per_landmark=8)
    _save_random_run(tmp_path / "run", "tf_efficientnet_lite0")
    cmd = [
        sys.executable,
        "-m",
        "landmarks",
        "index",
        "--model",
        str(tmp_path / "run"),
        "--images",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "idx"),
        "--workers",
        "2",
        "--batch-size",
        "2",
        "--chunk-size",
        "4",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = tmp_path / "idx" / "work" / "images" / "chunks"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not list(chunks.glob("*.npy")):
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "too many fds" not in out.stderr
    assert "indexed 32 images of 4 landmarks" in out.stdout
