"""Revisited Oxford / Paris (``roxford5k``, ``rparis6k``) as ``revisitop`` publishes them.

Layout (Radenović et al., CVPR 2018; https://github.com/filipradenovic/revisitop)::

    <root>/jpg/<name>.jpg          the database images (and the queries, which are database images too)
    <root>/gnd_<dataset>.pkl       {"imlist": [names], "qimlist": [names],
                                    "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...],
                                             "junk": [...]} per query]}     (0-based imlist indices)
    <root>/gnd_<dataset>.json      the same content as JSON (read instead of the pickle when present)

``<root>`` may also be the folder that holds ``<dataset>/`` (revisitop's ``data/datasets``). The pickle
comes from the dataset's authors, but a pickle can run any code when loaded, so :func:`read_gnd` uses a
restricted unpickler that admits only dicts, lists, tuples, strings, numbers, booleans, None and numpy
arrays/scalars (the globals numpy's pickles name: ``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``,
``_frombuffer`` (protocol 5),
``_codecs.encode`` with the ``latin1`` codec and ``bytes`` that protocol-2 array pickles use for their
bytes), and
refuses anything else with a :class:`~landmarks.errors.DataFormatError` naming the file and the global.
"""

from __future__ import annotations

import _codecs
import io
import json
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landmarks.data.collection import ImageRecord
from landmarks.errors import DataFormatError

#: The datasets revisitop publishes (other names are accepted if their files are there).
DATASETS = ("roxford5k", "rparis6k")
#: Keys of one query's ground truth (``bbx`` and the three index lists).
GND_LISTS = ("easy", "hard", "junk")


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to the text codecs numpy's protocol-2 pickles use."""
    if not isinstance(obj, str) or encoding.lower().replace("-", "").replace("_", "") not in (
        "latin1",
        "utf8",
    ):
        raise RefusedGlobal(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not allowed")
    return _codecs.encode(obj, encoding, errors)  # type: ignore[no-any-return]


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    core = np._core.multiarray  # type: ignore[attr-defined]
    allowed: dict[tuple[str, str], Callable[..., Any] | type] = {
        ("_codecs", "encode"): _latin1_encode,  # protocol 2: an array's bytes travel as a latin-1 string
        ("builtins", "bytes"): bytes,  # protocol 2: empty bytes are written as bytes()
        ("__builtin__", "bytes"): bytes,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = core._reconstruct
        allowed[(mod, "scalar")] = core.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5: an array's bytes as a buffer
        allowed[(mod, "_frombuffer")] = np._core.numeric._frombuffer  # type: ignore[attr-defined]
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "ndarray")] = np.ndarray
        allowed[(mod, "dtype")] = np.dtype
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the allowed set."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data and numpy arrays; any other global is refused."""

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global, else raise :class:`pickle.UnpicklingError` naming it."""
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise RefusedGlobal(f"global '{module}.{name}' is not allowed")
        return found

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (a plain data pickle has none)."""
        raise RefusedGlobal("persistent ids are not allowed")


def restricted_loads(data: bytes, source: str = "pickle") -> Any:
    """Unpickle ``data`` admitting only plain data and numpy arrays (:class:`RestrictedUnpickler`).

    Raises:
        DataFormatError: ``"<source>: refused: global 'os.system' is not allowed ..."`` (nothing of it
            runs) or the pickle is malformed.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as e:
        raise DataFormatError(
            f"{source}: refused: {e} (only dicts, lists, tuples, strings, numbers and numpy "
            "arrays may be in a ground-truth pickle; or give the same content as JSON)"
        ) from None
    except Exception as e:  # truncated or corrupt data: EOFError, ValueError, TypeError, ...
        raise DataFormatError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


@dataclass
class QueryTruth:
    """The ground truth of one query: its box and the database indices of each kind."""

    # (x1, y1, x2, y2) in pixels of the query image
    bbx: tuple[float, float, float, float]
    # (n,) int64 database indices of the easy positives
    easy: np.ndarray
    # (n,) int64 database indices of the hard positives
    hard: np.ndarray
    # (n,) int64 database indices of the junk images (neither positive nor negative)
    junk: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """``{"bbx", "easy", "hard", "junk"}`` with lists (JSON-ready; also what ``metrics.revisited_map`` reads)."""
        return {"bbx": list(self.bbx), **{k: getattr(self, k).tolist() for k in GND_LISTS}}


@dataclass
class RevisitedGroundTruth:
    """``imlist`` (database image names), ``qimlist`` (query image names) and one :class:`QueryTruth` per query."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[QueryTruth]

    def to_json(self) -> dict[str, Any]:
        """The JSON form read back by :func:`read_gnd` (``gnd_<name>.json``)."""
        return {"imlist": self.imlist, "qimlist": self.qimlist, "gnd": [g.as_dict() for g in self.gnd]}


def _names(obj: Any, key: str, source: str) -> list[str]:
    if not isinstance(obj, (list, tuple)) or not all(isinstance(x, str) and x for x in obj):
        raise DataFormatError(f"{source}: '{key}' must be a list of image names")
    return [str(x) for x in obj]


