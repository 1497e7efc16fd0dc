"""Corrupt or foreign files on every verb: exit 2, one line naming the file and what is wrong, no traceback.

The 38 failing cases of issue 11 (and a few neighbours), built here from a tiny random-init run and index:
each case corrupts one file of a fresh copy and runs ``landmarks VERB`` in this process.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _index_support import make_collection, pattern, save_jpeg, view
from landmarks.extract import ExtractConfig
from landmarks.pipeline import build_index

GARBAGE = bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8))


def make_run(path: Path) -> Path:
    import torch

    from landmarks.checkpoint import save_model
    from landmarks.config import to_dict
    from landmarks.data.transforms import Preprocess
    from landmarks.models.net import LandmarkNet, ModelConfig

    torch.manual_seed(0)
    conf = ModelConfig(backbone="test_resnet", embedding_dim=32)
    save_model(
        path,
        LandmarkNet(conf, num_classes=2),
        {
            "config": {"model": to_dict(conf)},
            "classes": {},
            "num_classes": 2,
            "preprocessing": Preprocess(32).to_dict(),
        },
    )
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    make_run(root / "run")
    make_collection(root / "coll", {"a": 1, "b": 2}, per_landmark=2)
    make_collection(root / "new", {"c": 3}, per_landmark=1)
    save_jpeg(view(pattern(1), 99), root / "queries" / "q.jpg")
    build_index(
        root / "run",
        root / "coll",
        root / "index",
        extract_conf=ExtractConfig(num_workers=0),
        show_progress=False,
    )
    (root / "latin1.csv").write_bytes("id,url,landmark_id\ncaf\xe9,,1\n".encode("latin-1"))
    (root / "latin1.txt").write_bytes("queries/q.jpg\n# caf\xe9\n".encode("latin-1"))
    (root / "ids.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "train_clean.csv").write_text("landmark_id,images\n1,aaa bbb\n2\n")
    ex = Image.Exif()
    ex[0x010F] = "Cam"
    ex[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(view(pattern(1), 5)).save(buf, "JPEG", exif=ex.tobytes())
    # tag 0x0125 (a LONG) given as ASCII: Pillow's EXIF code raised struct.error on it
    (root / "exif.jpg").write_bytes(buf.getvalue().replace(b"\x01\x0f\x00\x02", b"\x01\x25\x00\x02", 1))
    save_jpeg(view(pattern(1), 6), root / "ok.jpg")
    (root / "a-file").write_text("not a folder")
    return root


def data_dir(ix: Path) -> Path:
    return next(p for p in ix.iterdir() if p.name.startswith("data-"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def garbage(path: Path) -> None:
    path.write_bytes(GARBAGE)


Mutation = Callable[[Path], Path]  # corrupts the copy rooted at its argument, returns the file to be named


def index_file(name: str, how: Callable[[Path], None]) -> Mutation:
    def mutate(root: Path) -> Path:
        ix = root / "index"
        f = ix / name if name == "meta.json" else data_dir(ix) / name
        how(f)
        return f

    return mutate


def remove(path: Path) -> None:
    path.unlink()


def run_file(name: str, how: Callable[[Path], None]) -> Mutation:
    def mutate(root: Path) -> Path:
        how(root / "run" / name)
        return root / "run" / name

    return mutate


def empty(path: Path) -> None:
    path.write_bytes(b"")


def fake_text(path: Path) -> None:
    path.write_text("this is not a safetensors file\n")


def no_preprocessing(path: Path) -> None:
    import json

    meta = json.loads(path.read_text())
    del meta["preprocessing"]
    path.write_text(json.dumps(meta))


def named(rel: str) -> Mutation:
    return lambda root: root / rel


INDEX_CORRUPTIONS = {
    "meta.json truncated": index_file("meta.json", truncate),
    "meta.json garbage": index_file("meta.json", garbage),
    "images.json truncated": index_file("images.json", truncate),
    "images.json garbage": index_file("images.json", garbage),
    "faiss.index truncated": index_file("faiss.index", truncate),
    "faiss.index garbage": index_file("faiss.index", garbage),
    "embeddings.npy truncated": index_file("embeddings.npy", truncate),
    "embeddings.npy garbage": index_file("embeddings.npy", garbage),
    "penalty.npy missing": index_file("penalty.npy", remove),
}
INDEX_VERBS = {
    "recognize": [
        "recognize",
        "--index",
        "{root}/index",
        "{root}/queries",
        "--out",
        "{root}/p.csv",
        "--workers",
        "0",
    ],
    "remove": ["remove", "{root}/index", "a/a_0"],
    "add": ["add", "{root}/index", "{root}/new", "--workers", "0"],
    "serve": ["serve", "--index", "{root}/index", "--port", "0"],
}
INDEX_CMD = [
    "index",
    "--model",
    "{root}/run",
    "--images",
    "{root}/coll",
    "--out",
    "{root}/ix2",
    "--workers",
    "0",
]

CASES: list[tuple[str, list[str], Mutation]] = [
    (f"{verb}: {what}", argv, mutate)
    for what, mutate in INDEX_CORRUPTIONS.items()
    for verb, argv in INDEX_VERBS.items()
] + [
    ("index: fake model.safetensors", INDEX_CMD, run_file("model.safetensors", fake_text)),
    ("index: empty model.safetensors", INDEX_CMD, run_file("model.safetensors", empty)),
    ("index: truncated model.safetensors", INDEX_CMD, run_file("model.safetensors", truncate)),
    ("index: run meta.json truncated", INDEX_CMD, run_file("meta.json", truncate)),
    ("index: run meta.json without preprocessing", INDEX_CMD, run_file("meta.json", no_preprocessing)),
    ("recognize: fake model.safetensors", INDEX_VERBS["recognize"], run_file("model.safetensors", fake_text)),
    (
        "index: non-UTF-8 CSV",
        [*INDEX_CMD[:3], "--images", "{root}/latin1.csv", *INDEX_CMD[5:]],
        named("latin1.csv"),
    ),
    (
        "index: short train_clean.csv row",
        [*INDEX_CMD[:3], "--images", "{root}/train_clean.csv", *INDEX_CMD[5:]],
        named("train_clean.csv"),
    ),
    (
        "recognize: non-UTF-8 list file",
        [
            "recognize",
            "--index",
            "{root}/index",
            "{root}/latin1.txt",
            "--out",
            "{root}/p.csv",
            "--workers",
            "0",
        ],
        named("latin1.txt"),
    ),
    (
        "recognize: missing list file",
        [
            "recognize",
            "--index",
            "{root}/index",
            "{root}/missing.txt",
            "--out",
            "{root}/p.csv",
            "--workers",
            "0",
        ],
        named("missing.txt"),
    ),
    ("remove: non-UTF-8 id file", ["remove", "{root}/index", "{root}/ids.txt"], named("ids.txt")),
    ("match: JPEG with corrupt EXIF", ["match", "{root}/exif.jpg", "{root}/ok.jpg"], named("exif.jpg")),
    ("demo: --out is a file", ["demo", "--out", "{root}/a-file"], named("a-file")),
]


@pytest.mark.parametrize("argv,mutate", [(a, m) for _, a, m in CASES], ids=[c[0] for c in CASES])
def test_bad_file_is_one_line_exit_2(
    base: Path, tmp_path: Path, argv: list[str], mutate: Mutation, monkeypatch: pytest.MonkeyPatch
) -> None:
    import landmarks.serve
    from landmarks.cli import main

    def must_not_serve(*a: object, **k: object) -> None:
        raise AssertionError("the corrupt index was loaded and served")

    monkeypatch.setattr(landmarks.serve, "serve", must_not_serve)
    root = tmp_path / "case"
    shutil.copytree(base, root, symlinks=True)
    # the index records its model by absolute path: point it at this copy's run
    meta = root / "index" / "meta.json"
    meta.write_text(meta.read_text().replace(str(base / "run"), str(root / "run")))
    culprit = mutate(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-q", *[a.format(root=root) for a in argv]])
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert code == 2, (code, out.getvalue(), err.getvalue())
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert lines[0].startswith(f"landmarks {argv[0]}: error: ") and str(culprit.name) in lines[0], lines[0]


def test_the_table_covers_the_38_cases_of_issue_11() -> None:
    assert len(CASES) >= 38
