"""Margin heads against slow, obviously-correct loop versions."""

from __future__ import annotations

import math
import resource

import numpy as np
import pytest
import torch

from landmarks.errors import ConfigError
from landmarks.models.heads import (
    ArcFace,
    CosFace,
    DynamicMargins,
    DynamicSubCenterArcFace,
    MarginSoftmax,
    SubCenter,
    SubCenterArcFace,
    build_head,
    class_weights,
    dynamic_margins,
    head_class,
    margin_cross_entropy,
)


def _slow_logits(
    emb: np.ndarray,
    weight: np.ndarray,
    labels: np.ndarray | None,
    kind: str,
    k: int,
    margins: np.ndarray,
    scale: float,
) -> np.ndarray:
    """One sample, one class, one sub-centre at a time, with math.* scalars."""
    b, d = emb.shape
    c = weight.shape[0] // k
    out = np.zeros((b, c))
    for i in range(b):
        e = emb[i] / math.sqrt(sum(float(v) ** 2 for v in emb[i]))
        for cls in range(c):
            best = -2.0
            for j in range(k):
                w = weight[cls * k + j]
                w = w / math.sqrt(sum(float(v) ** 2 for v in w))
                best = max(best, sum(float(e[t]) * float(w[t]) for t in range(d)))
            cos = best
            if labels is not None and cls == labels[i]:
                m = float(margins[cls])
                if kind == "arcface":
                    theta = math.acos(max(-1.0, min(1.0, cos)))
                    cos = math.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)
                elif kind == "cosface":
                    cos = cos - m
            out[i, cls] = scale * cos
    return out


@pytest.mark.parametrize("kind", ["arcface", "cosface", "softmax"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dynamic", [False, True])
def test_heads_match_slow_loop(kind: str, k: int, dynamic: bool) -> None:
    torch.manual_seed(0)
    d, c, b = 8, 5, 6
    counts = [1, 2, 5, 40, 300]
    head = build_head(
        kind, d, c, scale=10.0, margin_rad=0.4, subcenters=k, dynamic=dynamic, class_counts=counts
    )
    emb = torch.randn(b, d)
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    # Make sample 5 point away from its class's sub-centres so that θ + m > π (ArcFace fallback).
    with torch.no_grad():
        head.weight[2 * k : 3 * k] = torch.randn(d).abs().unsqueeze(0) + 0.01 * torch.randn(k, d)
        emb[5] = -head.weight[2 * k : 3 * k].mean(0)
    margins = dynamic_margins(counts) if dynamic else np.full(c, 0.4)
    got = head(emb, labels).detach().numpy()
    want = _slow_logits(emb.numpy(), head.weight.detach().numpy(), labels.numpy(), kind, k, margins, 10.0)
    np.testing.assert_allclose(got, want, atol=1e-4)
    plain = head(emb).detach().numpy()
    np.testing.assert_allclose(
        plain,
        _slow_logits(emb.numpy(), head.weight.detach().numpy(), None, kind, k, margins, 10.0),
        atol=1e-4,
    )
    if kind == "arcface":
        cos_y = head.cosine(emb)[5, 2].item()
        assert (
            math.acos(max(-1.0, min(1.0, cos_y))) + margins[2] > math.pi
        )  # the fallback branch was exercised


def test_each_variant_overrides_one_hook() -> None:
    hooks = ("class_cosine", "margin_for", "apply_margin")

    def overridden(cls: type) -> set[str]:
        return {h for h in hooks if h in cls.__dict__}

    assert overridden(ArcFace) == {"apply_margin"}
    assert overridden(CosFace) == {"apply_margin"}
    assert overridden(SubCenter) == {"class_cosine"}
    assert overridden(DynamicMargins) == {"margin_for"}
    assert head_class("arcface", True, False) is SubCenterArcFace
    assert head_class("arcface", True, True) is DynamicSubCenterArcFace
    composed = head_class("cosface", True, True)
    assert (
        issubclass(composed, CosFace)
        and issubclass(composed, SubCenter)
        and issubclass(composed, DynamicMargins)
    )
    with pytest.raises(ConfigError):
        ArcFace(8, 3, subcenters=3)
    with pytest.raises(ConfigError):
        head_class("nope", False, False)


def test_dynamic_margins_formula() -> None:
    counts = [1, 3, 10, 100, 1000]
    got = dynamic_margins(counts, a=0.45, b=0.05)
    t = [n**-0.25 for n in counts]
    want = [0.45 * (v - min(t)) / (max(t) - min(t)) + 0.05 for v in t]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == pytest.approx(0.5) and got[-1] == pytest.approx(0.05)
    np.testing.assert_allclose(dynamic_margins([7, 7, 7]), [0.275] * 3)
    with pytest.raises(ConfigError):
        dynamic_margins([0, 3])


def test_class_weights() -> None:
    counts = np.array([1, 2, 10, 1000])
    w = class_weights(counts)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(w * np.log1p(counts), (w * np.log1p(counts))[0], rtol=1e-5)
    assert w[0] > w[-1]


def test_weighted_cross_entropy_matches_manual() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    w = torch.from_numpy(class_weights([1, 5, 20, 100]))
    got = margin_cross_entropy(logits, labels, w)
    nll = -torch.log_softmax(logits, 1)[torch.arange(6), labels]
    want = (w[labels] * nll).sum() / w[labels].sum()
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_gradients_finite_at_cos_one() -> None:
    head = build_head("arcface", 4, 3, subcenters=2, dynamic=False)
    emb = head.weight.detach()[0:1].clone().requires_grad_(True)  # cos = 1 with class 0
    head(emb, torch.tensor([0])).sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_margin_state_saved() -> None:
    head = build_head("arcface", 4, 3, dynamic=True, class_counts=[1, 10, 100])
    fresh = build_head("arcface", 4, 3, dynamic=True)
    fresh.load_state_dict(head.state_dict())
    np.testing.assert_allclose(fresh.class_margins.numpy(), dynamic_margins([1, 10, 100]))
    assert isinstance(fresh, MarginSoftmax)


@pytest.mark.slow
def test_glr_sized_head_memory() -> None:
    """81,313 classes x 3 sub-centres x 512: builds, one AdamW step at batch 32 works, memory bounded."""
    torch.manual_seed(0)
    c, k, d = 81_313, 3, 512
    head = build_head("arcface", d, c, subcenters=k, dynamic=True, class_counts=np.arange(1, c + 1) % 500 + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    emb = torch.randn(32, d, requires_grad=True)
    labels = torch.randint(0, c, (32,))
    loss = margin_cross_entropy(head(emb, labels), labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert head.weight.numel() == c * k * d
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    assert peak_gb < 8.0
