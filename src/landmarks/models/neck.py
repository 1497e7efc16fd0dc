"""The embedding neck of the GLR-2020 winners: Linear(C -> D) + BatchNorm1d + PReLU."""

from __future__ import annotations

import torch
from torch import nn


class Neck(nn.Module):
    """``(B, C)`` pooled features -> ``(B, D)`` un-normalised embedding (Linear, BatchNorm1d, PReLU).

    ``dropout`` (before the Linear layer) is active in training only.
    """

    def __init__(self, in_dim: int, out_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_dim, out_dim, bias=True)
        self.bn = nn.BatchNorm1d(out_dim)
        self.act = nn.PReLU()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` -> ``(B, out_dim)``."""
        return self.act(self.bn(self.linear(self.dropout(x))))
