"""Revisited Oxford/Paris end to end: the revisitop layout written here, hand-computed mAPs, a refused pickle.

The images are solid colours whose red level encodes a code; :class:`ColourEmbedder` maps each code to a
designed vector, so every similarity, every ranking and every mAP below is known by hand. A query image
is its box's colour inside a frame of another colour: only a query cropped to its box gets its code.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import landmarks.extract
from landmarks.cli import main
from landmarks.data.revisited import crop_box, find_dataset, read_gnd, restricted_loads
from landmarks.errors import DataFormatError
from landmarks.expansion import ExpansionConfig, database_side_augmentation, exact_search, query_expansion
from landmarks.extract import ExtractConfig
from landmarks.metrics import revisited_map
from landmarks.retrieval import evaluate_revisited, rank_database

# Database image j: similarity a_j to query 0 (= e0) and b_j to query 1 (= e1). Rankings by hand:
# query 0: [3, 0, 4, 1, 5, 2]; query 1: [2, 5, 0, 1, 3, 4].
A = {0: 0.6, 1: 0.4, 2: 0.2, 3: 0.7, 4: 0.5, 5: 0.3}
B = {0: 0.5, 1: 0.4, 2: 0.7, 3: 0.3, 4: 0.2, 5: 0.6}


def _unit3(a: float, b: float) -> list[float]:
    return [a, b, float(np.sqrt(1 - a * a - b * b)), 0.0]


#: code -> embedding. Codes 1..6: database; 7, 8: distractors; 9, 10: query boxes; 11: query frames.
TABLE = np.array(
    [[0, 0, 0, 1.0]]
    + [_unit3(A[j], B[j]) for j in range(6)]
    + [_unit3(0.75, 0.05), _unit3(0.05, 0.75)]
    + [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]],
    dtype=np.float32,
)


def red(code: int) -> int:
    return 20 * code + 10


class ColourPreprocess:
    def __call__(self, img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()[None]
        return torch.nn.functional.interpolate(t, size=(8, 8), mode="area")[0]


class ColourEmbedder:
    """Embeds an image as ``TABLE[round((mean red - 10) / 20)]``."""

    fingerprint = "c0100" + "0" * 35
    embedding_dim = 4
    image_size = 8
    preprocessor = ColourPreprocess()

    def preprocess(self, img: np.ndarray) -> torch.Tensor:
        return self.preprocessor(img)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        code = torch.clamp(torch.round((batch[:, 0].mean(dim=(1, 2)) - 10) / 20), 0, len(TABLE) - 1).long()
        return torch.from_numpy(TABLE)[code]

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "name": "colour", "embedding_dim": 4, "image_size": 8}


def solid(code: int, size: int = 64) -> np.ndarray:
    img = np.full((size, size, 3), 128, np.uint8)
    img[..., 0] = red(code)
    return img


GND = [
    {"bbx": [16.0, 16.0, 48.0, 48.0], "easy": [0], "hard": [1, 2], "junk": [4]},
    {"bbx": [16.0, 16.0, 48.0, 48.0], "easy": [2, 5], "hard": [], "junk": []},
]


def write_dataset(root: Path, name: str = "tinyox", fmt: str = "pkl") -> Path:
    """``root/jpg/*.jpg`` + ``root/gnd_<name>.pkl`` (numpy arrays inside, protocol 2) or ``.json``."""
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    imlist = [f"db_{j}" for j in range(6)]
    for j, im in enumerate(imlist):
        Image.fromarray(solid(j + 1)).save(root / "jpg" / f"{im}.jpg", quality=95)
    qimlist = ["query_a", "query_b"]
    for i, q in enumerate(qimlist):
        img = solid(11)
        img[16:48, 16:48, 0] = red(9 + i)
        Image.fromarray(img).save(root / "jpg" / f"{q}.jpg", quality=95)
    if fmt == "json":
        (root / f"gnd_{name}.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": GND}))
    else:
        gnd = [
            {"bbx": g["bbx"], **{k: np.asarray(g[k], dtype=np.int64) for k in ("easy", "hard", "junk")}}
            for g in GND
        ]
        (root / f"gnd_{name}.pkl").write_bytes(
            pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, protocol=2)
        )
    return root


def write_distractors(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for code in (7, 8):
        Image.fromarray(solid(code)).save(folder / f"d{code}.jpg", quality=95)
    return folder


# Hand-computed (see the comments in test_hand_computed_figures).
EXPECTED = {
    "easy": (0.625, [0.5, 0.75, 0.75]),
    "medium": ((0.5 + 7 / 6 + 1.1) / 6 / 2 + 0.5, [0.5, 0.8, 0.8]),
    "hard": (1 / 3, [0.0, 0.5, 0.5]),
}
EXPECTED_R1M = {
    "easy": (1 / 6 + 5 / 12) / 2,
    "medium": ((1 / 3 + 5 / 6 + 0.9) / 6 + 5 / 12) / 2,
    "hard": (1 / 3 + 0.65) / 4,
}


def test_hand_computed_figures() -> None:
    # Query 0 ranks [3, 0, 4, 1, 5, 2]. Easy: positives {0}, junk {4} + hard {1, 2} -> [3, 0, 5]: one
    # positive at 0-based rank 1: AP = (0/1 + 1/2) / 2 = 0.25; mP@1 = 0, mP@5 = mP@10 = 1/2 (the cut-off
    # stops at the last positive, rank 2). Medium: positives {0, 1, 2}, junk {4} -> [3, 0, 1, 5, 2]:
    # ranks 1, 2, 4: AP = ((0 + 1/2) + (1/2 + 2/3) + (2/4 + 3/5)) / 6. Hard: positives {1, 2}, junk
    # {4, 0} -> [3, 1, 5, 2]: ranks 1, 3: AP = ((0 + 1/2) + (1/3 + 2/4)) / 4 = 1/3.
    # Query 1 ranks [2, 5, 0, 1, 3, 4] with easy {2, 5} first: AP = 1 (Easy, Medium); no hard positive.
    ranks = np.array([[3, 0, 4, 1, 5, 2], [2, 5, 0, 1, 3, 4]])
    out = revisited_map(ranks, GND)
    for split, (m, mp) in EXPECTED.items():
        assert out[split]["map"] == pytest.approx(m, abs=1e-12)
        assert out[split]["mp@k"] == pytest.approx(mp, abs=1e-12)
    assert EXPECTED["medium"][0] == pytest.approx(0.7305556, abs=1e-7)


def test_protocol_end_to_end_on_revisitop_layout(tmp_path: Path) -> None:
    ds = find_dataset(write_dataset(tmp_path / "tinyox"), "tinyox")
    assert ds.gnd_path.suffix == ".pkl"
    conf = ExtractConfig(num_workers=0, batch_size=4)
    res = evaluate_revisited(ColourEmbedder(), ds, tmp_path / "work", extract_conf=conf, show_progress=False)
    assert (res.queries, res.database, res.distractors) == (2, 6, 0)
    for split, (m, mp) in EXPECTED.items():
        assert res.results[split]["map"] == pytest.approx(m, abs=1e-6)
        assert res.results[split]["mp@k"] == pytest.approx(mp, abs=1e-6)
    # +R1M: distractor 7 outranks everything for query 0, distractor 8 for query 1.
    r1m = evaluate_revisited(
        ColourEmbedder(),
        ds,
        tmp_path / "work",
        extract_conf=conf,
        show_progress=False,
        distractors=write_distractors(tmp_path / "r1m"),
    )
    assert r1m.distractors == 2
    for split, m in EXPECTED_R1M.items():
        assert r1m.results[split]["map"] == pytest.approx(m, abs=1e-6)
    # the same distractors given as extracted features
    np.save(tmp_path / "r1m.npy", TABLE[[7, 8]])
    feats = evaluate_revisited(
        ColourEmbedder(),
        ds,
        tmp_path / "work",
        extract_conf=conf,
        show_progress=False,
        distractor_features=tmp_path / "r1m.npy",
    )
    assert feats.results == r1m.results


def test_queries_are_cropped_to_their_boxes(tmp_path: Path) -> None:
    ds = find_dataset(write_dataset(tmp_path / "tinyox"), "tinyox")
    res = evaluate_revisited(
        ColourEmbedder(), ds, tmp_path / "w", extract_conf=ExtractConfig(num_workers=0), show_progress=False
    )
    crops = sorted((tmp_path / "w" / "queries").glob("*.png"))
    assert [Image.open(p).size for p in crops] == [(32, 32), (32, 32)]
    assert res.results["hard"]["map"] == pytest.approx(1 / 3)
    assert crop_box(100, 50, [-3.2, 4.7, 120.0, 49.1]) == (0, 4, 100, 50)
    assert crop_box(10, 10, [9.5, 9.5, 9.6, 9.6]) == (9, 9, 10, 10)


def test_qe_and_dba_are_applied(tmp_path: Path) -> None:
    ds = find_dataset(write_dataset(tmp_path / "tinyox"), "tinyox")
    qe = ExpansionConfig(n=6, alpha=0.0)
    res = evaluate_revisited(
        ColourEmbedder(),
        ds,
        tmp_path / "w",
        extract_conf=ExtractConfig(num_workers=0),
        show_progress=False,
        qe=qe,
    )
    xb = TABLE[1:7]
    xq = query_expansion(TABLE[[9, 10]], xb, exact_search(xb), qe)
    want = rank_database(xq, xb, 100)
    assert res.ranks is not None
    np.testing.assert_array_equal(res.ranks, want)
    assert res.results == revisited_map(want, GND)
    assert want.tolist() == [[0, 3, 1, 4, 5, 2], [5, 0, 1, 2, 3, 4]]  # average QE over the whole database
    dba = ExpansionConfig(n=1, alpha=3.0)
    res = evaluate_revisited(
        ColourEmbedder(),
        ds,
        tmp_path / "w",
        extract_conf=ExtractConfig(num_workers=0),
        show_progress=False,
        dba=dba,
    )
    assert res.ranks is not None
    np.testing.assert_array_equal(
        res.ranks, rank_database(TABLE[[9, 10]], database_side_augmentation(xb, dba), 100)
    )
    assert res.ranks[1].tolist() == [2, 5, 0, 3, 1, 4]  # db 3 took db 0's neighbour's direction


def test_json_ground_truth_gives_the_same_figures(tmp_path: Path) -> None:
    pkl = read_gnd(write_dataset(tmp_path / "a") / "gnd_tinyox.pkl")
    js = read_gnd(write_dataset(tmp_path / "b", fmt="json") / "gnd_tinyox.json")
    assert pkl.to_json() == js.to_json()
    assert js.to_json()["gnd"] == GND
    # the dataset folder may also be found from the folder above it
    write_dataset(tmp_path / "c" / "tinyox", fmt="json")
    assert find_dataset(tmp_path / "c", "tinyox").gnd_path == tmp_path / "c" / "tinyox" / "gnd_tinyox.json"
    with pytest.raises(DataFormatError, match="gnd_tinyox"):
        find_dataset(tmp_path / "nowhere", "tinyox")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_every_protocol_load(protocol: int) -> None:
    obj = {
        "a": np.arange(5, dtype=np.int64),
        "b": [np.float64(2.5), np.int32(3), None, True, ("x", 1.0)],
        "c": np.zeros((2, 3), np.float32),
        "d": np.array(["s", "t"]),
    }
    back = restricted_loads(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["b"] == obj["b"]
    np.testing.assert_array_equal(back["c"], obj["c"])
    np.testing.assert_array_equal(back["d"], obj["d"])


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class EvalEvil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return eval, ("__import__('os').getpid()",)


def test_malicious_pickle_is_refused_without_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    root = write_dataset(tmp_path / "tinyox")
    good = pickle.loads((root / "gnd_tinyox.pkl").read_bytes())  # our own file
    good["gnd"][0]["junk"] = Evil(marker)
    (root / "gnd_tinyox.pkl").write_bytes(pickle.dumps(good, protocol=2))
    with pytest.raises(DataFormatError, match=r"gnd_tinyox\.pkl: refused: global '(posix|os)\.system'"):
        read_gnd(root / "gnd_tinyox.pkl")
    assert not marker.exists()
    for evil in (EvalEvil(), {"x": Evil(marker)}):
        with pytest.raises(DataFormatError, match="refused"):
            restricted_loads(pickle.dumps(evil, protocol=4))
    # numpy globals beyond ndarray/dtype/scalar are refused too
    with pytest.raises(DataFormatError, match="numpy.load"):
        restricted_loads(b"\x80\x04cnumpy\nload\n.")
    with pytest.raises(DataFormatError, match="_codecs.encode"):
        restricted_loads(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(DataFormatError, match="not a readable pickle"):
        restricted_loads(pickle.dumps({"a": 1})[:-3], "t.pkl")
    # the CLI prints one line and exits 2, nothing runs
    monkeypatch.setattr(landmarks.extract, "load_embedder", lambda *a, **k: ColourEmbedder())
    assert main(["evaluate", "revisited", "--data", str(root), "--dataset", "tinyox", "--model", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "gnd_tinyox.pkl" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ({"imlist": ["a"], "qimlist": ["q"]}, "missing key"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1], "easy": [0]}]}, "bbx"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [3]}]}, "outside"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": []}, "one entry per query"),
    ],
)
def test_bad_ground_truth_is_named(tmp_path: Path, bad: dict[str, Any], msg: str) -> None:
    p = tmp_path / "gnd_x.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match=msg):
        read_gnd(p)


def test_cli_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_dataset(tmp_path / "tinyox")
    monkeypatch.setattr(landmarks.extract, "load_embedder", lambda *a, **k: ColourEmbedder())
    base = [
        "evaluate",
        "revisited",
        "--data",
        str(root),
        "--dataset",
        "tinyox",
        "--model",
        "x",
        "--workers",
        "0",
    ]
    assert main([*base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"]["medium"]["map"] == pytest.approx(EXPECTED["medium"][0], abs=1e-6)
    assert out["results"]["hard"]["mp@k"] == pytest.approx(EXPECTED["hard"][1], abs=1e-6)
    assert main([*base, "--distractors", str(write_distractors(tmp_path / "d"))]) == 0
    text = capsys.readouterr().out
    assert "tinyox+R1M" in text
    easy = next(line for line in text.splitlines() if line.startswith("Easy"))
    assert f"{100 * EXPECTED_R1M['easy']:.2f}" in easy


def test_cli_with_an_index_uses_its_model_and_whitening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from landmarks.index import LandmarkIndex
    from landmarks.whiten import WhitenConfig

    root = write_dataset(tmp_path / "tinyox")
    rng = np.random.default_rng(0)
    rows = TABLE[rng.integers(0, len(TABLE), 40)] + 0.05 * rng.normal(size=(40, 4)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    desc = {**ColourEmbedder().describe(), "source": str(tmp_path)}
    LandmarkIndex.build(
        rows, [f"i{j}" for j in range(40)], ["a"] * 40, model=desc, whiten=WhitenConfig()
    ).save(tmp_path / "ix")
    index = LandmarkIndex.load(tmp_path / "ix")
    assert index.whitening is not None
    monkeypatch.setattr(landmarks.extract, "load_embedder", lambda *a, **k: ColourEmbedder())
    assert (
        main(
            [
                "evaluate",
                "revisited",
                "--data",
                str(root),
                "--dataset",
                "tinyox",
                "--index",
                str(tmp_path / "ix"),
                "--workers",
                "0",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)["results"]
    want = evaluate_revisited(
        ColourEmbedder(),
        find_dataset(root, "tinyox"),
        tmp_path / "w",
        extract_conf=ExtractConfig(num_workers=0),
        show_progress=False,
        project=index.project,
    )
    assert got == want.to_json()["results"]
    xb = index.project(TABLE[1:7])
    xq = index.project(TABLE[[9, 10]])
    assert want.results == revisited_map(rank_database(xq, xb, 100), GND)
