"""The HTML report: metrics against hand-computed values, worst-first rows, embedded images, no URLs."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from landmarks.cli import main
from landmarks.errors import DataFormatError, LandmarksError
from landmarks.metrics import global_average_precision
from landmarks.report import (
    PRCurve,
    QueryResult,
    ReportConfig,
    classify_prediction,
    precision_recall_curve,
    rank_worst_first,
    read_neighbours_jsonl,
    save_pr_curve,
    write_report,
)

# The tiny case: (id, truth, usage, prediction). Truth "" = non-landmark query.
QUERIES = [
    ("q_right_hi", "A", "Public", ("A", 0.9)),
    ("q_right_lo", "B", "Private", ("B", 0.3)),
    ("q_wrong", "A", "Public", ("B", 0.8)),
    ("q_fp", "", "Public", ("A", 0.95)),
    ("q_missed", "B", "Private", None),
    ("q_abst", "", "Private", None),
    ("q_ignored", "A", "Ignored", ("B", 0.99)),
]
#: Worst first: confident wrong ones (any kind), missed, right from the least confident, abstained.
EXPECTED_ORDER = ["q_fp", "q_wrong", "q_missed", "q_right_lo", "q_right_hi", "q_abst"]
# By hand. Ranked: fp .95 (x), right_hi .9 (v), wrong .8 (x), right_lo .3 (v); M = 4 landmark queries.
EXPECTED_ALL = {
    "gap": (1 / 2 + 2 / 4) / 4,
    "gap_ignoring_non_landmarks": (1 / 1 + 2 / 3) / 4,
    "top1_accuracy": 2 / 4,
    "queries": 6,
    "landmark_queries": 4,
    "non_landmark_queries": 2,
    "predictions": 4,
    "right": 2,
    "wrong": 1,
    "false_positives": 1,
    "missed": 1,
    "abstained": 1,
}
# Public: fp .95 (x), right_hi .9 (v), wrong .8 (x); M = 2. Private: right_lo .3 (v); M = 2.
EXPECTED_PUBLIC_GAP = (1 / 2) / 2
EXPECTED_PRIVATE_GAP = 1 / 2


def _scene(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A blocky random texture, (h, w, 3) uint8, with plenty of SIFT corners."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))


def _save(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr).save(path, quality=95)
    return path


@dataclass
class Case:
    """Files of the tiny report case."""

    root: Path
    predictions: Path
    solution: Path
    neighbours: Path


def build_case(root: Path) -> Case:
    """Write images, a solution, predictions and a neighbours JSONL for :data:`QUERIES` under ``root``."""
    img = root / "images"
    img.mkdir(parents=True)
    big_a = _scene(1, 160, 200)
    scene_a = _save(big_a[:120, :160], img / "a_idx.jpg")
    scene_a_query = _save(big_a[20:140, 30:190], img / "a_query.jpg")  # the same scene, shifted
    scene_b = _save(_scene(2), img / "b_idx.jpg")
    other = _save(_scene(3), img / "other.jpg")
    corrupt = img / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    sol_lines = ["id,landmarks,Usage"] + [f"{q},{t},{u}" for q, t, u, _ in QUERIES]
    pred_lines = ["id,landmarks"] + [f"{q},{'' if p is None else f'{p[0]} {p[1]}'}" for q, _, _, p in QUERIES]
    solution = root / "solution.csv"
    solution.write_text("\n".join(sol_lines) + "\n")
    predictions = root / "pred.csv"
    predictions.write_text("\n".join(pred_lines) + "\n")
    nb_a = {"id": "idx_a", "landmark": "A", "score": 0.91, "inliers": 57, "path": str(scene_a)}
    nb_b = {"id": "idx_b", "landmark": "B", "score": 0.62, "inliers": None, "path": str(scene_b)}
    nb_bad = {"id": "idx_bad", "landmark": "B", "score": 0.55, "inliers": None, "path": str(corrupt)}
    rows = {
        "q_right_hi": (str(scene_a_query), [nb_a, nb_b]),
        "q_right_lo": (str(other), [nb_b, nb_a]),
        "q_wrong": (str(other), [nb_bad, nb_a]),
        "q_fp": (str(other), [nb_a]),
        "q_missed": (str(img / "missing.jpg"), [nb_b]),
        "q_abst": (str(other), []),
    }
    preds = {q: p for q, _, _, p in QUERIES}
    lines = []
    for q, (path, nbs) in rows.items():
        p = preds[q]
        lines.append(
            json.dumps(
                {
                    "id": q,
                    "path": path,
                    "landmark": None if p is None else p[0],
                    "confidence": 0.0 if p is None else p[1],
                    "neighbours": nbs,
                }
            )
        )
    neighbours = root / "pred.neighbours.jsonl"  # the default name beside pred.csv
    neighbours.write_text("\n".join(lines) + "\n")
    return Case(root, predictions, solution, neighbours)


def _rows(page: str) -> list[str]:
    return re.findall(r'<tr class="q [^"]*" id="q-([^"]+)"', page)


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return build_case(tmp_path_factory.mktemp("report_case"))


@pytest.fixture(scope="module")
def page(case: Case) -> str:
    out = write_report(case.predictions, case.solution, case.root / "report.html", conf=ReportConfig())
    return out.read_text(encoding="utf-8")


def test_metrics_match_hand_computed_values(page: str) -> None:
    metrics = _data(page)["metrics"]
    assert set(metrics) == {"all", "Public", "Private"}
    for key, value in EXPECTED_ALL.items():
        assert metrics["all"][key] == pytest.approx(value), key
    assert metrics["Public"]["gap"] == pytest.approx(EXPECTED_PUBLIC_GAP)
    assert metrics["Private"]["gap"] == pytest.approx(EXPECTED_PRIVATE_GAP)
    assert metrics["Public"]["queries"] == 3 and metrics["Private"]["queries"] == 3
    # The table shows them too.
    assert '<td data-metric="gap">0.2500</td>' in page
    assert (
        f'<td data-metric="gap_ignoring_non_landmarks">{EXPECTED_ALL["gap_ignoring_non_landmarks"]:.4f}</td>'
        in page
    )
    assert '<td data-metric="top1_accuracy">0.5000</td>' in page


def test_rows_worst_first_and_ignored_dropped(page: str) -> None:
    assert _rows(page) == EXPECTED_ORDER
    assert "q_ignored" not in page
    outcomes = re.findall(r'data-outcome="([a-z_]+)"', page)
    assert outcomes == ["false_positive", "wrong", "missed", "right", "right", "abstained"]
    tags = dict(re.findall(r'id="q-([^"]+)"[^>]*data-tags="([^"]*)"', page))
    assert "wrong" in tags["q_fp"].split() and "nonlandmark" in tags["q_fp"].split()
    assert tags["q_missed"].split() == ["landmark", "noprediction"]
    assert "right" in tags["q_right_hi"].split()
    # Filter buttons show counts over the rows.
    assert 'data-filter="wrong">wrong (2)<' in page and 'data-filter="nonlandmark">non-landmark (2)<' in page


def test_images_embedded_once_and_placeholders_give_reasons(page: str) -> None:
    rules = dict(
        re.findall(
            r'\.(t\d+)\{width:\d+px;height:\d+px;background-image:url\("data:image/jpeg;base64,'
            r'([A-Za-z0-9+/=]+)"\)\}',
            page,
        )
    )
    used = re.findall(r'<span class="th (t\d+)" role="img"', page)
    # 4 readable images: 2 query thumbnails (a_query, other) + 2 neighbour thumbnails (a_idx, b_idx),
    # shown 11 times in all, each embedded once.
    assert set(used) == set(rules) and len(used) > len(rules) >= 4
    assert page.count("data:image/jpeg") == len(rules) + page.count('alt="inlier matches"')
    conf = ReportConfig()
    for uri in rules.values():
        with Image.open(io.BytesIO(base64.b64decode(uri))) as im:
            assert im.format == "JPEG"
            assert max(im.size) <= conf.thumb_px
    pngs = re.findall(r'id="(pr-curve|confidence-histogram)" src="data:image/png;base64,', page)
    assert pngs == ["pr-curve", "confidence-histogram"]
    assert 'class="ph"' in page
    assert "file not found" in page  # q_missed's query image does not exist
    assert "corrupt" in page.lower()  # idx_bad cannot be decoded
    assert "image(s) could not be shown" in page


def test_no_external_urls(page: str) -> None:
    text = re.sub(r"data:image/(?:jpeg|png);base64,[A-Za-z0-9+/=]+", "data:", page)
    assert not re.search(r"https?:|ftp:|//[a-z0-9]|@import", text, re.I)
    assert all(u == '"data:' for u in re.findall(r"url\(([^)]{0,6})", text))
    for m in re.finditer(r'\b(?:src|href)="([^"]*)"', page):
        assert m.group(1).startswith("data:"), m.group(0)
    assert "Content-Security-Policy" in page


def test_verified_neighbour_matches_drawn(case: Case, tmp_path: Path) -> None:
    page = write_report(case.predictions, case.solution, tmp_path / "r.html").read_text(encoding="utf-8")
    row = re.search(r'<tr[^>]*id="q-q_right_hi".*?</tr>', page, re.S)
    assert row
    assert "57 inliers at recognition" in row.group(0)
    assert 'alt="inlier matches"' in row.group(0)
    n_now = int(re.search(r"(\d+) recomputed", row.group(0)).group(1))  # type: ignore[union-attr]
    assert n_now >= 8  # the same scene, shifted: SIFT + RANSAC find it again
    # q_fp and q_wrong have idx_a (verified) among their neighbours too: worst first, all within budget.
    assert _data(page)["match_drawings"] == 4
    assert page.count('alt="inlier matches"') == 4


def test_max_rows_and_match_budget(case: Case, tmp_path: Path) -> None:
    out = write_report(
        case.predictions,
        case.solution,
        tmp_path / "r.html",
        conf=ReportConfig(max_rows=3, max_match_drawings=1),
    )
    page = out.read_text(encoding="utf-8")
    assert _rows(page) == EXPECTED_ORDER[:3]
    assert "3 more queries omitted" in page and 'data-omitted="3"' in page
    assert page.count('alt="inlier matches"') == 1
    assert "drawing budget used" in page


def test_match_drawings_verify_with_the_index_extractor(case: Case, tmp_path: Path) -> None:
    """The report recomputes the inliers with the extractor the index recorded, and re-ranking's RANSAC."""
    from landmarks.data.decode import decode_image
    from landmarks.local_features import SiftExtractor
    from landmarks.rerank import PairVerifier

    recorded = SiftExtractor(max_features=60, contrast_threshold=0.01)
    index_dir = tmp_path / "ix"
    index_dir.mkdir()
    (index_dir / "meta.json").write_text(
        json.dumps({"local": {"features": "sift", "dir": "local", "extractor": recorded.to_info()}})
    )
    counts = {}
    for name, ix in (("default", None), ("index", index_dir)):
        page = write_report(
            case.predictions, case.solution, tmp_path / f"{name}.html", index_dir=ix
        ).read_text(encoding="utf-8")
        row = re.search(r'<tr[^>]*id="q-q_right_hi".*?</tr>', page, re.S)
        assert row and "recomputed (rootsift)" in row.group(0)
        counts[name] = int(re.search(r"(\d+) recomputed", row.group(0)).group(1))  # type: ignore[union-attr]
    for name, ext in (("default", SiftExtractor()), ("index", recorded)):  # the oracle: verify() by hand
        fa, fb = (ext(decode_image(case.root / "images" / f)) for f in ("a_query.jpg", "a_idx.jpg"))
        assert counts[name] == PairVerifier(ext).verify(fa, fb).num_inliers, name
    assert counts["index"] != counts["default"]  # so the test tells the two settings apart


