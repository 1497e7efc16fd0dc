"""``landmarks match A B``: JSON shape, drawing, repeatability, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from landmarks.cli import main

H_TRUE = np.array([[0.95, -0.12, 18.0], [0.1, 0.97, -4.0], [1.0e-4, -0.8e-4, 1.0]])


def textured_image(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128, np.uint8)
    for _ in range(150):
        color = [int(c) for c in rng.integers(0, 256, 3)]
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.integers(2):
            cv2.circle(img, (x, y), int(rng.integers(2, 14)), color, -1)
        else:
            cv2.rectangle(
                img, (x, y), (x + int(rng.integers(3, 25)), y + int(rng.integers(3, 25))), color, -1
            )
    return cv2.GaussianBlur(np.clip(img + rng.normal(0, 6.0, img.shape), 0, 255).astype(np.uint8), (3, 3), 0)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("match")
    img = textured_image(0)
    warped = cv2.warpPerspective(img, H_TRUE, (img.shape[1], img.shape[0]), borderValue=(128, 128, 128))
    a, b = d / "a.png", d / "b.jpg"
    cv2.imwrite(str(a), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(b), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return a, b


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["-q", "match", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_shape_and_homography(images, capsys):
    a, b = images
    code, out, _ = _run(capsys, str(a), str(b), "--model", "homography", "--json")
    assert code == 0
    r = json.loads(out)
    assert list(r)[:4] == ["keypoints", "matches", "inliers", "homography"]
    assert len(r["keypoints"]) == 2 and all(isinstance(n, int) and n > 50 for n in r["keypoints"])
    assert r["matches"] >= r["inliers"] >= 50
    h = np.array(r["homography"])
    assert h.shape == (3, 3) and h[2, 2] == pytest.approx(1.0)
    c = np.array([[0, 0, 1], [319, 0, 1], [319, 239, 1], [0, 239, 1]], float).T
    p, q = h @ c, H_TRUE @ c
    assert np.linalg.norm(p[:2] / p[2] - q[:2] / q[2], axis=0).mean() < 2.0
    assert r["model"] == "homography" and r["model_3x3"] == r["homography"]


def test_fundamental_default_and_text_output(images, capsys):
    a, b = images
    code, out, _ = _run(capsys, str(a), str(b), "--json")
    r = json.loads(out)
    assert code == 0 and r["model"] == "fundamental" and r["inliers"] >= 50
    assert np.array(r["model_3x3"]).shape == (3, 3)
    assert r["homography"] is not None and r["homography_inliers"] <= r["inliers"]
    code, out, _ = _run(capsys, str(a), str(b))
    assert code == 0
    assert (
        "keypoints" in out
        and "putative matches" in out
        and "inliers (fundamental" in out
        and "homography" in out
    )


def test_same_output_twice(images, capsys):
    a, b = images
    outs = [_run(capsys, str(a), str(b), "--json", "--seed", "5")[1] for _ in range(2)]
    assert outs[0] == outs[1]
    outs = [_run(capsys, str(a), str(b), "--model", "affine", "--max-features", "300")[1] for _ in range(2)]
    assert outs[0] == outs[1]


def test_draw_writes_a_png(images, capsys, tmp_path: Path):
    a, b = images
    out_png = tmp_path / "sub" / "m.png"
    code, _, _ = _run(capsys, str(a), str(b), "--draw", str(out_png))
    assert code == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = cv2.imread(str(out_png))
    assert drawn is not None and drawn.shape[0] == 240 and drawn.shape[1] > 640
    assert not list(out_png.parent.glob(".*tmp"))  # no temporary left behind
    code, _, err = _run(capsys, str(a), str(b), "--draw", str(tmp_path / "m.gif"))
    assert code == 2 and "m.gif" in err


def test_corrupt_image_exits_2_naming_the_file(images, capsys, tmp_path: Path):
    a, _ = images
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    code, out, err = _run(capsys, str(a), str(bad), "--json")
    assert code == 2 and out == ""
    assert "broken.jpg" in err
    code, _, err = _run(capsys, str(tmp_path / "missing.png"), str(a))
    assert code == 2 and "missing.png" in err
    code, _, err = _run(capsys, str(a), str(a), "--features", str(tmp_path / "no_run"))
    assert code == 2 and "no_run" in err


def test_draw_matches_function():
    from landmarks.viz import draw_matches

    a = textured_image(1, 100, 150)
    b = textured_image(2, 200, 120)
    pa = np.array([[10.0, 10.0], [140.0, 90.0]])
    pb = np.array([[5.0, 5.0], [100.0, 190.0]])
    canvas = draw_matches(a, b, pa, pb, max_height_px=None, gap_px=4)
    assert canvas.dtype == np.uint8 and canvas.shape == (200, 300 + 4 + 120, 3)
    empty = draw_matches(a, b, np.zeros((0, 2)), np.zeros((0, 2)), max_height_px=50)
    assert empty.shape[0] == 50
    with pytest.raises(ValueError):
        draw_matches(a, b, pa, pb[:1])


def test_index_option_extracts_with_the_settings_the_index_recorded(images, capsys, tmp_path: Path):
    from landmarks.data.decode import decode_image
    from landmarks.local_features import SiftExtractor
    from landmarks.rerank import PairVerifier

    a, b = images
    recorded = SiftExtractor(max_features=70, contrast_threshold=0.03)
    ix = tmp_path / "ix"
    ix.mkdir()
    (ix / "meta.json").write_text(
        json.dumps({"local": {"features": "sift", "dir": "local", "extractor": recorded.to_info()}})
    )
    code, out, _ = _run(capsys, str(a), str(b), "--index", str(ix), "--json", "--seed", "4")
    assert code == 0
    r = json.loads(out)
    fa, fb = recorded(decode_image(a)), recorded(decode_image(b))
    v = PairVerifier(recorded, seed=4, max_iters=10000).verify(
        fa, fb
    )  # the CLI's RANSAC: verify()'s defaults
    assert r["keypoints"] == [len(fa), len(fb)] == [70, 70] and r["inliers"] == v.num_inliers
    (ix / "meta.json").write_text(json.dumps({"model": {}}))
    code, _, err = _run(capsys, str(a), str(b), "--index", str(ix))
    assert code == 2 and "no local features" in err
    code, _, err = _run(capsys, str(a), str(b), "--index", str(ix), "--features", "sift")
    assert code == 2 and "--index" in err


def test_draw_verification_draws_the_inliers_on_shrunk_images():
    from landmarks.local_features import SiftExtractor
    from landmarks.verify import verify
    from landmarks.viz import draw_matches, draw_verification

    img = textured_image(0)
    warped = cv2.warpPerspective(img, H_TRUE, (img.shape[1], img.shape[0]), borderValue=(128, 128, 128))
    ex = SiftExtractor(max_features=300)
    fa, fb = ex(img), ex(warped)
    v = verify(fa, fb, "homography", seed=0)
    got = draw_verification(img, warped, fa, fb, v, max_side_px=160)
    inl = v.matches[v.inlier_mask]
    small_a = cv2.resize(img, (160, 120), interpolation=cv2.INTER_AREA)
    small_b = cv2.resize(warped, (160, 120), interpolation=cv2.INTER_AREA)
    want = draw_matches(
        small_a,
        small_b,
        (fa.keypoints[inl[:, 0]] + 0.5) * 0.5 - 0.5,
        (fb.keypoints[inl[:, 1]] + 0.5) * 0.5 - 0.5,
    )
    np.testing.assert_array_equal(got, want)
    assert len(inl) >= 50 and not np.array_equal(
        got, draw_matches(small_a, small_b, np.zeros((0, 2)), np.zeros((0, 2)))
    )
