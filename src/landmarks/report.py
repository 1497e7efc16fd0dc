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
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from markupsafe import Markup

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
FILTERS = (
    ("all", "all"),
    ("wrong", "wrong"),
    ("right", "right"),
    ("nonlandmark", "non-landmark"),
    ("noprediction", "no prediction"),
)


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
    retrieval_k: int = 100  # rank cut-off of the retrieval figures (mAP@k; GLDv2: 100)
    max_image_pixels: int = 100_000_000  # decoder pixel limit (decompression-bomb guard)
    title: str = "landmarks report"  # page title

    def __post_init__(self) -> None:
        for name in ("max_rows", "top_k", "max_match_drawings"):
            if getattr(self, name) < 0:
                raise LandmarksError(f"report: {name} must be >= 0, got {getattr(self, name)}")
        for name, hi in (
            ("thumb_px", 512),
            ("neighbour_thumb_px", 512),
            ("match_max_side_px", 4096),
            ("match_drawing_px", 2048),
        ):
            if not 8 <= getattr(self, name) <= hi:
                raise LandmarksError(f"report: {name} must be in 8..{hi} pixels, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 95:
            raise LandmarksError(f"report: jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.retrieval_k < 1:
            raise LandmarksError(f"report: retrieval_k must be >= 1, got {self.retrieval_k}")


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


def score_queries(
    predictions: Mapping[str, Prediction | None],
    solution: Mapping[str, Sequence[str]],
    usage: Mapping[str, str] | None = None,
) -> list[QueryResult]:
    """One :class:`QueryResult` per solution id (predictions for other ids are ignored), in solution order."""
    out = []
    for qid, truth in solution.items():
        pred = predictions.get(qid)
        out.append(
            QueryResult(
                qid,
                tuple(truth),
                pred,
                classify_prediction(pred, truth),
                None if usage is None else usage.get(qid),
            )
        )
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


def precision_recall_curve(
    predictions: Mapping[str, Prediction | None],
    solution: Mapping[str, Sequence[str]],
    ignore_non_landmarks: bool = False,
) -> PRCurve:
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


def summarize(
    predictions: Mapping[str, Prediction | None], solution: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
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
        "gap_ignoring_non_landmarks": float(
            global_average_precision(preds, solution, ignore_non_landmarks=True)
        ),
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


def _load_inputs(
    predictions_csv: Path, solution_csv: Path
) -> tuple[dict[str, Prediction | None], dict[str, tuple[str, ...]], dict[str, str] | None, list[str]]:
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


def thumbnail(
    source: str | Path, max_side_px: int, quality: int = 80, max_pixels: int | None = 100_000_000
) -> tuple[str, int, int]:
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
                uri, w, h = thumbnail(
                    self.resolve(path), size, self.conf.jpeg_quality, self.conf.max_image_pixels
                )
                result = _Thumb(f"t{len(self.styles)}", w, h)
                self.styles.append(
                    f'.{result.css_class}{{width:{w}px;height:{h}px;background-image:url("{uri}")}}'
                )
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
        return array_to_data_uri(drawing, self.conf.match_drawing_px, self.conf.jpeg_quality), int(
            v.num_inliers
        )


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
            ax.step(
                np.r_[0.0, c.recall],
                np.r_[c.precision[0], c.precision],
                where="post",
                label=f"{name} (GAP {c.gap:.3f})",
            )
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
    colours = {
        "landmark queries, right": "#2e7d32",
        "landmark queries, wrong": "#c62828",
        "non-landmark queries": "#6a1b9a",
    }
    vals = [float(v) for g in groups.values() for v in g if v is not None and math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = _new_figure(5.2, 3.8)
    ax = fig.add_subplot()
    for name, g in groups.items():
        data = [float(v) for v in g if v is not None and math.isfinite(v)]
        ax.hist(
            data,
            bins=edges.tolist(),
            histtype="step",
            linewidth=1.8,
            color=colours[name],
            label=f"{name} ({len(data)})",
        )
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

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def _fmt_score(x: object) -> str:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    return f"{v:.3f}" if math.isfinite(v) else str(v)


#: The metrics table's columns: (summary key, header).
_METRIC_COLUMNS = [
    ("queries", "queries"),
    ("landmark_queries", "landmark"),
    ("non_landmark_queries", "non-landmark"),
    ("predictions", "predictions"),
    ("gap", "GAP"),
    ("gap_ignoring_non_landmarks", "GAP ignoring non-landmarks"),
    ("top1_accuracy", "top-1"),
    ("right", "right"),
    ("wrong", "wrong"),
    ("false_positives", "on non-landmarks"),
    ("missed", "missed"),
    ("abstained", "abstained"),
]


def _metric_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(part, [(key, text), ...])]``: the cells of the metrics table, formatted."""
    rows = []
    for part, m in metrics.items():
        cells = []
        for key, _ in _METRIC_COLUMNS:
            v = m[key]
            cells.append(
                (key, (f"{v:.4f}" if math.isfinite(v) else "n/a") if isinstance(v, float) else str(v))
            )
        rows.append((part, cells))
    return rows


@dataclass
class _NeighbourView:
    """One neighbour thumbnail of a row (the template's ``nb``)."""

    rank: int  # 1-based position among the query's neighbours
    ok: bool  # its landmark is one of the query's true landmarks
    thumb: _Thumb | str  # the thumbnail, or why it cannot be shown
    id: str  # index image id
    landmark: str  # its landmark ("None" when unlabelled)
    score: str  # formatted score
    inliers: int | None  # verified inliers at recognition (None: not verified)


@dataclass
class _MatchView:
    """The match cell of a row (the template's ``m``)."""

    kind: str = "none"  # "drawn", "unreadable", "failed", "not_drawn" or "none"
    uri: str = ""  # data URI of the drawing
    rank: int = 0  # the verified neighbour's position
    id: str = ""  # the verified neighbour's id
    inliers: int = 0  # inliers at recognition
    n_now: int = 0  # inliers recomputed for the drawing
    features: str = ""  # the local features drawn (extractor name)
    reason: str = ""  # why nothing was drawn


@dataclass
class _RowView:
    """One query row (the template's ``r``)."""

    rank: int  # 1-based position, worst first
    outcome: str  # one of OUTCOMES
    id: str  # query id
    tags: str  # filter tags, space separated
    search: str  # lower-case text the filter box matches
    confidence: str | None  # formatted confidence (None: no prediction)
    mark: str  # the outcome's mark
    mark_title: str  # the outcome's description
    thumb: _Thumb | str  # query thumbnail, or why it cannot be shown
    truth: str  # true landmarks, or "non-landmark"
    usage: str  # Public / Private ("" without Usage)
    prediction: tuple[str, str] | None  # (landmark, formatted confidence)
    neighbours: list[_NeighbourView] | None  # None: the query has no neighbours row
    match: _MatchView  # the match cell
    retrieval: str | None = None  # the retrieval cell (None: no retrieval figures)


def _row_view(
    rank: int,
    r: QueryResult,
    nrow: dict[str, Any] | None,
    conf: ReportConfig,
    images: _Images,
    index_paths: _IndexPaths,
    drawer: _MatchDrawer | None,
    no_drawing: str,
) -> tuple[_RowView, bool]:
    """The view of one query row and whether a match drawing was attempted (``no_drawing``: why not)."""
    mark, mark_title = _OUTCOME_MARK[r.outcome]
    qpath = (nrow or {}).get("path") or index_paths.get(r.id)
    qthumb = images.thumb(qpath, conf.thumb_px)
    neighbours: list[_NeighbourView] = []
    verified: dict[str, Any] | None = None
    for i, nb in enumerate(((nrow or {}).get("neighbours") or [])[: conf.top_k]):
        nid = str(nb.get("id", "?"))
        nlm = nb.get("landmark")
        npath = nb.get("path") or index_paths.get(nid)
        inl = nb.get("inliers")
        n_inl = int(inl) if isinstance(inl, (int, float)) and not isinstance(inl, bool) else None
        if n_inl is not None and verified is None and npath:
            verified = dict(nb, path=npath, rank=i + 1)
        neighbours.append(
            _NeighbourView(
                rank=i + 1,
                ok=r.is_landmark and nlm is not None and str(nlm) in r.truth,
                thumb=images.thumb(npath, conf.neighbour_thumb_px),
                id=nid,
                landmark=str(nlm),
                score=_fmt_score(nb.get("score")),
                inliers=n_inl,
            )
        )
    match = _MatchView()
    attempted = False
    if verified is not None and drawer is not None and qpath:
        attempted = True
        try:
            uri, n_now = drawer.draw(qpath, verified["path"])
            match = _MatchView(
                "drawn",
                uri=uri,
                rank=verified["rank"],
                id=str(verified.get("id")),
                inliers=int(verified["inliers"]),
                n_now=n_now,
                features=drawer.features,
            )
        except ImageDecodeError as e:
            match = _MatchView("unreadable", reason=e.reason)
        except Exception as e:  # a failing drawing must not end the report
            logger.debug("report: match drawing failed for %s: %s", r.id, e)
            match = _MatchView("failed", reason=f"{type(e).__name__}: {e}")
    elif verified is not None:
        match = _MatchView("not_drawn", inliers=int(verified["inliers"]), reason=no_drawing)
    view = _RowView(
        rank=rank,
        outcome=r.outcome,
        id=r.id,
        tags=" ".join(r.tags),
        search=" ".join([r.id, *r.truth, r.prediction[0] if r.prediction else ""]).lower(),
        confidence=None if r.confidence is None else _fmt_score(r.confidence),
        mark=mark,
        mark_title=mark_title,
        thumb=qthumb,
        truth=" ".join(r.truth) if r.truth else "non-landmark",
        usage=r.usage or "",
        prediction=None if r.prediction is None else (r.prediction[0], _fmt_score(r.prediction[1])),
        neighbours=None if nrow is None else neighbours,
        match=match,
    )
    return view, attempted


@dataclass
class _RetrievalView:
    """The retrieval summary of the page (the template's ``retrieval``)."""

    k: int  # rank cut-off of mAP@k
    queries: int  # queries of the retrieval solution
    map_at_k: float  # mAP@k over them (landmarks.metrics.mean_average_precision)
    found: int  # queries with a correct image within the first k
    median_first: str  # median 1-based position of the first correct image (k + 1 when none), formatted

    @property
    def map_text(self) -> str:
        """mAP@k, 4 decimals."""
        return f"{self.map_at_k:.4f}" if math.isfinite(self.map_at_k) else "n/a"

    def to_json(self) -> dict[str, Any]:
        """The figures for the page's JSON data."""
        return {"k": self.k, "queries": self.queries, "map": self.map_at_k, "found": self.found}


def _retrieval_figures(
    retrieval_csv: str | Path | None, solution_csv: str | Path | None, k: int
) -> tuple[_RetrievalView | None, dict[str, tuple[float, int | None]] | None]:
    """The retrieval summary and ``{query: (AP@k, first correct position)}``, or ``(None, None)``.

    Raises :class:`LandmarksError` when only one of the two files is given.
    """
    if retrieval_csv is None and solution_csv is None:
        return None, None
    if retrieval_csv is None or solution_csv is None:
        raise LandmarksError(
            "retrieval figures need both the retrieval predictions and the retrieval solution"
        )
    from landmarks.metrics import retrieval_per_query
    from landmarks.submission import read_retrieval_predictions, read_retrieval_solution

    solution = read_retrieval_solution(solution_csv)
    per_query = retrieval_per_query(read_retrieval_predictions(retrieval_csv, solution), solution.truth, k)
    firsts = [k + 1 if f is None else f for _, f in per_query.values()]
    view = _RetrievalView(
        k=k,
        queries=len(per_query),
        map_at_k=float(np.mean([ap for ap, _ in per_query.values()])) if per_query else math.nan,
        found=sum(f is not None for _, f in per_query.values()),
        median_first=f"{np.median(firsts):g}" if firsts else "n/a",
    )
    return view, per_query


def _retrieval_cell(figures: tuple[float, int | None] | None, k: int) -> str:
    """A row's retrieval cell: its AP@k and first correct position."""
    if figures is None:
        return "not a retrieval query"
    ap, first = figures
    return (
        f"AP@{k} {ap:.3f}, first correct at {first}"
        if first is not None
        else f"AP@{k} 0, none in the top {k}"
    )


def _template_text(name: str) -> str:
    """A file of ``landmarks/templates`` (package data)."""
    from importlib.resources import files

    return files("landmarks").joinpath("templates", name).read_text(encoding="utf-8")


def _render_page(**context: Any) -> str:
    """``templates/report.html.j2`` with ``report.css`` and ``report.js`` inlined: one self-contained page."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(_template_text("report.html.j2"))
    return template.render(
        css=Markup(_template_text("report.css")),
        js=Markup(_template_text("report.js")),
        csp=Markup(_CSP),
        **context,
    )


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


def _neighbour_rows(
    predictions_csv: Path,
    neighbours_jsonl: str | Path | None,
    notes: list[str],
) -> tuple[Path | None, dict[str, dict[str, Any]], list[Path]]:
    """``(neighbours file, its rows by query id, folders relative image paths resolve against)``.

    The file defaults to ``<predictions stem>.neighbours.jsonl`` beside the predictions; without one a
    note is added to ``notes``.
    """
    if neighbours_jsonl is None:
        default = predictions_csv.with_name(predictions_csv.stem + ".neighbours.jsonl")
        neighbours_jsonl = default if default.is_file() else None
    base_dirs = [predictions_csv.parent]
    if neighbours_jsonl is None:
        notes.append(
            "no neighbours file: rows show predictions only (pass --neighbours from "
            "`landmarks recognize --neighbours`)"
        )
        return None, {}, base_dirs
    return (
        Path(neighbours_jsonl),
        read_neighbours_jsonl(neighbours_jsonl),
        [Path(neighbours_jsonl).parent, *base_dirs],
    )


def _metrics_by_part(
    predictions: Mapping[str, Prediction | None],
    solution: Mapping[str, Sequence[str]],
    usage: Mapping[str, str] | None,
) -> dict[str, dict[str, Any]]:
    """:func:`summarize` of all queries, and of the Public and Private ones when the solution has Usage."""
    metrics: dict[str, dict[str, Any]] = {"all": summarize(predictions, solution)}
    if usage is not None:
        for part in ("Public", "Private"):
            sub = {k: v for k, v in solution.items() if usage.get(k, "").lower() == part.lower()}
            if sub:
                metrics[part] = summarize(predictions, sub)
    return metrics


def _row_views(
    shown: Sequence[QueryResult],
    nrows: Mapping[str, dict[str, Any]],
    conf: ReportConfig,
    images: _Images,
    index_paths: _IndexPaths,
    drawer: _MatchDrawer | None,
    no_drawing: str,
    per_query: Mapping[str, tuple[float, int | None]] | None,
) -> tuple[list[_RowView], int, int]:
    """``(rows, match drawings attempted, shown queries missing from the neighbours file)``."""
    rows: list[_RowView] = []
    drawings = missing_rows = 0
    with Progress(len(shown), "report", "query") as bar:
        for rank, r in enumerate(shown, 1):
            nrow = nrows.get(r.id)
            if nrows and nrow is None:
                missing_rows += 1
            active = drawer if drawings < conf.max_match_drawings else None
            row, attempted = _row_view(rank, r, nrow, conf, images, index_paths, active, no_drawing)
            if per_query is not None:
                row.retrieval = _retrieval_cell(per_query.get(r.id), conf.retrieval_k)
            drawings += int(attempted)
            rows.append(row)
            bar.update(1)
    return rows, drawings, missing_rows


def write_report(
    predictions_csv: str | Path,
    solution_csv: str | Path,
    out_html: str | Path,
    neighbours_jsonl: str | Path | None = None,
    index_dir: str | Path | None = None,
    conf: ReportConfig | None = None,
    retrieval_csv: str | Path | None = None,
    retrieval_solution_csv: str | Path | None = None,
) -> Path:
    """Write the self-contained HTML report of a recognition run; returns ``out_html``.

    Args:
        predictions_csv: Kaggle recognition predictions (``id,landmarks`` with ``<landmark> <score>``).
        solution_csv: the solution (``id,landmarks[,Usage]``; empty landmarks: non-landmark query).
        out_html: where to write the page (atomically).
        neighbours_jsonl: ``landmarks recognize --neighbours`` output; default
            ``<predictions stem>.neighbours.jsonl`` beside the predictions when it exists. Without it
            the rows show no images.
        index_dir: an index folder: image paths the JSONL lacks, and the local-feature settings the
            match drawings verify with (those it recorded).
        conf: :class:`ReportConfig`.
        retrieval_csv, retrieval_solution_csv: retrieval predictions (``id,images``, ``landmarks
            recognize --retrieval``) and their solution (``id,images[,Usage]``): given both, the page
            shows mAP@``retrieval_k`` and each query's AP and first correct position.
    """
    conf = conf or ReportConfig()
    predictions_csv, solution_csv, out_html = Path(predictions_csv), Path(solution_csv), Path(out_html)
    predictions, solution, usage, extra = _load_inputs(predictions_csv, solution_csv)
    notes: list[str] = []
    if extra:
        notes.append(
            f"{len(extra)} prediction row(s) for ids not in the solution were ignored "
            f"(e.g. {', '.join(extra[:3])})"
        )
    neighbours_jsonl, nrows, base_dirs = _neighbour_rows(predictions_csv, neighbours_jsonl, notes)
    if index_dir is not None and not Path(index_dir).is_dir():
        notes.append(f"index {index_dir}: not a folder; ignored")
        logger.warning("report: index %s is not a folder; ignored", index_dir)
        index_dir = None
    index_paths = _IndexPaths(Path(index_dir) if index_dir is not None else None)

    # Metrics.
    metrics = _metrics_by_part(predictions, solution, usage)
    results = score_queries(predictions, solution, usage)
    retrieval, per_query = _retrieval_figures(retrieval_csv, retrieval_solution_csv, conf.retrieval_k)
    curves = {
        "all queries": precision_recall_curve(predictions, solution),
        "ignoring non-landmarks": precision_recall_curve(predictions, solution, ignore_non_landmarks=True),
    }
    pr_png = figure_png(pr_curve_figure(curves))
    hist_png = figure_png(confidence_histogram_figure(results))

    # Rows.
    ranked = rank_worst_first(results)
    shown = ranked[: conf.max_rows]
    omitted = len(ranked) - len(shown)
    images = _Images(conf, base_dirs)
    drawer = (
        _MatchDrawer(conf, images, Path(index_dir) if index_dir is not None else None)
        if conf.max_match_drawings > 0 and nrows
        else None
    )
    no_drawing = "drawing budget used (--max-match-drawings)" if conf.max_match_drawings else "not drawn"
    if drawer is not None and drawer.unavailable:
        notes.append(drawer.unavailable)
        no_drawing = "match drawing unavailable"
        drawer = None
    rows, drawings, missing_rows = _row_views(
        shown, nrows, conf, images, index_paths, drawer, no_drawing, per_query
    )
    if missing_rows:
        notes.append(
            f"{missing_rows} shown quer{'y' if missing_rows == 1 else 'ies'} not in the neighbours file"
        )
    if images.failures:
        notes.append(f"{images.failures} image(s) could not be shown (placeholders say why)")
    if index_paths.note:
        notes.append(index_paths.note)

    counts = {tag: sum(1 for r in shown if tag == "all" or tag in r.tags) for tag, _ in FILTERS}
    data = {
        "metrics": metrics,
        "rows_shown": len(shown),
        "rows_omitted": omitted,
        "queries": len(ranked),
        "match_drawings": drawings,
        "retrieval": None if retrieval is None else retrieval.to_json(),
        "inputs": {
            "predictions": str(predictions_csv),
            "solution": str(solution_csv),
            "neighbours": None if neighbours_jsonl is None else str(neighbours_jsonl),
        },
    }
    page = _render_page(
        title=conf.title,
        thumb_styles=Markup("\n".join(images.styles)),
        predictions_name=predictions_csv.name,
        solution_name=solution_csv.name,
        neighbours_name=None if neighbours_jsonl is None else Path(neighbours_jsonl).name,
        metric_columns=_METRIC_COLUMNS,
        metric_rows=_metric_rows(metrics),
        notes=notes,
        pr_uri=_png_uri(pr_png),
        hist_uri=_png_uri(hist_png),
        retrieval=retrieval,
        filters=[(tag, label, counts[tag]) for tag, label in FILTERS],
        omitted=omitted,
        total=len(ranked),
        top_k=conf.top_k,
        rows=rows,
        data_json=Markup(_json_for_script(data)),
    )
    with atomic_write(out_html) as f:
        f.write(page)
    logger.info(
        "report: %d queries (%d shown, %d omitted), %d match drawings -> %s",
        len(ranked),
        len(shown),
        omitted,
        drawings,
        out_html,
    )
    return out_html
