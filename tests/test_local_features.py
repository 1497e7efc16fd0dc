"""RootSIFT, the DELG pyramid extractor (with a fake model), and the on-disk feature store."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landmarks.errors import IncompatibleArtifactError, LandmarksError
from landmarks.local_features import (
    DEFAULT_SCALES,
    DelgExtractor,
    LocalExtractor,
    LocalFeatures,
    LocalFeatureStore,
    SiftExtractor,
    build_local_extractor,
    extractor_from_info,
    make_local_extractor,
    map_to_original,
    root_sift,
)

torch.set_num_threads(1)


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


# --------------------------------------------------------------------------------------------------
# RootSIFT
# --------------------------------------------------------------------------------------------------


def test_root_sift_properties():
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 200, (50, 128)).astype(np.float32)
    r = root_sift(s)
    assert r.dtype == np.float32 and r.shape == s.shape
    assert (r >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-5)
    # The dot product of RootSIFTs is the Hellinger kernel of the L1-normalised SIFTs.
    p = s / s.sum(1, keepdims=True)
    hellinger = (np.sqrt(p[:, None, :]) * np.sqrt(p[None, :, :])).sum(-1)
    np.testing.assert_allclose(r @ r.T, hellinger, atol=1e-5)
    assert np.allclose(root_sift(np.zeros((2, 128))), 0.0)  # zero rows stay zero, no NaN


def test_sift_extractor_output_contract():
    img = textured_image(0)
    f = SiftExtractor(max_features=200)(img)
    assert isinstance(f, LocalFeatures) and 50 <= len(f) <= 200
    assert f.keypoints.dtype == np.float32 and f.keypoints.shape == (len(f), 2)
    assert f.descriptors.dtype == np.float32 and f.descriptors.shape == (len(f), 128)
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert (f.descriptors >= 0).all()
    assert np.all(np.diff(f.scores) <= 0)  # strongest first
    assert f.image_size == (320, 240)
    assert (f.keypoints[:, 0] >= -0.5).all() and (f.keypoints[:, 0] <= 319.5).all()
    blank = SiftExtractor()(np.full((64, 64, 3), 90, np.uint8))
    assert len(blank) == 0 and blank.descriptors.shape == (0, 128)
    assert isinstance(SiftExtractor(), LocalExtractor)
    with pytest.raises(ValueError):
        SiftExtractor()(np.zeros((10, 10, 3), np.float32))


def test_sift_keypoints_in_original_pixels_after_resize():
    small = textured_image(1, 200, 300)
    big = cv2.resize(small, (600, 400), interpolation=cv2.INTER_LINEAR)
    ex = SiftExtractor(max_features=300, max_side_px=300)
    f_big = ex(big)
    assert f_big.image_size == (600, 400)
    # Exactly: the extractor converts to gray, resizes to 300x200 with INTER_AREA, then maps
    # x -> (x + 0.5) * 2 - 0.5.
    resized = cv2.resize(cv2.cvtColor(big, cv2.COLOR_RGB2GRAY), (300, 200), interpolation=cv2.INTER_AREA)
    f_res = SiftExtractor(max_features=300, max_side_px=None)(resized)
    np.testing.assert_allclose(f_big.keypoints, map_to_original(f_res.keypoints, 0.5, 0.5), atol=1e-4)
    np.testing.assert_allclose(f_big.descriptors, f_res.descriptors, atol=1e-6)
    # Geometrically: the big image's keypoints land on the same structures as the small image's.
    f_small = SiftExtractor(max_features=300, max_side_px=None)(small)
    up = map_to_original(f_small.keypoints, 0.5, 0.5)
    d = np.linalg.norm(f_big.keypoints[:, None] - up[None], axis=2).min(axis=1)
    assert np.median(d) < 1.5


def test_map_to_original_pixel_centres():
    # A 2x downscale: pixel 0 of the small image covers pixels 0 and 1 of the original: centre 0.5.
    np.testing.assert_allclose(
        map_to_original(np.array([[0.0, 0.0], [1.0, 2.0]]), 0.5, 0.5), [[0.5, 0.5], [2.5, 4.5]]
    )
    np.testing.assert_allclose(map_to_original(np.array([[3.0, 3.0]]), 1.0, 1.0), [[3.0, 3.0]])


# --------------------------------------------------------------------------------------------------
# DELG with a fake model implementing the LandmarkNet local-feature contract
# --------------------------------------------------------------------------------------------------


class FakeLocalNet(torch.nn.Module):
    """Attention = mean of the first input channel over each 8x8 cell (stride 8, rf 8, padding 0);
    descriptors = a fixed random projection of the cell's mean colour and position, L2-normalised."""

    has_local_head = True
    local_stride = 8
    local_receptive_field = (8.0, 0.0)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(128, 5, generator=g), requires_grad=False)
        self.calls: list[tuple[int, int]] = []

    def local_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((x.shape[3], x.shape[2]))
        pooled = F.avg_pool2d(x, self.local_stride)  # (B, 3, h, w)
        att = torch.relu(pooled[:, 0])
        b, _, h, w = pooled.shape
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        feats = torch.cat([pooled, xs.expand(b, 1, h, w) / 10, ys.expand(b, 1, h, w) / 10], dim=1)
        desc = torch.einsum("dc,bchw->bdhw", self.proj, feats)
        return att, F.normalize(desc, dim=1)


