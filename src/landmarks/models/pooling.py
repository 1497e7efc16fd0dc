"""Generalised-mean (GeM) pooling: a pure function and a thin module with a learnable exponent.

GeM (Radenović et al., 2018) pools a feature map ``x`` of shape ``(B, C, H, W)`` into ``(B, C)`` as
``(mean_{h,w} clamp(x, eps)^p)^(1/p)``: ``p = 1`` is average pooling, ``p → ∞`` max pooling.
"""

from __future__ import annotations

import torch
from torch import nn


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over the spatial dimensions.

    Args:
        x: ``(B, C, H, W)`` feature map (any float dtype; computed in float32).
        p: the exponent, a float or a 0-d / 1-element tensor (learnable in :class:`GeM`).
        eps: values are clamped to at least ``eps`` so fractional powers stay defined.

    Returns:
        ``(B, C)`` float32 pooled features.
    """
    x = x.float().clamp(min=eps)
    if isinstance(p, torch.Tensor):
        p = p.float()
    return x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent ``p`` (init 3) : ``(B, C, H, W) -> (B, C)`` float32."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``(B, C, H, W)`` to ``(B, C)`` float32."""
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4f}, eps={self.eps}"
