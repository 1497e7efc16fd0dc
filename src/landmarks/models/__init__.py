"""Models: timm backbone, GeM pooling, Linear/BN/PReLU neck, margin heads, DELG-style local head.

``LandmarkNet`` (in :mod:`landmarks.models.net`) puts them together; presets live in
:mod:`landmarks.models.presets`.
"""

from landmarks.models.net import HeadConfig, LandmarkNet, LocalConfig, ModelConfig

__all__ = ["HeadConfig", "LandmarkNet", "LocalConfig", "ModelConfig"]