class FakeLoaded:
    def __init__(self, model: torch.nn.Module, meta: dict | None = None):
        self.model = model
        self.meta = meta or {
            "preprocessing": {"image_size": 64, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
        }
        self.fingerprint = "fake123"


def test_default_scales():
    np.testing.assert_allclose(DEFAULT_SCALES, [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0], atol=1e-4)


def test_pyramid_sizes_capped_and_deduplicated():
    ex = DelgExtractor(FakeLoaded(FakeLocalNet()), max_side_px=300)
    assert ex.pyramid_sizes(200, 100) == [
        (50, 25),
        (71, 35),
        (100, 50),
        (141, 71),
        (200, 100),
        (283, 141),
        (300, 150),
    ]
    ex = DelgExtractor(FakeLoaded(FakeLocalNet()), max_side_px=200)
    assert ex.pyramid_sizes(200, 100)[-1] == (200, 100) and len(ex.pyramid_sizes(200, 100)) == 5
    # Levels below min_side_px (2 x stride = 16) are skipped; a tiny image keeps one level.
    assert ex.pyramid_sizes(64, 40) == [(32, 20), (45, 28), (64, 40), (91, 57), (128, 80)]
    assert len(ex.pyramid_sizes(10, 10)) == 1


def test_delg_receptive_field_mapping_single_scale():
    img = np.zeros((64, 96, 3), np.uint8)
    img[24:32, 40:48, 0] = 255  # exactly cell (row 3, col 5) of an 8-px grid
    ex = DelgExtractor(FakeLoaded(FakeLocalNet()), scales=(1.0,), top_n=1)
    f = ex(img)
    assert len(f) == 1
    np.testing.assert_allclose(f.keypoints[0], [5 * 8 + 3.5, 3 * 8 + 3.5])  # centre of pixels 40..47, 24..31
    assert f.scores[0] == pytest.approx(1.0)
    assert f.image_size == (96, 64)


def test_delg_receptive_field_mapping_across_scales():
    img = np.zeros((128, 192, 3), np.uint8)
    img[32:48, 80:96, 0] = 255  # a 16-px square: one 8-px cell at scale 0.5
    net = FakeLocalNet()
    ex = DelgExtractor(FakeLoaded(net), scales=(0.5,), top_n=1)
    assert ex.dim == 128  # probed once on a blank image
    net.calls.clear()
    f = ex(img)
    assert net.calls == [(96, 64)]
    np.testing.assert_allclose(f.keypoints[0], [87.5, 39.5], atol=1e-4)  # the square's centre in the original
    # Over the whole pyramid, every strong response sits on the square.
    f = DelgExtractor(FakeLoaded(FakeLocalNet()), top_n=1000, threshold=0.99)(img)
    assert len(f) >= 3
    assert np.all(np.abs(f.keypoints - [87.5, 39.5]).max(axis=1) <= 8.0)


def test_delg_top_n_threshold_and_descriptors():
    img = textured_image(2, 96, 128)
    net = FakeLocalNet()
    ex = DelgExtractor(FakeLoaded(net), top_n=40, max_side_px=160)
    f = ex(img)
    assert len(f) == 40
    assert np.all(np.diff(f.scores) <= 0)
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert f.descriptors.shape == (40, 128) and f.keypoints.dtype == np.float32
    assert (f.keypoints >= 0).all() and (f.keypoints[:, 0] <= 127).all() and (f.keypoints[:, 1] <= 95).all()
    # The top 40 are the 40 best cells over all levels (a brute-force oracle over the same levels).
    all_scores = []
    for w, h in ex.pyramid_sizes(128, 96):
        x = torch.from_numpy(
            cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if w < 128 else cv2.INTER_LINEAR)
        )
        att, _ = net.local_features(x.permute(2, 0, 1)[None].float() / 255)
        all_scores.append(att.reshape(-1).numpy())
    ref = np.sort(np.concatenate(all_scores))[::-1]
    np.testing.assert_allclose(f.scores, ref[:40], atol=1e-6)
    # Threshold: only cells at or above it, however large top_n is.
    thr = float(np.median(ref))
    f_thr = DelgExtractor(FakeLoaded(FakeLocalNet()), top_n=10_000, max_side_px=160, threshold=thr)(img)
    assert len(f_thr) == int((ref >= thr).sum()) and (f_thr.scores >= thr).all()
    nothing = DelgExtractor(FakeLoaded(FakeLocalNet()), threshold=2.0)(img)
    assert len(nothing) == 0 and nothing.descriptors.shape == (0, 128)
    info = ex.to_info()
    assert info["name"] == "delg" and info["fingerprint"] == "fake123" and info["stride"] == 8


