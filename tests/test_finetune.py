"""Fine-tuning a pretrained backbone: frozen feature levels, frozen BN, the head-only phase, the head warm-up
on cached features, and the local head's input normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from landmarks.errors import ConfigError
from landmarks.models.backbone import Backbone
from landmarks.models.local import LocalHead
from landmarks.train import Trainer, make_config, param_groups, train
from test_train import make_shapes


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_classes=4, per_class=8)


def tiny(**over: object) -> object:
    base: dict[str, object] = {"batch_size": 8, "epochs": 1, "data": {"image_size": 48, "val_fraction": 0.15}}
    base.update(over)
    return make_config("tiny", base)


def test_frozen_parameter_names_follow_feature_info() -> None:
    b = Backbone("test_resnet")
    names = [n for n, _ in b.model.named_parameters()]  # registration order: stem, layer1, ..., layer4
    assert b.frozen_parameter_names(0) == []
    # act1 (level 1) has no parameters: the stem (conv1.*, bn1.*) computes it
    assert b.frozen_parameter_names(1) == [n for n in names if n.startswith(("conv1.", "bn1."))]
    assert b.frozen_parameter_names(3) == [n for n in names if not n.startswith(("layer3.", "layer4."))]
    assert b.frozen_parameter_names(5) == names
    with pytest.raises(ConfigError, match="has 5"):
        b.frozen_parameter_names(6)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_frozen_levels_and_bn_stay_pretrained(shapes: Path, tmp_path: Path) -> None:
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def grab(tr: Trainer) -> None:
        seen["start"] = {k: v.detach().clone() for k, v in tr.net.state_dict().items()}

    conf = tiny(finetune={"frozen_levels": 3, "freeze_bn": True})
    train(conf, shapes, tmp_path / "run", on_trainer=grab)  # type: ignore[arg-type]
    start, end = seen["start"], _state(tmp_path / "run")
    frozen = [
        k
        for k in start
        if k.startswith("backbone.model.")
        and not k.startswith(("backbone.model.layer3.", "backbone.model.layer4."))
    ]
    for k in frozen:  # weights and BN statistics of the stem, layer1 and layer2
        torch.testing.assert_close(end[k], start[k], rtol=0, atol=0, msg=k)
    for k in start:  # freeze_bn: no running statistics move anywhere in the backbone
        if k.startswith("backbone.") and ("running_mean" in k or "running_var" in k):
            torch.testing.assert_close(end[k], start[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(
        end["backbone.model.layer4.0.conv1.weight"], start["backbone.model.layer4.0.conv1.weight"]
    )
    assert not torch.equal(end["neck.linear.weight"], start["neck.linear.weight"])


def test_head_only_phase(shapes: Path, tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def grab(tr: Trainer) -> None:
        seen["start"] = {k: v.detach().clone() for k, v in tr.net.state_dict().items()}
        seen["trainer"] = tr

    conf = tiny(steps=2, finetune={"head_only_fraction": 1.0})
    train(conf, shapes, tmp_path / "all", on_trainer=grab)  # type: ignore[arg-type]
    start, end = seen["start"], _state(tmp_path / "all")
    assert isinstance(start, dict)
    for k, v in start.items():  # the whole backbone (weights and BN statistics) untouched
        if k.startswith("backbone."):
            torch.testing.assert_close(end[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(end["neck.linear.weight"], start["neck.linear.weight"])
    # half of 4 steps: the phase ends at step 2, the backbone trains afterwards
    tr = seen["trainer"]
    assert isinstance(tr, Trainer)
    tr.conf.finetune.head_only_fraction, tr.total = 0.5, 4
    assert [tr._phase_for(s) for s in range(4)] == [True, True, False, False]


def test_head_warmup_trains_heads_on_cached_features(shapes: Path, tmp_path: Path) -> None:
    conf = tiny(finetune={"head_warmup_epochs": 8}, model={"local": {"enabled": True}})
    runs = []
    for name in ("a", "b"):
        tr = Trainer(conf, shapes, tmp_path / name)  # type: ignore[arg-type]
        before = {k: v.detach().clone() for k, v in tr.net.state_dict().items()}
        stats = tr.head_warmup()
        runs.append((before, {k: v.detach().clone() for k, v in tr.net.state_dict().items()}, stats))
    before, after, stats = runs[0]
    assert stats["epochs"] == 8 and stats["steps"] == 8 * (len(tr.train_records) // 8)
    assert stats["acc"] > 0.5  # 4 classes: chance is 0.25
    for k, v in before.items():
        if k.startswith(("backbone.", "pool.")):
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
    for k in ("neck.linear.weight", "head.weight", "local.encoder.weight", "local.norm.running_var"):
        assert not torch.equal(after[k], before[k]), k
    for k, v in after.items():  # seeded: a second trainer ends with the same weights
        torch.testing.assert_close(runs[1][1][k], v, msg=k)


def test_local_head_and_new_parts_learn_at_head_lr() -> None:
    conf = make_config(
        "tiny", {"model": {"local": {"enabled": True}}, "optim": {"lr": 1e-3, "head_lr_mult": 10.0}}
    )
    from landmarks.models.net import LandmarkNet

    net = LandmarkNet(conf.model, 3, [1, 1, 1])
    mult = {g["name"]: g["lr_mult"] for g in param_groups(net, conf.optim)}
    assert mult["backbone"] == 1.0 and mult["local"] == mult["neck"] == mult["head"] == 10.0


def test_local_head_normalises_its_input() -> None:
    torch.manual_seed(0)
    head = LocalHead(16, 5, dim=8, hidden=12)
    x = torch.randn(4, 16, 6, 6) * 7.0 + 3.0
    head.train()
    out = head(x)
    # the autoencoder reconstructs the standardised map: a zero reconstruction scores ~1, not ~58
    z = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.var(dim=(0, 2, 3), unbiased=False, keepdim=True).add(
        1e-5
    ).sqrt()
    recon = head.decoder(head.encoder(z))
    torch.testing.assert_close(out["recon_loss"], F.mse_loss(recon, z))
    assert float(F.mse_loss(torch.zeros_like(z), z)) == pytest.approx(1.0, abs=1e-3)


def test_local_head_checkpoint_without_norm_loads_as_identity() -> None:
    torch.manual_seed(0)
    head = LocalHead(16, 5, dim=8, hidden=12).eval()
    old = {k: v for k, v in head.state_dict().items() if not k.startswith("norm.")}
    fresh = LocalHead(16, 5, dim=8, hidden=12)
    fresh.load_state_dict(old, strict=True)
    fresh.eval()
    x = torch.randn(2, 16, 5, 5) * 4.0
    # the formula of a head saved before the normalisation existed
    expected = F.normalize(head.encoder(x), dim=1)
    torch.testing.assert_close(fresh.descriptors(x), expected)
    torch.testing.assert_close(fresh.scores(x), F.softplus(head.attention(x)).squeeze(1))
