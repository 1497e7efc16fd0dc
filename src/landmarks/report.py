"""HTML reports of recognition predictions: metrics, plots, and a row per query, worst mistakes first.

``write_report(predictions_csv, solution_csv, out_html, neighbours_jsonl=None, index_dir=None, conf=...)``
writes ONE self-contained HTML file (no external URL anywhere; a Content-Security-Policy forbids loads):

- the metrics (GAP, GAP ignoring non-landmark queries, top-1 accuracy, counts), for all scored queries
  and, when the solution has a ``Usage`` column, for the Public and Private parts;
- a precision-recall curve of the predictions ranked by confidence (the curve whose area GAP is) and
  histograms of the confidence on landmark queries (right / wrong) and on non-landmark queries
  (matplotlib, Agg canvas, embedded as PNG);
- a row per query, worst first: confident wrong predictions and confident predictions on non-landmark
  queries at the top, then missed landmark queries, then right predictions from the least confident,
  then correctly abstained non-landmark queries. Each row shows the query thumbnail, its top-k
  neighbours (from the ``landmarks recognize --neighbours`` JSONL) with scores, landmarks and
  right/wrong marks, and for the top verified neighbour (``inliers`` not null) the inlier matches,
  recomputed with SIFT + RANSAC and drawn. Rows are filterable in the page (all / wrong / right /
  non-landmark / no prediction, and a text filter on id or landmark; the filter is kept in the URL
  hash, e.g. ``report.html#filter=wrong&q=123``).

Images are embedded as small JPEG thumbnails in ``data:`` URIs, each once however many rows show it
(a CSS class per thumbnail); an image that cannot be read shows a
placeholder with the reason. The number of rows is capped (``max_rows``) and the page says how many
were omitted. The pure pieces (:func:`classify_prediction`, :func:`rank_worst_first`,
:func:`precision_recall_curve`, :func:`summarize`) are usable on their own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landmarks.data.decode import decode_image, open_image
from landmarks.errors import DataFormatError, ImageDecodeError, LandmarksError
from landmarks.utils.io import atomic_write
from landmarks.utils.progress import Progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from landmarks.local_features import LocalFeatures

logger = logging.getLogger("landmarks")

#: A recognition prediction: (landmark id, confidence).
Prediction = tuple[str, float]

#: Outcomes of one query, in the order rows are shown (worst first).
OUTCOMES = ("wrong", "false_positive", "missed", "right", "abstained")
_OUTCOME_RANK = {o: i for i, o in enumerate(OUTCOMES)}
#: How each outcome is marked and described in the page.
_OUTCOME_MARK = {
    "wrong": ("\u2717", "wrong landmark"),
    "false_positive": ("\u2717", "prediction on a non-landmark query"),
    "missed": ("\u2205", "landmark query without a prediction"),
    "right": ("\u2713", "right landmark"),
    "abstained": ("\u2713", "non-landmark query, no prediction"),
}
#: Filters offered in the page: (tag, button label).
FILTERS = (("all", "all"), ("wrong", "wrong"), ("right", "right"), ("nonlandmark", "non-landmark"),
           ("noprediction", "no prediction"))


@dataclass
class ReportConfig:
    """What the report shows and how large it may grow."""

    max_rows: int = 500  # query rows written, worst first; the others are counted and said to be omitted
    top_k: int = 5  # neighbours shown per query (the JSONL's first k, in its order)
    thumb_px: int = 128  # longer side of a query thumbnail, pixels (8..512)
    neighbour_thumb_px: int = 96  # longer side of a neighbour thumbnail, pixels (8..512)
    jpeg_quality: int = 80  # JPEG quality of the embedded thumbnails and match drawings (1-95)
    max_match_drawings: int = 50  # rows (worst first) whose top verified neighbour gets its inliers drawn
    match_max_side_px: int = 512  # match drawings show the images downscaled to this longer side (features come from the full images, as at indexing)
    match_drawing_px: int = 480  # longer side of an embedded match drawing, pixels
    max_image_pixels: int = 100_000_000  # decoder pixel limit (decompression-bomb guard)
    title: str = "landmarks report"  # page title

    def __post_init__(self) -> None:
        for name in ("max_rows", "top_k", "max_match_drawings"):
            if getattr(self, name) < 0:
                raise LandmarksError(f"report: {name} must be >= 0, got {getattr(self, name)}")
        for name, hi in (("thumb_px", 512), ("neighbour_thumb_px", 512), ("match_max_side_px", 4096),
                         ("match_drawing_px", 2048)):
            if not 8 <= getattr(self, name) <= hi:
                raise LandmarksError(f"report: {name} must be in 8..{hi} pixels, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 95:
            raise LandmarksError(f"report: jpeg_quality must be in 1..95, got {self.jpeg_quality}")


# --- pure scoring pieces ----------------------------------------------------------------------------

@dataclass(frozen=True)
class QueryResult:
    """One scored query: its true landmarks (empty: non-landmark), its prediction and the outcome."""

    id: str
    truth: tuple[str, ...]
    prediction: Prediction | None
    outcome: str
    usage: str | None = None

    @property
    def is_landmark(self) -> bool:
        """True when the query shows a landmark (its solution cell is not empty)."""
        return bool(self.truth)

    @property
    def confidence(self) -> float | None:
        """The prediction's confidence, None without a prediction."""
        return None if self.prediction is None else self.prediction[1]

    @property
    def tags(self) -> tuple[str, ...]:
        """The page filters this row belongs to (besides ``all``)."""
        tags = []
        if self.outcome in ("wrong", "false_positive"):
            tags.append("wrong")
        if self.outcome == "right":
            tags.append("right")
        tags.append("landmark" if self.is_landmark else "nonlandmark")
        if self.prediction is None:
            tags.append("noprediction")
        return tuple(tags)