def _indices(obj: Any, where: str, n_db: int) -> np.ndarray:
    try:
        arr = np.asarray(obj if obj is not None else [], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataFormatError(f"{where} must be a list of database indices") from None
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise DataFormatError(f"{where} must hold integers")
    idx = arr.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_db):
        raise DataFormatError(
            f"{where}: index {int(idx.min() if idx.min() < 0 else idx.max())} is outside "
            f"the {n_db} database images"
        )
    return idx


def parse_gnd(obj: Any, source: str = "ground truth") -> RevisitedGroundTruth:
    """Validate a loaded ``gnd`` dictionary (from the pickle or JSON) into typed form.

    Raises :class:`DataFormatError` naming ``source`` and the offending key or query.
    """
    if not isinstance(obj, dict):
        raise DataFormatError(
            f"{source}: expected a dictionary with imlist, qimlist and gnd, got {type(obj).__name__}"
        )
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in obj]
    if missing:
        raise DataFormatError(f"{source}: missing key(s) {', '.join(missing)}")
    imlist = _names(obj["imlist"], "imlist", source)
    qimlist = _names(obj["qimlist"], "qimlist", source)
    entries = obj["gnd"]
    if not isinstance(entries, (list, tuple)) or len(entries) != len(qimlist):
        raise DataFormatError(f"{source}: 'gnd' must be a list with one entry per query ({len(qimlist)})")
    gnd: list[QueryTruth] = []
    for i, e in enumerate(entries):
        where = f"{source}: gnd[{i}] ({qimlist[i]})"
        if not isinstance(e, dict):
            raise DataFormatError(f"{where} is not a dictionary")
        try:
            bbx = [float(v) for v in np.asarray(e.get("bbx"), dtype=np.float64).reshape(-1)]
        except (TypeError, ValueError):
            bbx = []
        if len(bbx) != 4 or not all(math.isfinite(v) for v in bbx) or bbx[2] <= bbx[0] or bbx[3] <= bbx[1]:
            raise DataFormatError(f"{where}: 'bbx' must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
        lists = {k: _indices(e.get(k), f"{where}: '{k}'", len(imlist)) for k in GND_LISTS}
        gnd.append(QueryTruth(bbx=(bbx[0], bbx[1], bbx[2], bbx[3]), **lists))
    return RevisitedGroundTruth(imlist=imlist, qimlist=qimlist, gnd=gnd)


def read_gnd(path: str | Path) -> RevisitedGroundTruth:
    """Read ``gnd_<name>.pkl`` (restricted unpickler) or ``gnd_<name>.json``.

    Raises :class:`DataFormatError` (refused pickle, unreadable file, wrong content) naming ``path``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    else:
        obj = restricted_loads(data, str(path))
    return parse_gnd(obj, str(path))


@dataclass
class RevisitedDataset:
    """A dataset in revisitop layout: where its images are and its ground truth."""

    name: str
    # the folder holding jpg/ and gnd_<name>.*
    root: Path
    truth: RevisitedGroundTruth
    # the ground-truth file that was read
    gnd_path: Path

    def image_path(self, name: str) -> Path:
        """``<root>/jpg/<name>.jpg``."""
        return self.root / "jpg" / f"{name}.jpg"

    def database_records(self) -> list[ImageRecord]:
        """One record per ``imlist`` entry, in order (record ``i`` is database index ``i``)."""
        return [ImageRecord(name, self.image_path(name)) for name in self.truth.imlist]

    def gnd_dicts(self) -> list[dict[str, Any]]:
        """The per-query ground truth as :func:`landmarks.metrics.revisited_map` reads it."""
        return [g.as_dict() for g in self.truth.gnd]


def find_dataset(root: str | Path, name: str) -> RevisitedDataset:
    """Open dataset ``name`` at ``root`` (or ``root/name``): ``gnd_<name>.json`` if present, else ``.pkl``.

    Raises :class:`DataFormatError` when the ground truth or the ``jpg/`` folder is missing.
    """
    root = Path(root)
    for base in (root, root / name):
        for ext in (".json", ".pkl"):
            gnd_path = base / f"gnd_{name}{ext}"
            if gnd_path.is_file():
                if not (base / "jpg").is_dir():
                    raise DataFormatError(f"{base}: no jpg/ folder beside {gnd_path.name}")
                return RevisitedDataset(name=name, root=base, truth=read_gnd(gnd_path), gnd_path=gnd_path)
    raise DataFormatError(f"{root}: no gnd_{name}.pkl or gnd_{name}.json (here or in {root / name})")


def crop_box(width: int, height: int, bbx: Sequence[float]) -> tuple[int, int, int, int]:
    """Pixel box ``(x1, y1, x2, y2)`` of a query: floor/ceil of ``bbx`` clipped to the image, at least 1 px."""
    x1 = min(max(0, math.floor(bbx[0])), width - 1)
    y1 = min(max(0, math.floor(bbx[1])), height - 1)
    x2 = max(x1 + 1, min(width, math.ceil(bbx[2])))
    y2 = max(y1 + 1, min(height, math.ceil(bbx[3])))
    return x1, y1, x2, y2