def test_without_neighbours_file(case: Case, tmp_path: Path) -> None:
    pred = tmp_path / "p.csv"
    pred.write_text(case.predictions.read_text())  # no p.neighbours.jsonl beside it
    page = write_report(pred, case.solution, tmp_path / "r.html").read_text(encoding="utf-8")
    assert _rows(page) == EXPECTED_ORDER
    assert "no neighbours file" in page
    assert "data:image/jpeg" not in page and 'class="th' not in page


@pytest.fixture
def restore_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI points the ``landmarks`` logger at the (captured) stderr; undo that after the test."""
    log = logging.getLogger("landmarks")
    monkeypatch.setattr(log, "handlers", list(log.handlers))
    monkeypatch.setattr(log, "level", log.level)
    monkeypatch.setattr(log, "propagate", log.propagate)


@pytest.mark.usefixtures("restore_logger")
def test_cli_writes_report(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.html"
    rc = main(
        [
            "report",
            "--predictions",
            str(case.predictions),
            "--solution",
            str(case.solution),
            "--neighbours",
            str(case.neighbours),
            "--out",
            str(out),
            "--max-rows",
            "4",
            "--top-k",
            "1",
            "--max-match-drawings",
            "0",
        ]
    )
    assert rc == 0 and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert len(_rows(page)) == 4
    assert page.count('data-neighbour="2"') == 0 and page.count('data-neighbour="1"') == 4
    assert 'alt="inlier matches"' not in page
    assert str(out) in capsys.readouterr().out
    assert (
        main(
            [
                "report",
                "--predictions",
                str(tmp_path / "nope.csv"),
                "--solution",
                str(case.solution),
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_bad_neighbours_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text('{"id": "a", "neighbours": []}\n{"id": \n')
    with pytest.raises(DataFormatError, match=r"n\.jsonl:2"):
        read_neighbours_jsonl(path)


def test_classify_and_rank() -> None:
    assert classify_prediction(("A", 0.5), ["A", "C"]) == "right"
    assert classify_prediction(("B", 0.5), ["A"]) == "wrong"
    assert classify_prediction(("B", 0.5), []) == "false_positive"
    assert classify_prediction(None, ["A"]) == "missed"
    assert classify_prediction(None, []) == "abstained"
    rs = [
        QueryResult("z", ("A",), ("A", 0.1), "right"),
        QueryResult("y", ("A",), ("B", 0.2), "wrong"),
        QueryResult("x", (), ("A", 0.7), "false_positive"),
        QueryResult("w", ("A",), ("B", 0.7), "wrong"),
    ]
    assert [r.id for r in rank_worst_first(rs)] == ["w", "x", "y", "z"]  # ties by id


def test_pr_curve_area_is_gap_of_metrics_module() -> None:
    rng = np.random.default_rng(0)
    solution = {f"q{i}": ([] if rng.random() < 0.3 else [f"L{rng.integers(5)}"]) for i in range(200)}
    predictions = {
        q: (None if rng.random() < 0.1 else (f"L{rng.integers(5)}", float(rng.random()))) for q in solution
    }
    for ignore in (False, True):
        curve = precision_recall_curve(predictions, solution, ignore_non_landmarks=ignore)
        assert isinstance(curve, PRCurve)
        assert np.all(np.diff(curve.confidence) <= 0) and np.all(np.diff(curve.recall) >= 0)
        assert curve.gap == pytest.approx(global_average_precision(predictions, solution, ignore), abs=1e-12)


def test_save_pr_curve_writes_png(tmp_path: Path) -> None:
    curve = precision_recall_curve({"a": ("A", 0.9), "b": ("A", 0.5)}, {"a": ["A"], "b": ["B"]})
    out = save_pr_curve(curve, tmp_path / "pr.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_index_supplies_paths_the_jsonl_lacks(case: Case, tmp_path: Path) -> None:
    from landmarks.index import LandmarkIndex

    img = case.root / "images"
    xb = np.eye(2, 8, dtype=np.float32)
    LandmarkIndex.build(
        xb,
        ["idx_a", "idx_b"],
        ["A", "B"],
        model={"fingerprint": "test"},
        paths=[img / "a_idx.jpg", img / "b_idx.jpg"],
    ).save(tmp_path / "index")
    rows = read_neighbours_jsonl(case.neighbours)
    for row in rows.values():
        for nb in row["neighbours"]:
            nb["path"] = None
    jsonl = tmp_path / "n.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    conf = ReportConfig(max_match_drawings=0)
    without = write_report(case.predictions, case.solution, tmp_path / "a.html", jsonl, conf=conf)
    with_index = write_report(
        case.predictions, case.solution, tmp_path / "b.html", jsonl, tmp_path / "index", conf
    )
    a, b = without.read_text(encoding="utf-8"), with_index.read_text(encoding="utf-8")
    assert a.count(">no image path<") == 8
    # Every neighbour but idx_bad (not in the index) now has its thumbnail.
    assert b.count(">no image path<") == 1
    assert b.count('<span class="th') == a.count('<span class="th') + 7
    bad = write_report(case.predictions, case.solution, tmp_path / "c.html", jsonl, tmp_path / "nope", conf)
    assert "nope: not a folder; ignored" in bad.read_text(encoding="utf-8")
    (tmp_path / "empty").mkdir()
    bad = write_report(case.predictions, case.solution, tmp_path / "d.html", jsonl, tmp_path / "empty", conf)
    assert "image paths unavailable" in bad.read_text(encoding="utf-8")


def test_config_bounds() -> None:
    with pytest.raises(LandmarksError, match="thumb_px"):
        ReportConfig(thumb_px=4096)
    with pytest.raises(LandmarksError, match="max_rows"):
        ReportConfig(max_rows=-1)


def test_retrieval_figures_per_query_and_overall(case: Case, tmp_path: Path) -> None:
    """mAP@k and each query's first correct position, by hand: q_fp finds b1 at 2, q_wrong has none in its list."""
    ret = tmp_path / "ret.csv"
    ret.write_text("id,images\nq_fp,x1 b1 b2\nq_wrong,x1 x2\nq_right_hi,a1 a2\n")
    sol = tmp_path / "ret_solution.csv"
    sol.write_text("id,images\nq_fp,b1 b2\nq_wrong,a1\nq_right_hi,a1\nq_other,z\n")
    page = write_report(
        case.predictions, case.solution, tmp_path / "r.html", retrieval_csv=ret, retrieval_solution_csv=sol
    ).read_text(encoding="utf-8")
    ap_fp = (1 / 2 + 2 / 3) / 2  # b1 at 2, b2 at 3
    want_map = (ap_fp + 0.0 + 1.0 + 0.0) / 4
    assert f'<td data-metric="map_at_k">{want_map:.4f}</td>' in page
    assert (
        '<td data-metric="found">2</td>' in page and '<td data-metric="median_first">51.5</td>' in page
    )  # median of 2, 101, 1, 101
    cells = dict(re.findall(r'id="q-([^"]+)".*?<td class="ret">([^<]*)</td>', page, re.S))
    assert cells["q_fp"] == f"AP@100 {ap_fp:.3f}, first correct at 2"
    assert cells["q_wrong"] == "AP@100 0, none in the top 100"
    assert cells["q_right_hi"] == "AP@100 1.000, first correct at 1"
    assert cells["q_abst"] == "not a retrieval query"
    assert _data(page)["retrieval"]["map"] == pytest.approx(want_map)
    with pytest.raises(LandmarksError, match="both"):
        write_report(case.predictions, case.solution, tmp_path / "x.html", retrieval_csv=ret)
