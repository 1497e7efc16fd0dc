"""Margin-softmax classification heads: ArcFace, CosFace, sub-center ArcFace, dynamic margins.

One base class, :class:`MarginSoftmax`, computes the cosine between the L2-normalised embedding and
L2-normalised class weights and calls three hooks; each variant overrides exactly one of them:

=====================  ===================  =================================================
hook                   default              overridden by
=====================  ===================  =================================================
``class_cosine``       one weight per class :class:`SubCenter` (max over ``k`` sub-centres)
``margin_for``         one global margin    :class:`DynamicMargins` (per-class table)
``apply_margin``       none (norm-softmax)  :class:`ArcFace` (cos(θ + m)), :class:`CosFace` (cos θ − m)
=====================  ===================  =================================================

:func:`build_head` composes them (e.g. the GLR-2020 recipe ``DynamicMargins + SubCenter + ArcFace``).
Everything is vectorised over the batch and the classes; ``tests/test_heads.py`` checks it against
slow Python loops.

Memory of a GLDv2-sized head (81,313 classes × 3 sub-centres × 512 dims = 124.9 M parameters, fp32):
weights 0.47 GiB, gradients 0.47 GiB, AdamW moments 0.93 GiB (1.86 GiB of training state). The cosine
divides ``x · W^T`` by the row norms of ``W`` instead of normalising ``W``, so no normalised copy of the
matrix is kept for backward. Measured on the 2-core CPU (``torch.optim.AdamW(fused=True)``, batch 32):
process RSS peaks at 3.7 GiB during forward + backward (2.7 GiB at the first step, before the AdamW
moments exist); forward + backward takes ~3.3 s and the optimizer step ~0.2 s on 2 cores (the
non-fused AdamW needs ~1.4 s and one more matrix-sized temporary). ``tests/test_heads.py::
test_glr_sized_head_memory`` (slow) trains it one step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landmarks.errors import ConfigError

#: Default dynamic-margin coefficients of the GLR-2020 winners: m_c = a * normalised(n_c^-1/4) + b.
DEFAULT_MARGIN_A = 0.45
DEFAULT_MARGIN_B = 0.05


def dynamic_margins(
    counts: Sequence[int] | np.ndarray, a: float = DEFAULT_MARGIN_A, b: float = DEFAULT_MARGIN_B
) -> np.ndarray:
    """Per-class margins ``m_c = a·(n_c^(-1/4) − min)/(max − min) + b`` (radians for ArcFace).

    Rare classes get the largest margin (``a + b``), the most frequent the smallest (``b``). When all
    classes have the same count the formula is undefined and every class gets ``b + a / 2``.

    Args:
        counts: ``(C,)`` training images per class, each >= 1.

    Returns:
        ``(C,)`` float32 margins.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n < 1).any():
        raise ConfigError("dynamic margins need a non-empty list of class counts, each >= 1")
    t = n**-0.25
    lo, hi = t.min(), t.max()
    if hi - lo < 1e-12:
        return np.full(n.shape, b + a / 2, dtype=np.float32)
    return (a * (t - lo) / (hi - lo) + b).astype(np.float32)


def class_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Cross-entropy class weights ``w_c ∝ 1 / log(1 + n_c)``, scaled to mean 1 over the classes.

    Args:
        counts: ``(C,)`` training images per class, each >= 1.

    Returns:
        ``(C,)`` float32 weights.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n < 1).any():
        raise ConfigError("class weights need a non-empty list of class counts, each >= 1")
    w = 1.0 / np.log1p(n)
    return (w / w.mean()).astype(np.float32)