def classify_prediction(prediction: Prediction | None, truth: Sequence[str]) -> str:
    """The outcome of one query: ``wrong``, ``false_positive``, ``missed``, ``right`` or ``abstained``.

    ``truth`` empty means a non-landmark query: a prediction there is a ``false_positive`` (it counts
    as a wrong prediction in GAP), no prediction is ``abstained`` (correct).
    """
    if prediction is None:
        return "missed" if truth else "abstained"
    if not truth:
        return "false_positive"
    return "right" if prediction[0] in truth else "wrong"


def _badness_key(r: QueryResult) -> tuple[int, float, str]:
    conf = r.confidence
    c = 0.0 if conf is None or math.isnan(conf) else conf
    rank = _OUTCOME_RANK[r.outcome]
    # Wrong predictions (either kind): most confident first. Right ones: least confident first.
    if r.outcome in ("wrong", "false_positive"):
        return (0, -c, r.id)
    return (rank, c, r.id)


def rank_worst_first(results: Sequence[QueryResult]) -> list[QueryResult]:
    """Order queries worst mistakes first (deterministic; ties broken by id).

    1. wrong predictions, on landmark and on non-landmark queries together, most confident first
       (the ones that cost most GAP); 2. landmark queries without a prediction; 3. right predictions,
    least confident first; 4. non-landmark queries correctly left without a prediction.
    """
    return sorted(results, key=_badness_key)


def score_queries(predictions: Mapping[str, Prediction | None], solution: Mapping[str, Sequence[str]],
                  usage: Mapping[str, str] | None = None) -> list[QueryResult]:
    """One :class:`QueryResult` per solution id (predictions for other ids are ignored), in solution order."""
    out = []
    for qid, truth in solution.items():
        pred = predictions.get(qid)
        out.append(QueryResult(qid, tuple(truth), pred, classify_prediction(pred, truth),
                               None if usage is None else usage.get(qid)))
    return out


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall after each prediction, ranked by confidence (descending; ties by id).

    Arrays are ``(N,)`` over the N ranked predictions: ``precision`` and ``recall`` float64,
    ``confidence`` float64, ``relevant`` bool (the prediction is right). ``num_landmark_queries`` is M,
    the GAP denominator; GAP = sum(precision[relevant]) / M.
    """

    precision: np.ndarray
    recall: np.ndarray
    confidence: np.ndarray
    relevant: np.ndarray
    num_landmark_queries: int

    @property
    def gap(self) -> float:
        """Global Average Precision, the area this curve stands for."""
        if self.num_landmark_queries == 0:
            return 0.0
        return float(self.precision[self.relevant].sum() / self.num_landmark_queries)


def precision_recall_curve(predictions: Mapping[str, Prediction | None], solution: Mapping[str, Sequence[str]],
                           ignore_non_landmarks: bool = False) -> PRCurve:
    """The precision-recall curve of the predictions for the ``solution`` ids ranked by confidence.

    With ``ignore_non_landmarks`` the predictions on non-landmark queries are left out (as in
    "GAP ignoring non-landmarks"). Predictions for ids not in ``solution`` are ignored.
    """
    items = []
    for qid, truth in solution.items():
        pred = predictions.get(qid)
        if pred is None or (ignore_non_landmarks and not truth):
            continue
        items.append((-float(pred[1]), qid, pred[0] in truth))
    items.sort(key=lambda t: (t[0], t[1]))
    m = sum(1 for t in solution.values() if t)
    relevant = np.array([t[2] for t in items], dtype=bool)
    hits = np.cumsum(relevant, dtype=np.float64)
    n = np.arange(1, len(items) + 1, dtype=np.float64)
    precision = hits / n if len(items) else np.zeros(0)
    recall = hits / m if m else np.zeros(len(items))
    conf = np.array([-t[0] for t in items], dtype=np.float64)
    return PRCurve(precision, recall, conf, relevant, m)


def summarize(predictions: Mapping[str, Prediction | None], solution: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Metrics and counts over the ``solution`` ids (predictions for other ids are ignored).

    Keys: ``gap``, ``gap_ignoring_non_landmarks``, ``top1_accuracy`` (floats from
    :mod:`landmarks.metrics`; NaN when no query is a landmark), ``queries``, ``landmark_queries``, ``non_landmark_queries``,
    ``predictions``, ``right``, ``wrong``, ``false_positives``, ``missed``, ``abstained`` (ints).
    """
    from landmarks.metrics import global_average_precision, top1_accuracy

    preds: dict[str, Prediction] = {}
    for qid in solution:
        p = predictions.get(qid)
        if p is not None:
            preds[qid] = p
    counts = dict.fromkeys(OUTCOMES, 0)
    for qid, truth in solution.items():
        counts[classify_prediction(preds.get(qid), truth)] += 1
    n_landmark = sum(1 for t in solution.values() if t)
    return {
        "gap": float(global_average_precision(preds, solution)),
        "gap_ignoring_non_landmarks": float(global_average_precision(preds, solution, ignore_non_landmarks=True)),
        "top1_accuracy": float(top1_accuracy(preds, solution)),
        "queries": len(solution),
        "landmark_queries": n_landmark,
        "non_landmark_queries": len(solution) - n_landmark,
        "predictions": len(preds),
        "right": counts["right"],
        "wrong": counts["wrong"],
        "false_positives": counts["false_positive"],
        "missed": counts["missed"],
        "abstained": counts["abstained"],
    }