def test_delg_uses_normalisation_from_meta_and_refuses_models_without_local_head():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:8, :8, 0] = 255
    meta = {"preprocessing": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    f = DelgExtractor(FakeLoaded(FakeLocalNet(), meta), scales=(1.0,), top_n=1)(img)
    assert f.scores[0] == pytest.approx(1.0)  # (1 - 0.5) / 0.5
    ex = DelgExtractor(FakeLocalNet(), scales=(1.0,))  # a bare module works too (ImageNet stats)
    assert ex.mean == pytest.approx((0.485, 0.456, 0.406))

    class NoHead(torch.nn.Module):
        has_local_head = False

    with pytest.raises(IncompatibleArtifactError):
        DelgExtractor(FakeLoaded(NoHead()))


def test_registry_round_trips_settings_through_info():
    sift = SiftExtractor(
        max_features=123, max_side_px=None, contrast_threshold=0.03, edge_threshold=7.0, root=False
    )
    again = extractor_from_info(sift.to_info())
    assert type(again) is SiftExtractor and again.to_info() == sift.to_info()
    img = textured_image(4)
    np.testing.assert_array_equal(again(img).descriptors, sift(img).descriptors)
    assert make_local_extractor("sift").to_info() == SiftExtractor().to_info()
    assert (
        SiftExtractor().contrast_threshold == 0.02
    )  # what `landmarks index --local sift` has always recorded
    delg = DelgExtractor(
        FakeLoaded(FakeLocalNet()), scales=(0.5, 1.0), top_n=17, threshold=0.1, max_side_px=200
    )
    back = extractor_from_info(delg.to_info(), FakeLoaded(FakeLocalNet()))
    assert type(back) is DelgExtractor and back.to_info() == delg.to_info()
    assert make_local_extractor("model", FakeLoaded(FakeLocalNet()), top_n=17).top_n == 17
    other = FakeLoaded(FakeLocalNet())
    other.fingerprint = "other456"
    with pytest.raises(IncompatibleArtifactError, match="fake123"):
        extractor_from_info(delg.to_info(), other)
    with pytest.raises(IncompatibleArtifactError, match="need the model"):
        extractor_from_info(delg.to_info())
    with pytest.raises(IncompatibleArtifactError, match="orb"):
        extractor_from_info({"name": "orb"})
    with pytest.raises(LandmarksError, match="top_n"):
        make_local_extractor("sift", top_n=3)
    with pytest.raises(LandmarksError, match="known: sift, model"):
        make_local_extractor("orb")
    assert not SiftExtractor.needs_model and DelgExtractor.needs_model


def test_build_local_extractor(tmp_path: Path):
    assert isinstance(build_local_extractor("sift"), SiftExtractor)
    sift = build_local_extractor("sift", max_features=7)
    assert isinstance(sift, SiftExtractor) and sift.max_features == 7
    with pytest.raises(LandmarksError, match="nope"):
        build_local_extractor(str(tmp_path / "nope"))


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------


def _feats(seed: int, n: int, dim: int = 16) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, dim)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return LocalFeatures(rng.uniform(0, 500, (n, 2)), d, rng.uniform(0, 10, n), (500 + seed, 400))


