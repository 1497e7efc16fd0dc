"""The synthetic GLDv2-shaped dataset: long tail, CSVs consistent with the files, determinism, resumption,
out-of-domain share, and the projective renderer against a plain homography."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import TINY_SYNTH
from landmarks.cli import main
from landmarks.data import synth_render as R
from landmarks.data.collection import gldv2_image_path, load_collection, load_gldv2_csv, load_image_folder
from landmarks.data.decode import decode_image
from landmarks.data.synth import SynthConfig, generate, load_config, make_plan, sample_class_counts
from landmarks.errors import ConfigError, LandmarksError


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- the long tail ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 1000, 20000])
@pytest.mark.parametrize("seed", [0, 1])
def test_class_counts_follow_gldv2_long_tail(n: int, seed: int) -> None:
    c = sample_class_counts(n, np.random.default_rng(seed))
    assert c.shape == (n,) and c.dtype == np.int64
    tol = 0.011 if n == 100 else 0.003
    assert abs((c <= 5).mean() - 0.38) <= tol  # GLDv2: ~38% of landmarks with <= 5 images
    assert abs((c <= 10).mean() - 0.57) <= tol  # ~57% with <= 10
    assert c.min() >= 2
    assert 0.02 <= (c >= 100).mean() <= 0.06 and c.max() >= 150  # a few with hundreds
    assert 18 <= c.mean() <= 26  # ~2,200 training images for 100 landmarks
    assert np.array_equal(c, sample_class_counts(n, np.random.default_rng(seed)))


# --- the tiny dataset on disk -----------------------------------------------------------------------


def test_tiny_dataset_csvs_match_files(tiny_synth: Path) -> None:
    root = tiny_synth
    hexid = re.compile(r"^[0-9a-f]{16}$")
    train = _rows(root / "train.csv")
    assert list(train[0]) == ["id", "url", "landmark_id"]
    clean = _rows(root / "train_clean.csv")
    assert list(clean[0]) == ["landmark_id", "images"]
    from_clean = {i: r["landmark_id"] for r in clean for i in r["images"].split()}
    assert from_clean == {r["id"]: r["landmark_id"] for r in train}
    assert len({r["landmark_id"] for r in train}) == TINY_SYNTH["n_landmarks"]
    assert all(r["landmark_id"].isdigit() for r in train)
    index = [r["id"] for r in _rows(root / "index.csv")]
    test = [r["id"] for r in _rows(root / "test.csv")]
    assert len(test) == TINY_SYNTH["n_queries"]
    expected = {gldv2_image_path(root, "train", r["id"]) for r in train}
    expected |= {gldv2_image_path(root, "index", i) for i in index}
    expected |= {gldv2_image_path(root, "test", i) for i in test}
    nonlm = sorted((root / "nonlandmarks").iterdir())
    assert len(nonlm) == TINY_SYNTH["n_nonlandmarks"]
    on_disk = {p for p in root.rglob("*.jpg")}
    assert on_disk == expected | set(nonlm)  # every image listed once, nothing else
    assert not list(root.rglob("*.tmp"))
    all_ids = [r["id"] for r in train] + index + test + [p.stem for p in nonlm]
    assert len(set(all_ids)) == len(all_ids) and all(hexid.match(i) for i in all_ids)
    # recognition solution: every test id once; landmarks from the training set or empty
    sol = _rows(root / "recognition_solution.csv")
    assert list(sol[0]) == ["id", "landmarks", "Usage"]
    assert sorted(r["id"] for r in sol) == sorted(test)
    train_lms = {r["landmark_id"] for r in train}
    assert all(r["landmarks"] == "" or r["landmarks"] in train_lms for r in sol)
    assert {r["Usage"] for r in sol} == {"Public", "Private"}
    # retrieval solution: the landmark queries, each with index ids of its landmark
    ret = _rows(root / "retrieval_solution.csv")
    assert list(ret[0]) == ["id", "images", "Usage"]
    lm_queries = {r["id"]: r["landmarks"] for r in sol if r["landmarks"]}
    assert {r["id"] for r in ret} == set(lm_queries)
    index_set = set(index)
    by_lm: dict[str, set[str]] = {}
    for r in ret:
        ids = r["images"].split()
        assert ids and set(ids) <= index_set
        by_lm.setdefault(lm_queries[r["id"]], set()).update(ids)
        assert r["Usage"] == next(s["Usage"] for s in sol if s["id"] == r["id"])
    sets = list(by_lm.values())
    assert all(
        not (a & b) for k, a in enumerate(sets) for b in sets[k + 1 :]
    )  # landmarks own disjoint images
    # the collection loaders read it as GLDv2
    assert len(load_gldv2_csv(root / "train.csv")) == len(train)
    assert {r.landmark for r in load_collection(root / "train_clean.csv")} == train_lms
    assert all(r.path.is_file() for r in load_gldv2_csv(root / "index.csv"))
    assert len(load_image_folder(root / "nonlandmarks")) == TINY_SYNTH["n_nonlandmarks"]


def test_tiny_dataset_statistics_and_ood_share(tiny_synth: Path) -> None:
    info = json.loads((tiny_synth / "synth.json").read_text())
    assert info["config"] == {**SynthConfig().__dict__, **TINY_SYNTH}
    st = info["statistics"]
    sol = _rows(tiny_synth / "recognition_solution.csv")
    n_ood = sum(1 for r in sol if not r["landmarks"])
    assert n_ood == round(TINY_SYNTH["n_queries"] * TINY_SYNTH["ood_fraction"]) == st["test"]["out_of_domain"]
    assert st["test"]["out_of_domain_share"] == pytest.approx(n_ood / len(sol))
    assert st["images"]["train"] == len(_rows(tiny_synth / "train.csv"))
    assert sum(st["long_tail_histogram"].values()) == TINY_SYNTH["n_landmarks"]
    assert st["train_images_per_landmark"]["max"] <= TINY_SYNTH["max_train_per_landmark"]
    kinds = st["kinds"]["test"]
    assert kinds["landmark"] == len(sol) - n_ood and sum(kinds.values()) == len(sol)


def test_images_decode_at_the_requested_size(tiny_synth: Path) -> None:
    paths = sorted(tiny_synth.rglob("*.jpg"))[::7]
    shapes = set()
    for p in paths:
        img = decode_image(p)
        assert max(img.shape[:2]) == TINY_SYNTH["size"] and img.dtype == np.uint8
        assert img.std() > 3  # not blank
        shapes.add(img.shape)
    assert len(shapes) > 1  # several aspect ratios


def test_same_seed_same_bytes_with_any_worker_count(tiny_synth: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", load_config(dict(TINY_SYNTH)), workers=2, progress=False)
    assert _digest_tree(tmp_path / "again") == _digest_tree(tiny_synth)


def test_other_seed_other_dataset() -> None:
    a = make_plan(Path("a"), load_config(dict(TINY_SYNTH)))
    b = make_plan(Path("a"), load_config({**TINY_SYNTH, "seed": 1}))
    assert not set(a.ids.values()) & set(b.ids.values())
    assert a.landmark_ids != b.landmark_ids


def test_more_queries_leave_training_images_alone() -> None:
    a = make_plan(Path("a"), load_config(dict(TINY_SYNTH)))
    b = make_plan(Path("a"), load_config({**TINY_SYNTH, "n_queries": 80, "ood_fraction": 0.5}))
    assert [j for j in a.jobs if j.split == "train"] == [j for j in b.jobs if j.split == "train"]
    assert a.landmark_ids == b.landmark_ids


def test_killed_run_is_completed_identically(tiny_synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(tiny_synth, out)
    jpgs = sorted(out.rglob("*.jpg"))
    for p in jpgs[::9]:
        p.unlink()
    for name in ("train.csv", "recognition_solution.csv", "synth.json"):
        (out / name).unlink()
    stale = jpgs[0].with_name(f".{jpgs[0].name}.999.tmp")
    stale.write_bytes(b"half a jpeg")
    generate(out, load_config(dict(TINY_SYNTH)), workers=1, progress=False)
    assert _digest_tree(out) == _digest_tree(tiny_synth)


def test_output_folder_guards(tiny_synth: Path, tmp_path: Path) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(LandmarksError, match="not a synthetic dataset"):
        generate(other, SynthConfig(n_landmarks=2), workers=1, progress=False)
    assert (other / "holiday.jpg").exists()
    out = tmp_path / "d"
    small = {"n_landmarks": 2, "n_queries": 4, "size": 48, "n_nonlandmarks": 1, "max_train_per_landmark": 3}
    generate(out, load_config(small), workers=1, progress=False)
    with pytest.raises(LandmarksError, match="other parameters"):
        generate(out, load_config({**small, "seed": 5}), workers=1, progress=False)
    info = generate(out, load_config({**small, "seed": 5}), workers=1, progress=False, overwrite=True)
    assert info["config"]["seed"] == 5
    n_listed = sum(len(_rows(out / f"{s}.csv")) for s in ("train", "index", "test")) + 1
    assert len(list(out.rglob("*.jpg"))) == n_listed  # the seed-0 images are gone


@pytest.mark.parametrize(
    "bad",
    [
        {"ood_fraction": 0.995},
        {"n_landmarks": 0},
        {"size": 8},
        {"index_per_landmark": 0.5},
        {"max_train_per_landmark": 1},
    ],
)
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_config(bad)


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="landmark_count"):
        load_config({"landmark_count": 3})


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [
        "synth",
        str(out),
        "--seed",
        "3",
        "--landmarks",
        "3",
        "--queries",
        "6",
        "--size",
        "48",
        "--nonlandmarks",
        "2",
        "--workers",
        "1",
        "--json",
    ]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["landmarks"] == 3 and stats["test"]["queries"] == 6
    assert (out / "retrieval_solution.csv").is_file()
    assert main(["synth", str(tmp_path / "bad"), "--ood-fraction", "1.5"]) == 2
    assert "ood_fraction" in capsys.readouterr().err


# --- the renderer -----------------------------------------------------------------------------------


def test_projected_face_equals_plain_homography_warp() -> None:
    rng = np.random.default_rng(0)
    tex = np.dstack([rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), np.full((40, 60), 255, np.uint8)])
    cam = R.look_at(np.array([3.0, 2.0, -20.0]), np.array([0.0, 4.0, 0.0]), 160, 120, 60.0, roll_deg=7.0)
    face = R.TexFace(np.array([-6.0, 8.0, 0.0]), np.array([12.0, 0.0, 1.5]), np.array([0.0, -8.0, 0.0]), 0)
    canvas = np.zeros((120, 160, 3), np.float32)
    R.draw_tex_face(canvas, cam, face, tex, np.ones(3, np.float32))
    corners = np.stack(
        [face.origin, face.origin + face.u, face.origin + face.u + face.v, face.origin + face.v]
    )
    proj = cam.project_cam(cam.to_cam(corners)).astype(np.float32)
    H = cv2.getPerspectiveTransform(np.float32([[0, 0], [60, 0], [60, 40], [0, 40]]), proj)
    expected = cv2.warpPerspective(tex[..., :3], H, (160, 120), flags=cv2.INTER_LINEAR).astype(np.float32)
    inside = np.zeros((120, 160), np.uint8)
    cv2.fillConvexPoly(inside, np.round(proj).astype(np.int32), 1)
    inside = cv2.erode(inside, np.ones((5, 5), np.uint8)).astype(bool)
    assert inside.sum() > 2000
    assert np.abs(canvas[inside] - expected[inside]).mean() < 1.0
    assert canvas[~cv2.dilate(inside.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)].max() == 0


def test_facades_read_left_to_right_from_outside() -> None:
    scene = R.Scene()
    tex = np.zeros((20, 40, 4), np.uint8)
    tex[..., 3] = 255
    tex[:, :20, 0] = 255  # left half red
    tex[:, 20:, 2] = 255  # right half blue
    t = scene.add_texture(tex)
    for o, u, v, _ in R._side_faces(np.array([[-5.0, -5.0], [5.0, -5.0], [5.0, 5.0], [-5.0, 5.0]]), 0.0, 5.0):
        scene.faces.append(R.TexFace(o, u, v, t))
    light = R.Lighting(np.array([0.0, 1.0, 0.0]), np.ones(3, np.float32), np.zeros(3, np.float32))
    for C in (
        [0.0, 2.5, -30.0],
        [30.0, 2.5, 0.0],
        [0.0, 2.5, 30.0],
        [-30.0, 2.5, 0.0],
    ):  # each side, from outside
        cam = R.look_at(np.array(C), np.array([0.0, 2.5, 0.0]), 80, 60, 40.0)
        canvas = np.zeros((60, 80, 3), np.float32)
        R.render_faces(canvas, cam, scene.faces, scene.textures, light)
        row = canvas[30]
        lit = np.nonzero(row.sum(1) > 0)[0]
        assert len(lit) > 10
        assert row[lit[2], 0] > 200 and row[lit[-3], 2] > 200  # red on the left, blue on the right


def test_face_crossing_the_camera_is_clipped() -> None:
    tex = np.full((16, 16, 4), 200, np.uint8)
    cam = R.look_at(np.array([0.0, 1.6, 0.0]), np.array([0.0, 1.0, 10.0]), 64, 48, 70.0)
    ground = R.TexFace(
        np.array([-100.0, 0.0, 100.0]),
        np.array([200.0, 0.0, 0.0]),
        np.array([0.0, 0.0, -200.0]),
        0,
        tile_m=2.0,
    )
    canvas = np.zeros((48, 64, 3), np.float32)
    R.draw_tex_face(canvas, cam, ground, tex, np.ones(3, np.float32))
    assert np.isfinite(canvas).all()
    assert canvas[-1].min() > 150 and canvas[0].max() == 0  # ground below the horizon, nothing above


def test_photos_of_every_kind() -> None:
    scene = R.build_landmark(np.random.default_rng(1))
    img = R.landmark_photo(np.random.default_rng(2), scene, 48)
    assert img.dtype == np.uint8 and img.ndim == 3 and max(img.shape[:2]) == 48
    assert np.array_equal(img, R.landmark_photo(np.random.default_rng(2), scene, 48))
    for k, kind in enumerate(R.OOD_KINDS):
        out = R.ood_photo(np.random.default_rng(k), 48, kind)
        assert out.dtype == np.uint8 and max(out.shape[:2]) == 48 and out.std() > 1
    with pytest.raises(ValueError):
        R.ood_photo(np.random.default_rng(0), 48, "unicorn")
    for template in R.TEMPLATES:
        s = R.build_landmark(np.random.default_rng(5), template)
        cam = R.sample_landmark_camera(np.random.default_rng(6), s, 64, 48)
        assert not R._inside(cam.C, s)


def test_every_template_has_a_builder_and_unknown_ones_fail() -> None:
    from landmarks.data import synth_render as render

    assert tuple(render.LANDMARK_BUILDERS) == render.TEMPLATES
    for name in render.TEMPLATES:  # each builder adds its structure and reports a plausible height
        scene = render.build_landmark(np.random.default_rng(3), name)
        assert scene.faces and 5.0 < scene.height < 250.0, name
    with pytest.raises(ValueError, match="pagoda"):
        render.build_landmark(np.random.default_rng(0), "pagoda")