def margin_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of margin logits, optionally class-weighted (see :func:`class_weights`).

    Args:
        logits: ``(B, C)`` float32 output of a head called with labels.
        labels: ``(B,)`` int64 class indices.
        weight: optional ``(C,)`` float32 class weights.

    Returns:
        The scalar loss: mean over the batch, or the weighted mean ``Σ w_y l / Σ w_y``.
    """
    return F.cross_entropy(logits.float(), labels, weight=weight)


class MarginSoftmax(nn.Module):
    """Normalised-softmax classifier with hooks for margins and sub-centres (the base of all heads).

    ``forward(embedding (B, in_dim), labels (B,) | None) -> (B, num_classes)`` float32 logits
    ``scale · cos`` where, when labels are given, the target class's cosine goes through
    :meth:`apply_margin`. Weights are ``(num_classes · subcenters, in_dim)``, sub-centre ``j`` of
    class ``c`` at row ``c · subcenters + j``. The head always computes in float32 (autocast off).
    """

    #: Whether the class supports several sub-centres per class (see :class:`SubCenter`).
    supports_subcenters = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        scale: float = 30.0,
        margin_rad: float = 0.3,
        subcenters: int = 1,
        class_margins: Sequence[float] | np.ndarray | None = None,
    ):
        super().__init__()
        if num_classes < 1 or in_dim < 1:
            raise ConfigError(f"a head needs >= 1 class and >= 1 input dim, got {num_classes}, {in_dim}")
        if subcenters < 1 or (subcenters > 1 and not self.supports_subcenters):
            raise ConfigError(f"{type(self).__name__} does not support subcenters={subcenters}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.subcenters = subcenters
        self.scale = float(scale)
        self.margin_rad = float(margin_rad)
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, in_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        margins = torch.full((num_classes,), self.margin_rad, dtype=torch.float32)
        if class_margins is not None:
            margins = torch.as_tensor(np.asarray(class_margins, dtype=np.float32))
            if margins.shape != (num_classes,):
                raise ConfigError(
                    f"class_margins has shape {tuple(margins.shape)}, expected ({num_classes},)"
                )
        #: ``(num_classes,)`` per-class margins (used by :class:`DynamicMargins`; saved with the weights).
        self.class_margins: torch.Tensor
        self.register_buffer("class_margins", margins)

    # --- hooks --------------------------------------------------------------------------------------
    def class_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """``(B, num_classes · subcenters)`` cosines -> ``(B, num_classes)``: identity with one centre."""
        return cos

    def margin_for(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` int64 labels -> ``(B,)`` float32 margins: the global ``margin_rad``."""
        return torch.full(labels.shape, self.margin_rad, dtype=torch.float32, device=labels.device)

    def apply_margin(self, cos_y: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """``(B,)`` target cosines and margins -> ``(B,)`` penalised cosines: none here."""
        return cos_y

    # --- shared computation ---------------------------------------------------------------------------
    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` -> ``(B, num_classes)`` float32 cosine to each class (after ``class_cosine``)."""
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            w = self.weight.float()
            # Divide the products by the row norms instead of normalising W: no normalised copy of a
            # (C·k, D) matrix is kept for backward (1/3 less peak memory for an 81k-class head).
            inv_norm = 1.0 / torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12)
            cos = F.linear(F.normalize(embedding.float(), dim=1), w) * inv_norm
        return self.class_cosine(cos)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes)`` float32; with ``labels (B,)`` the target cosines get the margin."""
        cos = self.cosine(embedding)
        if labels is None:
            return cos * self.scale
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            idx = labels.long().view(-1, 1)
            cos_y = cos.gather(1, idx).squeeze(1)
            target = self.apply_margin(cos_y, self.margin_for(labels.long()))
            logits = cos.scatter(1, idx, target.unsqueeze(1).to(cos.dtype))
            return logits * self.scale

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_classes={self.num_classes}, subcenters={self.subcenters}, "
            f"scale={self.scale}, margin_rad={self.margin_rad}"
        )


class ArcFace(MarginSoftmax):
    """Additive angular margin: the target logit is ``s · cos(θ_y + m)``.

    When ``θ_y + m > π`` (so cos would grow again) the standard fallback ``cos θ_y − m · sin m`` keeps
    the penalty monotonic (the ``easy_margin=False`` branch of the reference implementation).
    """

    def apply_margin(self, cos_y: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """cos(θ + m) with the fallback for θ + m > π; ``(B,)`` float32."""
        m = margin.to(cos_y.dtype)
        sin_y = torch.sqrt((1.0 - cos_y * cos_y).clamp(min=1e-12))
        phi = cos_y * torch.cos(m) - sin_y * torch.sin(m)
        threshold = torch.cos(math.pi - m)  # θ + m <= π  <=>  cos θ >= cos(π − m)
        fallback = cos_y - torch.sin(math.pi - m) * m
        return torch.where(cos_y > threshold, phi, fallback)


class CosFace(MarginSoftmax):
    """Additive cosine margin: the target logit is ``s · (cos θ_y − m)``."""

    def apply_margin(self, cos_y: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """cos θ − m; ``(B,)`` float32."""
        return cos_y - margin.to(cos_y.dtype)


class SubCenter(MarginSoftmax):
    """Mixin: ``k`` sub-centres per class; the class cosine is the max over its sub-centres."""

    supports_subcenters = True

    def class_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """``(B, C · k)`` -> ``(B, C)``: max over each class's ``k`` sub-centres."""
        if self.subcenters == 1:
            return cos
        return cos.view(cos.shape[0], self.num_classes, self.subcenters).amax(dim=2)


class DynamicMargins(MarginSoftmax):
    """Mixin: a margin per class, from the ``class_margins`` buffer (see :func:`dynamic_margins`)."""

    def margin_for(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` labels -> ``(B,)`` float32 per-class margins."""
        return self.class_margins[labels]


class SubCenterArcFace(SubCenter, ArcFace):
    """Sub-center ArcFace (Deng et al., 2020)."""


class DynamicSubCenterArcFace(DynamicMargins, SubCenter, ArcFace):
    """Sub-center ArcFace with per-class dynamic margins: the GLR-2020 winners' head."""


#: Margin kinds by config name: the class that overrides ``apply_margin``.
HEAD_KINDS: dict[str, type[MarginSoftmax]] = {
    "arcface": ArcFace,
    "cosface": CosFace,
    "softmax": MarginSoftmax,
}


@cache
def head_class(kind: str, subcenter: bool, dynamic: bool) -> type[MarginSoftmax]:
    """The head class for a margin ``kind`` with optional sub-centres and dynamic margins."""
    if kind not in HEAD_KINDS:
        raise ConfigError(f"unknown head kind {kind!r} (known: {', '.join(HEAD_KINDS)})")
    base = HEAD_KINDS[kind]
    known: dict[tuple[type[MarginSoftmax], bool, bool], type[MarginSoftmax]] = {
        (ArcFace, True, False): SubCenterArcFace,
        (ArcFace, True, True): DynamicSubCenterArcFace,
    }
    if (base, subcenter, dynamic) in known:
        return known[(base, subcenter, dynamic)]
    if not subcenter and not dynamic:
        return base
    mixins: tuple[type, ...] = ((DynamicMargins,) if dynamic else ()) + ((SubCenter,) if subcenter else ())
    name = ("Dynamic" if dynamic else "") + ("SubCenter" if subcenter else "") + base.__name__
    return type(
        name, (*mixins, base), {"__doc__": f"{base.__name__} with mixins {[m.__name__ for m in mixins]}."}
    )


def build_head(
    kind: str,
    in_dim: int,
    num_classes: int,
    *,
    scale: float = 30.0,
    margin_rad: float = 0.3,
    subcenters: int = 1,
    dynamic: bool = False,
    class_counts: Sequence[int] | None = None,
    margin_a: float = DEFAULT_MARGIN_A,
    margin_b: float = DEFAULT_MARGIN_B,
) -> MarginSoftmax:
    """Build a margin head.

    Args:
        kind: ``"arcface"``, ``"cosface"`` or ``"softmax"`` (normalised softmax, no margin).
        in_dim: embedding width D.
        num_classes: C.
        scale: logit scale s.
        margin_rad: the fixed margin (radians for ArcFace, cosine units for CosFace).
        subcenters: k sub-centres per class (1 = plain).
        dynamic: per-class margins from ``class_counts`` (:func:`dynamic_margins` with ``margin_a``,
            ``margin_b``); without counts (e.g. when loading weights) the table is filled later from the
            state dict.
    """
    cls = head_class(kind, subcenters > 1, dynamic)
    margins = (
        dynamic_margins(class_counts, margin_a, margin_b) if dynamic and class_counts is not None else None
    )
    return cls(
        in_dim, num_classes, scale=scale, margin_rad=margin_rad, subcenters=subcenters, class_margins=margins
    )