# --- inputs -----------------------------------------------------------------------------------------

def read_neighbours_jsonl(path: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of a ``landmarks recognize --neighbours`` JSONL file, by query id.

    Each row: ``{"id", "path", "landmark", "confidence", "neighbours": [{"id", "landmark", "score",
    "inliers", "path"}]}``; only ``id`` is required. Raises :class:`DataFormatError` naming the line.
    """
    path = Path(path)
    rows: dict[str, dict[str, Any]] = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise LandmarksError(f"{path}: cannot read the neighbours file: {e.strerror or e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise DataFormatError(f"{path}:{lineno}: expected an object with a string 'id'")
            neighbours = row.get("neighbours") or []
            if not isinstance(neighbours, list) or not all(isinstance(n, dict) for n in neighbours):
                raise DataFormatError(f"{path}:{lineno}: 'neighbours' must be a list of objects")
            row["neighbours"] = neighbours
            rows[row["id"]] = row
    return rows


def _load_inputs(predictions_csv: Path, solution_csv: Path) -> tuple[
        dict[str, Prediction | None], dict[str, tuple[str, ...]], dict[str, str] | None, list[str]]:
    """(predictions, solution truth, usage or None, ids predicted but absent from the solution)."""
    from landmarks.submission import read_recognition_predictions, read_recognition_solution

    for p, what in ((predictions_csv, "predictions"), (solution_csv, "solution")):
        if not p.is_file():
            raise LandmarksError(f"{p}: no such {what} file")
    sol = read_recognition_solution(solution_csv)
    # Read without the solution so that stray ids are reported in the page rather than fatal.
    raw = read_recognition_predictions(predictions_csv)
    predictions = {q: p for q, p in raw.items() if q not in sol.ignored}
    extra = [q for q in predictions if q not in sol.truth]
    for q in extra:
        del predictions[q]
    solution = {q: tuple(t) for q, t in sol.truth.items()}
    return predictions, solution, sol.usage, extra


# --- images -----------------------------------------------------------------------------------------

def _jpeg_data_uri(img: Any, quality: int) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def array_to_data_uri(arr: np.ndarray, max_side_px: int, quality: int = 80) -> str:
    """A ``(H, W, 3)`` uint8 RGB array as a JPEG ``data:`` URI, downscaled to ``max_side_px`` (longer side)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")
    img.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
    return _jpeg_data_uri(img, quality)


def thumbnail(source: str | Path, max_side_px: int, quality: int = 80,
              max_pixels: int | None = 100_000_000) -> tuple[str, int, int]:
    """``(JPEG data URI, width, height)`` of the image at ``source``, longer side at most ``max_side_px``.

    Raises :class:`ImageDecodeError` (with ``.reason``) when the image cannot be read.
    """
    from PIL import Image

    img = open_image(source, max_pixels=max_pixels, min_side_px=max_side_px)
    img.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
    return _jpeg_data_uri(img, quality), img.size[0], img.size[1]


@dataclass(frozen=True)
class _Thumb:
    """An embedded thumbnail: the CSS class carrying it as a background image, and its size."""

    css_class: str
    width: int
    height: int


class _Images:
    """Thumbnails by (path, size), each decoded and embedded ONCE (as a CSS class) however often it shows.

    Failures are remembered with their reason. ``styles`` holds one CSS rule per embedded thumbnail.
    """

    def __init__(self, conf: ReportConfig, base_dirs: Sequence[Path]):
        self.conf = conf
        self.base_dirs = list(base_dirs)
        self._cache: dict[tuple[str, int], _Thumb | str] = {}
        self.styles: list[str] = []
        self.failures = 0


    def resolve(self, path: str) -> Path:
        p = Path(path)
        if p.is_absolute() or p.exists():
            return p
        for base in self.base_dirs:
            if (base / p).exists():
                return base / p
        return p

    def thumb(self, path: str | None, size: int) -> _Thumb | str:
        """The thumbnail of ``path`` with longer side ``size``, or the reason it cannot be shown."""
        if not path:
            return "no image path"
        key = (path, size)
        if key not in self._cache:
            result: _Thumb | str
            try:
                uri, w, h = thumbnail(self.resolve(path), size, self.conf.jpeg_quality, self.conf.max_image_pixels)
                result = _Thumb(f"t{len(self.styles)}", w, h)
                self.styles.append(f'.{result.css_class}{{width:{w}px;height:{h}px;background-image:url("{uri}")}}')
            except ImageDecodeError as e:
                result = e.reason
            except Exception as e:  # never let one bad image end the report
                result = f"{type(e).__name__}: {e}"
            if isinstance(result, str):
                self.failures += 1
                logger.debug("report: cannot show %s: %s", path, result)
            self._cache[key] = result
        return self._cache[key]


class _MatchDrawer:
    """Verifies a query and a neighbour as recognition did and draws the inlier matches.

    The features come from the extractor the index recorded (:class:`landmarks.rerank.PairVerifier`:
    the default SIFT one without an index or local features), extracted from the full images as the
    index extracted them; only the drawing is downscaled. When that extractor cannot be built (the
    index's model run is missing) the drawer is disabled and ``unavailable`` says why.
    """

    def __init__(self, conf: ReportConfig, images: _Images, index_dir: Path | None = None):
        from landmarks.rerank import PairVerifier

        self.conf = conf
        self.images = images
        self.unavailable: str | None = None
        self._feats: dict[str, tuple[np.ndarray, LocalFeatures]] = {}
        try:
            self._verifier: PairVerifier | None = PairVerifier.for_index_dir(index_dir)
        except LandmarksError as e:
            self._verifier = None
            self.unavailable = f"match drawing unavailable ({e})"

    @property
    def features(self) -> str:
        """The name of the local features drawn (``rootsift``, ``delg``)."""
        return self._verifier.extractor.name if self._verifier is not None else ""

    def _features(self, path: str) -> tuple[np.ndarray, LocalFeatures]:
        assert self._verifier is not None
        if path not in self._feats:
            arr = decode_image(self.images.resolve(path), max_pixels=self.conf.max_image_pixels)
            self._feats[path] = (arr, self._verifier.extractor(arr))
        return self._feats[path]

    def draw(self, query_path: str, neighbour_path: str) -> tuple[str, int]:
        """(JPEG data URI of the drawing, inliers found now). Raises on unreadable images."""
        from landmarks.viz import draw_verification

        assert self._verifier is not None
        img_a, fa = self._features(query_path)
        img_b, fb = self._features(neighbour_path)
        v = self._verifier.verify(fa, fb)
        drawing = draw_verification(img_a, img_b, fa, fb, v, max_side_px=self.conf.match_max_side_px)
        return array_to_data_uri(drawing, self.conf.match_drawing_px, self.conf.jpeg_quality), int(v.num_inliers)


class _IndexPaths:
    """Image paths by id from an index folder, loaded on first use, for JSONL rows without a path."""

    def __init__(self, index_dir: Path | None):
        self.index_dir = index_dir
        self._paths: dict[str, str] | None = None
        self.note: str | None = None

    def get(self, image_id: str) -> str | None:
        if self.index_dir is None:
            return None
        if self._paths is None:
            self._paths = self._load()
        return self._paths.get(image_id)

    def _load(self) -> dict[str, str]:
        assert self.index_dir is not None
        try:
            return _index_image_paths(self.index_dir)
        except Exception as e:  # the JSONL alone must be enough
            self.note = f"index {self.index_dir}: image paths unavailable ({e})"
            logger.warning("report: %s", self.note)
            return {}


def _index_image_paths(index_dir: Path) -> dict[str, str]:
    """Image id -> path of the images of an index folder (no model is loaded)."""
    from landmarks.index import LandmarkIndex

    idx = LandmarkIndex.load(index_dir)
    return {i: str(p) for i, p in zip(idx.ids, idx.paths) if p}


# --- plots ------------------------------------------------------------------------------------------

def _new_figure(width_in: float, height_in: float) -> Figure:
    """A matplotlib figure on an Agg canvas; pyplot and the global backend are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def pr_curve_figure(curves: Mapping[str, PRCurve]) -> Figure:
    """Precision against recall, one step line per named curve (its GAP in the legend)."""
    fig = _new_figure(5.2, 3.8)
    ax = fig.add_subplot()
    for name, c in curves.items():
        if len(c.precision):
            ax.step(np.r_[0.0, c.recall], np.r_[c.precision[0], c.precision], where="post",
                    label=f"{name} (GAP {c.gap:.3f})")
        else:
            ax.plot([], [], label=f"{name} (no predictions)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (right predictions / landmark queries)")
    ax.set_ylabel("precision")
    ax.set_title("predictions ranked by confidence")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def confidence_histogram_figure(results: Sequence[QueryResult], bins: int = 20) -> Figure:
    """Histograms of the confidence on landmark queries (right / wrong) and on non-landmark queries."""
    groups = {
        "landmark queries, right": [r.confidence for r in results if r.outcome == "right"],
        "landmark queries, wrong": [r.confidence for r in results if r.outcome == "wrong"],
        "non-landmark queries": [r.confidence for r in results if r.outcome == "false_positive"],
    }
    colours = {"landmark queries, right": "#2e7d32", "landmark queries, wrong": "#c62828",
               "non-landmark queries": "#6a1b9a"}
    vals = [float(v) for g in groups.values() for v in g if v is not None and math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = _new_figure(5.2, 3.8)
    ax = fig.add_subplot()
    for name, g in groups.items():
        data = [float(v) for v in g if v is not None and math.isfinite(v)]
        ax.hist(data, bins=edges.tolist(), histtype="step", linewidth=1.8, color=colours[name],
                label=f"{name} ({len(data)})")
    ax.set_xlabel("confidence of the prediction")
    ax.set_ylabel("queries")
    ax.set_title("confidence of the predictions")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def save_pr_curve(curves: PRCurve | Mapping[str, PRCurve], path: str | Path, dpi: int = 100) -> Path:
    """Write the precision-recall plot of ``curves`` to a PNG file, atomically. Returns the path."""
    if isinstance(curves, PRCurve):
        curves = {"predictions": curves}
    data = figure_png(pr_curve_figure(curves), dpi)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


def save_confidence_histogram(results: Sequence[QueryResult], path: str | Path, dpi: int = 100) -> Path:
    """Write the confidence histograms of ``results`` to a PNG file, atomically. Returns the path."""
    data = figure_png(confidence_histogram_figure(results), dpi)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


# --- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;padding:16px 24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:20px 0 8px}
.sub{color:#666;margin-bottom:12px}
table.metrics{border-collapse:collapse;background:#fff} table.metrics td,table.metrics th{border:1px solid #ddd;padding:4px 8px;text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plots img{background:#fff;border:1px solid #ddd;max-width:100%}
.notes li{color:#8a5300}
.bar{position:sticky;top:0;background:#fafafa;padding:8px 0;z-index:2;display:flex;gap:6px;align-items:center;flex-wrap:wrap;border-bottom:1px solid #ddd}
.bar button{border:1px solid #bbb;background:#fff;border-radius:4px;padding:4px 10px;cursor:pointer}
.bar button.active{background:#1565c0;color:#fff;border-color:#1565c0}
.bar input{padding:4px 8px;border:1px solid #bbb;border-radius:4px;min-width:220px}
table.rows{border-collapse:collapse;width:100%;background:#fff;margin-top:8px}
table.rows td,table.rows th{border-bottom:1px solid #e4e4e4;padding:6px;vertical-align:top;text-align:left}
.mark{font-size:22px;font-weight:bold;text-align:center} .o-right .mark,.o-abstained .mark{color:#2e7d32}
.o-wrong .mark,.o-false_positive .mark{color:#c62828} .o-missed .mark{color:#999}
.o-wrong,.o-false_positive{background:#fff5f5}
.qid{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all;max-width:160px}
.nbs{display:flex;gap:6px;flex-wrap:wrap}
figure{margin:0;text-align:center;font-size:11px;max-width:110px}
figure img,.ph,.th{display:block;margin:0 auto} .th{background-size:100% 100%}
.nb{border:3px solid #ccc;padding:2px;border-radius:3px} .nb.ok{border-color:#2e7d32} .nb.bad{border-color:#c62828}
.ph{box-sizing:border-box;width:96px;height:72px;background:repeating-linear-gradient(45deg,#eee,#eee 6px,#e2e2e2 6px,#e2e2e2 12px);color:#900;font-size:10px;display:flex;align-items:center;justify-content:center;text-align:center;overflow:hidden;word-break:break-word}
.q .ph{width:128px;height:96px}
.lm{font-family:ui-monospace,monospace} .muted{color:#888}
figure.match{max-width:none;text-align:left} .match img{max-width:480px;margin:0;border:1px solid #ccc}
.omitted{margin:10px 0;color:#8a5300;font-weight:bold}
"""

_JS = """
(function(){
  var rows=Array.prototype.slice.call(document.querySelectorAll('tr.q'));
  var buttons=Array.prototype.slice.call(document.querySelectorAll('button[data-filter]'));
  var text=document.getElementById('text-filter');
  var count=document.getElementById('visible-count');
  var current='all';
  function apply(){
    var q=text.value.trim().toLowerCase(), n=0;
    rows.forEach(function(r){
      var tags=r.getAttribute('data-tags').split(' ');
      var ok=(current==='all'||tags.indexOf(current)>=0)&&(!q||r.getAttribute('data-search').indexOf(q)>=0);
      r.hidden=!ok; if(ok){n++;}
    });
    count.textContent=String(n);
    buttons.forEach(function(b){b.classList.toggle('active',b.getAttribute('data-filter')===current);});
    document.body.setAttribute('data-filter',current);
    var h='#filter='+current+(q?'&q='+encodeURIComponent(q):'');
    if(location.hash!==h){try{history.replaceState(null,'',h);}catch(e){}}
  }
  buttons.forEach(function(b){b.addEventListener('click',function(){current=b.getAttribute('data-filter');apply();});});
  text.addEventListener('input',apply);
  var m=/filter=([a-z]+)/.exec(location.hash), t=/[#&]q=([^&]*)/.exec(location.hash);
  if(m&&buttons.some(function(b){return b.getAttribute('data-filter')===m[1];})){current=m[1];}
  if(t){try{text.value=decodeURIComponent(t[1]);}catch(e){}}
  apply();
  document.body.setAttribute('data-ready','1');
})();
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt_score(x: object) -> str:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    return f"{v:.3f}" if math.isfinite(v) else str(v)


def _img_html(thumb: _Thumb | str, alt: str) -> str:
    if isinstance(thumb, str):
        return f'<div class="ph" title="{_e(thumb)}">{_e(thumb)}</div>'
    return f'<span class="th {thumb.css_class}" role="img" aria-label="{_e(alt)}" title="{_e(alt)}"></span>'


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    cols = [("queries", "queries"), ("landmark_queries", "landmark"), ("non_landmark_queries", "non-landmark"),
            ("predictions", "predictions"), ("gap", "GAP"), ("gap_ignoring_non_landmarks", "GAP ignoring non-landmarks"),
            ("top1_accuracy", "top-1"), ("right", "right"), ("wrong", "wrong"),
            ("false_positives", "on non-landmarks"), ("missed", "missed"), ("abstained", "abstained")]
    head = "".join(f"<th>{_e(label)}</th>" for _, label in cols)
    body = []
    for part, m in metrics.items():
        cells = []
        for key, _ in cols:
            v = m[key]
            if isinstance(v, float):
                text = f"{v:.4f}" if math.isfinite(v) else "n/a"
            else:
                text = str(v)
            cells.append(f'<td data-metric="{key}">{text}</td>')
        body.append(f'<tr data-part="{_e(part)}"><td>{_e(part)}</td>{"".join(cells)}</tr>')
    return f'<table class="metrics"><tr><th>part</th>{head}</tr>{"".join(body)}</table>'


def _row_html(rank: int, r: QueryResult, nrow: dict[str, Any] | None, conf: ReportConfig, images: _Images,
              index_paths: _IndexPaths, drawer: _MatchDrawer | None, no_drawing: str) -> tuple[str, bool]:
    """The ``<tr>`` of one query and whether a match drawing was attempted (``no_drawing``: why not)."""
    mark, mark_title = _OUTCOME_MARK[r.outcome]
    qpath = (nrow or {}).get("path") or index_paths.get(r.id)
    qthumb = images.thumb(qpath, conf.thumb_px)
    truth = " ".join(r.truth) if r.truth else "non-landmark"
    if r.prediction is None:
        pred_html = '<span class="muted">no prediction</span>'
    else:
        pred_html = (f'<span class="lm">{_e(r.prediction[0])}</span><br>'
                     f'confidence <b>{_fmt_score(r.prediction[1])}</b>')
    nbs_html = []
    verified: dict[str, Any] | None = None
    neighbours = (nrow or {}).get("neighbours") or []
    for i, nb in enumerate(neighbours[:conf.top_k]):
        nid = str(nb.get("id", "?"))
        nlm = nb.get("landmark")
        npath = nb.get("path") or index_paths.get(nid)
        nthumb = images.thumb(npath, conf.neighbour_thumb_px)
        ok = r.is_landmark and nlm is not None and str(nlm) in r.truth
        cls, tick = ("ok", "\u2713") if ok else ("bad", "\u2717")
        inl = nb.get("inliers")
        inl_html = f"<br>inliers {int(inl)}" if isinstance(inl, (int, float)) and not isinstance(inl, bool) else ""
        if inl_html and verified is None and npath:
            verified = dict(nb, path=npath, rank=i + 1)
        nbs_html.append(
            f'<figure class="nb {cls}" data-neighbour="{i + 1}">{_img_html(nthumb, nid)}'
            f'<figcaption>{tick} <span class="lm">{_e(nlm)}</span><br>'
            f'score {_fmt_score(nb.get("score"))}{inl_html}</figcaption></figure>')
    if nrow is None:
        nbs_cell = '<span class="muted">no neighbours recorded</span>'
    elif not neighbours:
        nbs_cell = '<span class="muted">no neighbours</span>'
    else:
        nbs_cell = f'<div class="nbs">{"".join(nbs_html)}</div>'
    match_cell = '<span class="muted">\u2014</span>'
    attempted = False
    if verified is not None and drawer is not None and qpath:
        attempted = True
        try:
            uri, n_now = drawer.draw(qpath, verified["path"])
            match_cell = (f'<figure class="match"><img src="{uri}" alt="inlier matches">'
                          f'<figcaption>neighbour {verified["rank"]} <span class="lm">{_e(verified.get("id"))}</span>: '
                          f'{int(verified["inliers"])} inliers at recognition, {n_now} recomputed ({_e(drawer.features)})'
                          f'</figcaption></figure>')
        except ImageDecodeError as e:
            match_cell = f'<div class="ph" title="{_e(e.reason)}">matches not drawn: {_e(e.reason)}</div>'
        except Exception as e:  # a failing drawing must not end the report
            logger.debug("report: match drawing failed for %s: %s", r.id, e)
            match_cell = f'<span class="muted">matches not drawn: {_e(type(e).__name__)}: {_e(e)}</span>'
    elif verified is not None:
        match_cell = f'<span class="muted">{int(verified["inliers"])} inliers ({_e(no_drawing)})</span>'
    search = " ".join([r.id, *r.truth, r.prediction[0] if r.prediction else ""]).lower()
    conf_attr = "" if r.confidence is None else f' data-confidence="{_fmt_score(r.confidence)}"'
    usage = f'<br><span class="muted">{_e(r.usage)}</span>' if r.usage else ""
    html_row = (
        f'<tr class="q o-{r.outcome}" id="q-{_e(r.id)}" data-rank="{rank}" data-outcome="{r.outcome}" '
        f'data-tags="{" ".join(r.tags)}" data-search="{_e(search)}"{conf_attr}>'
        f'<td class="mark" title="{_e(mark_title)}">{mark}</td>'
        f'<td><figure>{_img_html(qthumb, r.id)}</figure></td>'
        f'<td class="qid">{_e(r.id)}<br>truth: <span class="lm">{_e(truth)}</span>{usage}</td>'
        f'<td>{pred_html}</td><td>{nbs_cell}</td><td>{match_cell}</td></tr>')
    return html_row, attempted


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


def _json_for_script(obj: Any) -> str:
    return json.dumps(_json_safe(obj), sort_keys=True, allow_nan=False).replace("</", "<\\/")


def write_report(predictions_csv: str | Path, solution_csv: str | Path, out_html: str | Path,
                 neighbours_jsonl: str | Path | None = None, index_dir: str | Path | None = None,
                 conf: ReportConfig | None = None) -> Path:
    """Write the self-contained HTML report of a recognition run; returns ``out_html``.

    Args:
        predictions_csv: Kaggle recognition predictions (``id,landmarks`` with ``<landmark> <score>``).
        solution_csv: the solution (``id,landmarks[,Usage]``; empty landmarks: non-landmark query).
        out_html: where to write the page (atomically).
        neighbours_jsonl: ``landmarks recognize --neighbours`` output; default
            ``<predictions stem>.neighbours.jsonl`` beside the predictions when it exists. Without it
            the rows show no images.
        index_dir: an index folder, used only for image paths the JSONL lacks.
        conf: :class:`ReportConfig`.
    """
    conf = conf or ReportConfig()
    predictions_csv, solution_csv, out_html = Path(predictions_csv), Path(solution_csv), Path(out_html)
    predictions, solution, usage, extra = _load_inputs(predictions_csv, solution_csv)
    notes: list[str] = []
    if extra:
        notes.append(f"{len(extra)} prediction row(s) for ids not in the solution were ignored "
                     f"(e.g. {', '.join(extra[:3])})")
    if neighbours_jsonl is None:
        default = predictions_csv.with_name(predictions_csv.stem + ".neighbours.jsonl")
        neighbours_jsonl = default if default.is_file() else None
    nrows: dict[str, dict[str, Any]] = {}
    base_dirs = [predictions_csv.parent]
    if neighbours_jsonl is not None:
        nrows = read_neighbours_jsonl(neighbours_jsonl)
        base_dirs.insert(0, Path(neighbours_jsonl).parent)
    else:
        notes.append("no neighbours file: rows show predictions only (pass --neighbours from "
                     "`landmarks recognize --neighbours`)")
    if index_dir is not None and not Path(index_dir).is_dir():
        notes.append(f"index {index_dir}: not a folder; ignored")
        logger.warning("report: index %s is not a folder; ignored", index_dir)
        index_dir = None
    index_paths = _IndexPaths(Path(index_dir) if index_dir is not None else None)

    # Metrics.
    metrics: dict[str, dict[str, Any]] = {"all": summarize(predictions, solution)}
    if usage is not None:
        for part in ("Public", "Private"):
            sub = {k: v for k, v in solution.items() if usage.get(k, "").lower() == part.lower()}
            if sub:
                metrics[part] = summarize(predictions, sub)
    results = score_queries(predictions, solution, usage)
    curves = {"all queries": precision_recall_curve(predictions, solution),
              "ignoring non-landmarks": precision_recall_curve(predictions, solution, ignore_non_landmarks=True)}
    pr_png = figure_png(pr_curve_figure(curves))
    hist_png = figure_png(confidence_histogram_figure(results))

    # Rows.
    ranked = rank_worst_first(results)
    shown = ranked[:conf.max_rows]
    omitted = len(ranked) - len(shown)
    images = _Images(conf, base_dirs)
    drawer = (_MatchDrawer(conf, images, Path(index_dir) if index_dir is not None else None)
              if conf.max_match_drawings > 0 and nrows else None)
    no_drawing = "drawing budget used (--max-match-drawings)" if conf.max_match_drawings else "not drawn"
    if drawer is not None and drawer.unavailable:
        notes.append(drawer.unavailable)
        no_drawing = "match drawing unavailable"
        drawer = None
    rows_html = []
    drawings = 0
    missing_rows = 0
    with Progress(len(shown), "report", "query") as bar:
        for rank, r in enumerate(shown, 1):
            nrow = nrows.get(r.id)
            if nrows and nrow is None:
                missing_rows += 1
            active = drawer if drawings < conf.max_match_drawings else None
            row, attempted = _row_html(rank, r, nrow, conf, images, index_paths, active, no_drawing)
            drawings += int(attempted)
            rows_html.append(row)
            bar.update(1)
    if missing_rows:
        notes.append(f"{missing_rows} shown quer{'y' if missing_rows == 1 else 'ies'} not in the neighbours file")
    if images.failures:
        notes.append(f"{images.failures} image(s) could not be shown (placeholders say why)")
    if index_paths.note:
        notes.append(index_paths.note)

    counts = {tag: sum(1 for r in shown if tag == "all" or tag in r.tags) for tag, _ in FILTERS}
    buttons = "".join(f'<button type="button" data-filter="{tag}">{_e(label)} ({counts[tag]})</button>'
                      for tag, label in FILTERS)
    omitted_html = (f'<p class="omitted" id="omitted" data-omitted="{omitted}">{omitted} more quer'
                    f'{"y" if omitted == 1 else "ies"} omitted: showing the {len(shown)} worst of {len(ranked)} '
                    f'(raise --max-rows to see more).</p>' if omitted else "")
    notes_html = ("<ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>") if notes else ""
    data = {"metrics": metrics, "rows_shown": len(shown), "rows_omitted": omitted, "queries": len(ranked),
            "match_drawings": drawings, "inputs": {"predictions": str(predictions_csv), "solution": str(solution_csv),
                                                   "neighbours": None if neighbours_jsonl is None else str(neighbours_jsonl)}}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(conf.title)}</title><style>{_CSS}</style>
<style>
{chr(10).join(images.styles)}
</style></head>
<body data-filter="all">
<h1>{_e(conf.title)}</h1>
<div class="sub">predictions <code>{_e(predictions_csv.name)}</code> against <code>{_e(solution_csv.name)}</code>
{"" if neighbours_jsonl is None else f" with neighbours <code>{_e(Path(neighbours_jsonl).name)}</code>"}</div>
<h2>Metrics</h2>
{_metrics_table(metrics)}
{notes_html}
<h2>Plots</h2>
<div class="plots"><img id="pr-curve" src="{_png_uri(pr_png)}" alt="precision-recall curve">
<img id="confidence-histogram" src="{_png_uri(hist_png)}" alt="confidence histograms"></div>
<h2>Queries, worst first</h2>
<div class="bar">{buttons}<input id="text-filter" type="search" placeholder="filter by id or landmark"
 aria-label="filter by id or landmark"> <span>showing <b id="visible-count">{len(shown)}</b> of {len(shown)} rows</span></div>
{omitted_html}
<table class="rows"><thead><tr><th></th><th>query</th><th>id / truth</th><th>prediction</th>
<th>top-{conf.top_k} neighbours</th><th>inlier matches (top verified neighbour)</th></tr></thead>
<tbody>
{chr(10).join(rows_html)}
</tbody></table>
<script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""
    with atomic_write(out_html) as f:
        f.write(page)
    logger.info("report: %d queries (%d shown, %d omitted), %d match drawings -> %s",
                len(ranked), len(shown), omitted, drawings, out_html)
    return out_html