def test_store_write_read_resume_memmap(tmp_path: Path):
    root = tmp_path / "local"
    info = {"name": "rootsift", "dim": 16}
    store = LocalFeatureStore.create(root, 16, info)
    f = {f"img{i}": _feats(i, n) for i, n in enumerate([5, 0, 12, 3])}
    assert store.write_chunk(["img0", "img1"], [f["img0"], f["img1"]]) == 0
    assert store.write_chunk(["img2", "img3"], [f["img2"], f["img3"]]) == 1
    assert len(store) == 4 and store.has("img2") and not store.has("zzz") and "img0" in store

    again = LocalFeatureStore.open(root)
    assert again.ids() == ["img0", "img1", "img2", "img3"] and again.extractor == info
    for k, orig in f.items():
        got = again.get(k)
        np.testing.assert_array_equal(got.keypoints, orig.keypoints)
        np.testing.assert_allclose(got.scores, orig.scores, rtol=1e-6)
        np.testing.assert_allclose(got.descriptors, orig.descriptors, atol=2e-3)  # float16 on disk
        np.testing.assert_allclose(np.linalg.norm(got.descriptors, axis=1), 1.0, atol=1e-5)
        assert got.image_size == orig.image_size and got.descriptors.dtype == np.float32
    desc, kpts = again._arrays(0)
    assert isinstance(desc, np.memmap) and desc.dtype == np.float16 and kpts.dtype == np.float32
    assert again.get_many(["img3", "nope"])[1] is None
    with pytest.raises(KeyError):
        again.get("nope")

    # Resume: a committed chunk is skipped; ids still missing are reported.
    mtime = os.stat(root / "chunk_000001.desc.npy").st_mtime_ns
    resumed = LocalFeatureStore.create(root, 16, info)
    assert resumed.write_chunk(["img2", "img3"], [f["img2"], f["img3"]], chunk=1) == 1
    assert os.stat(root / "chunk_000001.desc.npy").st_mtime_ns == mtime
    assert resumed.missing(["img0", "img9", "img3", "img8"]) == ["img9", "img8"]

    # An interrupted write (arrays without their table) is invisible and overwritten later.
    (root / "chunk_000002.desc.npy").write_bytes(b"garbage")
    reopened = LocalFeatureStore.open(root)
    assert len(reopened) == 4 and not reopened.has_chunk(2)
    assert reopened.write_chunk(["img9"], [_feats(9, 4)]) == 2
    assert LocalFeatureStore.open(root).get("img9").keypoints.shape == (4, 2)
    # Compact: float16 descriptors + float32 x, y, score per feature (+ .npy headers and tables).
    n_feats = 5 + 0 + 12 + 3 + 4
    assert reopened.nbytes() < n_feats * (16 * 2 + 3 * 4) + 3 * (2 * 128 + 400)


def test_store_refuses_incompatible(tmp_path: Path):
    root = tmp_path / "s"
    LocalFeatureStore.create(root, 16, {"name": "rootsift"})
    with pytest.raises(IncompatibleArtifactError):
        LocalFeatureStore.create(root, 128, {"name": "rootsift"})
    with pytest.raises(IncompatibleArtifactError):
        LocalFeatureStore.create(root, 16, {"name": "delg", "fingerprint": "x"})
    with pytest.raises(IncompatibleArtifactError):
        LocalFeatureStore.open(tmp_path / "missing")
    store = LocalFeatureStore.open(root)
    with pytest.raises(IncompatibleArtifactError):
        store.write_chunk(["a"], [_feats(0, 3, dim=8)])
    with pytest.raises(ValueError):
        store.write_chunk(["a", "a"], [_feats(0, 3), _feats(1, 3)])


def test_store_with_empty_chunk(tmp_path: Path):
    store = LocalFeatureStore.create(tmp_path / "e", 16)
    store.write_chunk(["blank"], [LocalFeatures.empty(16, (10, 10))])
    got = LocalFeatureStore.open(tmp_path / "e").get("blank")
    assert len(got) == 0 and got.descriptors.shape == (0, 16) and got.image_size == (10, 10)


def test_delg_with_a_random_landmarknet():
    from landmarks import models

    net = models.LandmarkNet(
        models.ModelConfig(backbone="resnet18", local=models.LocalConfig(enabled=True)), 4
    )
    net.eval()
    ex = DelgExtractor(net, scales=(0.5, 1.0), top_n=50)
    img = textured_image(3, 96, 128)
    f = ex(img)
    assert ex.dim == f.dim and 0 < len(f) <= 50 and f.image_size == (128, 96)
    assert (f.keypoints >= 0).all() and (f.keypoints[:, 0] <= 127).all() and (f.keypoints[:, 1] <= 95).all()
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    g = ex(img)
    np.testing.assert_array_equal(f.keypoints, g.keypoints)
