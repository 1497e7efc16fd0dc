"""DELG-style local features on the stride-16 feature map of the global model's backbone.

- **Input normalisation** ``BatchNorm2d(affine=False)``: each channel of the map standardised with
  running statistics. A pretrained backbone's stride-16 map is not bounded like the post-ReLU maps
  DELG used (EfficientNet-Lite0's ``blocks.4``: linear bottleneck, std 6.4, mean square 41): without it
  the reconstruction loss started at ~40 (x 10 in the loss) and the head barely moved in a CPU budget.
  Checkpoints saved before this layer existed load with an identity normalisation (mean 0, var 1).
- **Attention** ``conv 1×1 → BN → ReLU → conv 1×1 → softplus``: a score ``>= 0`` per location.
- **Reduction autoencoder** ``conv 1×1 (C → 128)`` / ``conv 1×1 (128 → C)`` trained with a
  reconstruction (mean squared error) loss; the 128-d codes, L2-normalised, are the local descriptors.
- **Attention classifier**: the attention-weighted mean of the L2-normalised *reconstructed* features
  goes through its own linear classifier (cross-entropy), which teaches the attention where the
  discriminative locations are (Noh et al., 2017; Cao et al., 2020).

The head receives the backbone features detached (the gradient into the backbone is stopped, as in
DELG), so training it never changes the global descriptor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LocalHead(nn.Module):
    """Attention + reduction autoencoder + attention classifier over a ``(B, C, h, w)`` feature map."""

    def __init__(self, in_channels: int, num_classes: int, dim: int = 128, hidden: int = 512):
        super().__init__()
        self.in_channels = in_channels
        self.dim = dim
        self.norm = nn.BatchNorm2d(in_channels, affine=False)
        self.attention = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=True),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1, bias=True),
        )
        self.encoder = nn.Conv2d(in_channels, dim, 1, bias=True)
        self.decoder = nn.Conv2d(dim, in_channels, 1, bias=True)
        self.classifier = nn.Linear(in_channels, num_classes)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # Heads saved before the input normalisation existed: identity statistics (their behaviour).
        for key, value in (
            ("running_mean", torch.zeros(self.in_channels)),
            ("running_var", torch.ones(self.in_channels)),
            ("num_batches_tracked", torch.zeros((), dtype=torch.long)),
        ):
            state_dict.setdefault(f"{prefix}norm.{key}", value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def scores(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, h, w)`` float32 attention scores ``>= 0`` (softplus)."""
        return F.softplus(self.attention(self.norm(fmap)).float()).squeeze(1)

    def descriptors(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, dim, h, w)`` float32 codes, L2-normalised over channels."""
        return F.normalize(self.encoder(self.norm(fmap)).float(), dim=1)

    def forward(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training outputs for a (detached) ``(B, C, h, w)`` map.

        Returns ``{"attention": (B, h, w), "logits": (B, num_classes), "recon_loss": ()}``, float32.
        """
        fmap = self.norm(fmap.detach())
        att = F.softplus(self.attention(fmap).float()).squeeze(1)
        code = self.encoder(fmap)
        recon = self.decoder(code)
        recon_loss = F.mse_loss(recon.float(), fmap.float())
        pooled = (F.normalize(recon.float(), dim=1) * att.unsqueeze(1)).mean(dim=(2, 3))
        logits = self.classifier(pooled)
        return {"attention": att, "logits": logits.float(), "recon_loss": recon_loss}
