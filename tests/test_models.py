"""Models, transforms, datasets and checkpoints (tiny random-weight models, images made here)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from landmarks import checkpoint as ckpt
from landmarks.data.collection import ImageRecord
from landmarks.data.dataset import EpochSampler, EvalDataset, TrainDataset, collate
from landmarks.data.transforms import (
    AugmentConfig,
    Preprocess,
    TrainTransform,
    normalize_batch,
    resize_square,
)
from landmarks.errors import ConfigError, IncompatibleArtifactError
from landmarks.models.backbone import Backbone
from landmarks.models.net import LandmarkNet, ModelConfig
from landmarks.models.pooling import GeM, gem
from landmarks.models.presets import PRESETS
from landmarks.train import make_config


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def tiny_conf(local: bool = False) -> ModelConfig:
    conf = make_config("tiny").model
    conf.local.enabled = local
    return conf


# --- pooling -----------------------------------------------------------------------------------------


def test_gem_matches_loop_and_limits() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 5) + 0.01
    got = gem(x, 3.0)
    for b in range(2):
        for c in range(3):
            vals = [float(v) ** 3 for v in x[b, c].flatten()]
            assert float(got[b, c]) == pytest.approx((sum(vals) / len(vals)) ** (1 / 3), rel=1e-5)
    torch.testing.assert_close(gem(x, 1.0), x.mean(dim=(2, 3)))
    assert torch.all(gem(x, 60.0) <= x.amax(dim=(2, 3)) + 1e-4)
    assert torch.all(gem(x, 60.0) >= 0.9 * x.amax(dim=(2, 3)))
    pool = GeM(3.0)
    pool(x).sum().backward()
    assert pool.p.grad is not None and torch.isfinite(pool.p.grad).all()
    assert gem(torch.zeros(1, 2, 3, 3), 3.0).min() > 0  # clamped at eps, no NaN


# --- backbone and net ----------------------------------------------------------------------------------


def test_backbone_widths_from_timm() -> None:
    bb = Backbone("test_resnet")
    x = torch.randn(2, 3, 64, 96)
    fmap, local = bb.forward_with_local(x)
    assert fmap.shape == (2, bb.num_features, 2, 3)
    assert local.shape == (2, bb.local_channels, 4, 6)
    assert bb.stride == 32 and bb.local_stride == 16
    assert bb.forward(x).shape == fmap.shape
    with pytest.raises(ConfigError):
        Backbone("no_such_model_xyz")


def test_embed_shapes_and_norm() -> None:
    torch.manual_seed(0)
    net = LandmarkNet(tiny_conf(), num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        e = net.embed(x)
    assert e.shape == (3, net.embedding_dim) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    out = net.train()(x, torch.tensor([0, 1, 2]))
    assert out["logits"].shape == (3, 5)
    assert not net.has_local_head
    with pytest.raises(ConfigError):
        net.local_features(x)


def test_local_head_contract_and_stop_gradient() -> None:
    torch.manual_seed(0)
    net = LandmarkNet(tiny_conf(local=True), num_classes=4)
    assert net.has_local_head and net.local_stride == 16
    x = torch.randn(2, 3, 64, 80)
    net.eval()
    with torch.no_grad():
        att, desc = net.local_features(x)
    assert att.shape == (2, 4, 5) and desc.shape == (2, 128, 4, 5)
    assert att.dtype == torch.float32 and desc.dtype == torch.float32
    assert (att >= 0).all()
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(2, 4, 5))
    # Gradient stopped: the local losses give the backbone no gradient.
    net.train()
    out = net(x, torch.tensor([0, 1]), global_branch=True, local_branch=True)
    (out["recon_loss"] + out["local_logits"].sum()).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for n, p in net.local.named_parameters())  # type: ignore[union-attr]


def test_receptive_field_maps_cells_to_pixels() -> None:
    torch.manual_seed(0)
    net = LandmarkNet(tiny_conf(local=True), num_classes=2).eval()
    rf, pad = net.local_receptive_field
    assert rf > 16
    # timm zero-initialises the last BN of each residual block; undo it so that every path of the
    # theoretical receptive field carries gradient (test_resnet has no squeeze-excitation).
    for m in net.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    # The gradient support of an interior cell is centred where the formula says, and as wide as rf.
    x = torch.randn(1, 3, 512, 512, requires_grad=True)
    local = net.backbone.forward_local(x)
    i, j = 9, 14
    (grad,) = torch.autograd.grad(local[:, :, i, j].abs().sum(), x)
    support = grad.abs().sum(dim=(0, 1)) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    assert (float(rows[0]) + float(rows[-1])) / 2 == pytest.approx(16 * i + (rf - 1) / 2 - pad, abs=0.5)
    assert (float(cols[0]) + float(cols[-1])) / 2 == pytest.approx(16 * j + (rf - 1) / 2 - pad, abs=0.5)
    assert int(rows[-1] - rows[0]) + 1 == pytest.approx(rf, abs=1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve(name: str) -> None:
    conf = make_config(name)
    assert conf.preset == name
    assert conf.data.image_size >= 32 and conf.model.embedding_dim > 0
    with pytest.raises(ConfigError):
        make_config(name, {"model": {"no_such_key": 1}})


def test_cpu_preset_builds() -> None:
    conf = make_config("cpu").model
    net = LandmarkNet(conf, num_classes=3).eval()
    with torch.no_grad():
        assert net.embed(torch.randn(1, 3, 128, 128)).shape == (1, 512)


# --- transforms ----------------------------------------------------------------------------------------


def _photo(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.rectangle(img, (10, 10), (60, 50), (255, 0, 0), -1)
    return img


def test_train_transform_deterministic() -> None:
    tf = TrainTransform(48, AugmentConfig(jpeg=1.0, cutout=1.0))
    img = _photo()
    a = tf(img, np.random.default_rng(7))
    b = tf(img, np.random.default_rng(7))
    c = tf(img, np.random.default_rng(8))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    big = tf(_photo(1200, 1600), np.random.default_rng(1))
    assert big.shape == (48, 48, 3)
    off = TrainTransform(48, AugmentConfig(enabled=False))(img, np.random.default_rng(0))
    np.testing.assert_array_equal(off, resize_square(img, 48))


def test_no_vertical_flip_in_defaults() -> None:
    # A top-bright / bottom-dark image stays that way under every default augmentation.
    img = np.zeros((64, 64, 3), np.uint8)
    img[:32] = 230
    tf = TrainTransform(32, AugmentConfig(cutout=0.0, jitter=0.0))
    for s in range(40):
        out = tf(img, np.random.default_rng(s)).astype(float)
        assert out[:8].mean() > out[-8:].mean()


def test_preprocess_matches_batch_normalisation() -> None:
    pre = Preprocess(40, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    img = _photo()
    x = pre(img)
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    batch = normalize_batch(torch.from_numpy(resize_square(img, 40)[None]), pre.mean, pre.std)
    torch.testing.assert_close(batch[0], x, atol=1e-5, rtol=1e-5)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError):
        pre(np.zeros((5, 5), np.uint8))


# --- datasets ---------------------------------------------------------------------------------------------


def _records(tmp_path: Path, n: int = 6) -> list[ImageRecord]:
    recs = []
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        cv2.imwrite(str(p), _photo(seed=i))
        recs.append(ImageRecord(f"img{i}", p, f"lm{i % 2}"))
    return recs


def test_bad_image_is_substituted_and_reported(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    recs[2].path.write_bytes(b"not an image")
    ds = TrainDataset(recs, [i % 2 for i in range(6)], TrainTransform(32))
    item = ds[(2, 123)]
    assert item["index"] != 2 and item["label"] == 0  # another image of the same landmark
    assert item["skipped"][0][0] == str(recs[2].path)
    again = ds[(2, 123)]
    assert again["index"] == item["index"]
    batch = collate([ds[(i, i)] for i in range(4)])
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == torch.uint8
    ev = EvalDataset(recs, 32)[2]
    assert not ev["ok"] and ev["skipped"]


def test_epoch_sampler_ranks_and_resume() -> None:
    full = EpochSampler(50, 8, seed=3)
    full.set_epoch(2)
    items = list(full)
    assert len(items) == 6 * 8 and len({i for i, _ in items}) == 48
    r0, r1 = (
        EpochSampler(50, 8, seed=3, rank=0, world_size=2),
        EpochSampler(50, 8, seed=3, rank=1, world_size=2),
    )
    r0.set_epoch(2)
    r1.set_epoch(2)
    a, b = list(r0), list(r1)
    assert not {i for i, _ in a} & {i for i, _ in b}
    for batch in range(6):  # each global batch = rank 0's slice + rank 1's slice
        assert (
            a[batch * 4 : (batch + 1) * 4] + b[batch * 4 : (batch + 1) * 4]
            == items[batch * 8 : (batch + 1) * 8]
        )
    full.set_epoch(2, start_batch=4)
    assert list(full) == items[32:]
    full.set_epoch(3)
    assert list(full) != items


# --- checkpoints ----------------------------------------------------------------------------------------------


def _save_tiny(run: Path, local: bool = False) -> LandmarkNet:
    torch.manual_seed(0)
    net = LandmarkNet(tiny_conf(local), num_classes=3, class_counts=[1, 2, 3])
    meta = {
        "config": {"model": json.loads(json.dumps(__import__("dataclasses").asdict(tiny_conf(local))))},
        "num_classes": 3,
        "classes": [{"landmark": c, "count": n} for c, n in zip("abc", (1, 2, 3))],
        "preprocessing": Preprocess(64).to_dict(),
        "local": {"stride": 16, "receptive_field": list(net.local_receptive_field)} if local else None,
    }
    ckpt.save_model(run, net, meta)
    return net


def test_checkpoint_roundtrip_and_fingerprint(tmp_path: Path) -> None:
    net = _save_tiny(tmp_path / "run", local=True)
    loaded = ckpt.load_model(tmp_path / "run")
    assert not loaded.model.training
    assert loaded.fingerprint == loaded.meta["fingerprint"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.embed(x), net.eval().embed(x))
        att_a, desc_a = loaded.model.local_features(x)
        att_b, desc_b = net.local_features(x)
    torch.testing.assert_close(att_a, att_b)
    assert loaded.model.local_receptive_field == net.local_receptive_field
    img = _photo()
    assert loaded.preprocess(img).shape == (3, 64, 64)
    # Re-saving the loaded model gives the same fingerprint; the lone file is a full checkpoint.
    fp2 = ckpt.save_model(tmp_path / "run2", loaded.model, loaded.meta)
    assert fp2 == loaded.fingerprint
    (tmp_path / "run2" / "meta.json").unlink()
    assert ckpt.load_model(tmp_path / "run2" / "model.safetensors").fingerprint == loaded.fingerprint
    # Other weights, other fingerprint; a fingerprint mismatch is refused.
    with torch.no_grad():
        loaded.model.neck.linear.weight.add_(0.01)
    fp3 = ckpt.save_model(tmp_path / "run3", loaded.model, loaded.meta)
    assert fp3 != loaded.fingerprint
    meta3 = json.loads((tmp_path / "run3" / "meta.json").read_text())
    meta3["fingerprint"] = loaded.fingerprint
    (tmp_path / "run3" / "meta.json").write_text(json.dumps(meta3))
    with pytest.raises(IncompatibleArtifactError):
        ckpt.load_model(tmp_path / "run3")


def test_head_weights_do_not_change_fingerprint(tmp_path: Path) -> None:
    net = _save_tiny(tmp_path / "a")
    with torch.no_grad():
        net.head.weight.add_(1.0)
    meta = ckpt.read_meta(tmp_path / "a")
    assert ckpt.save_model(tmp_path / "b", net, meta) == meta["fingerprint"]


def test_optimizer_and_rng_state_roundtrip() -> None:
    net = LandmarkNet(tiny_conf(), num_classes=3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]))["logits"].sum().backward()
    opt.step()
    tensors, info = ckpt.optimizer_state(opt)
    json.dumps(info)
    opt2 = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ckpt.load_optimizer_state(opt2, tensors, info)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
    t, r = ckpt.rng_state()
    json.dumps(r)
    want = (torch.rand(3), np.random.random(), __import__("random").random())  # noqa: NPY002
    ckpt.set_rng_state(t, r)
    got = (torch.rand(3), np.random.random(), __import__("random").random())  # noqa: NPY002
    torch.testing.assert_close(got[0], want[0])
    assert got[1:] == want[1:]


def test_pretrained_from_local_file(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = Backbone("test_resnet", pretrained=str(path))
    torch.testing.assert_close(bb.model.conv1[0].weight, src.conv1[0].weight)
    from landmarks.errors import LandmarksError

    with pytest.raises(LandmarksError):
        Backbone("test_resnet", pretrained=str(tmp_path / "missing_tag_or_file"))


@pytest.mark.parametrize("name", ["test_resnet", "efficientnet_b0"])
def test_forward_with_local_equals_forward_and_the_stage_output(name: str) -> None:
    """timm's forward_intermediates against the slow obvious version: forward_features + a hook on the stage."""
    torch.manual_seed(0)
    bb = Backbone(name, drop_path_rate=0.1)
    captured: list[torch.Tensor] = []
    assert bb.local_module is not None
    handle = bb.model.get_submodule(bb.local_module).register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(2, 3, 64, 96)
    for mode in ("eval", "train"):
        getattr(bb, mode)()
        torch.manual_seed(1)
        want = bb.model.forward_features(x)
        torch.manual_seed(1)
        captured.clear()
        out, local = bb.forward_with_local(x)
        assert torch.equal(out, want) and torch.equal(local, captured[0]), mode
        assert local.shape == (2, bb.local_channels, 4, 6)
    handle.remove()
    bb.eval()
    torch.testing.assert_close(bb.forward_local(x), bb.forward_with_local(x)[1], rtol=0, atol=0)
