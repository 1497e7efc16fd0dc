"""The HTML report rendered by headless Chromium: the script runs, rows show, filters work, pixels vary.

Needs Debian's ``chromium`` (``.ci/run`` installs it when missing); skipped with the reason otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from landmarks.report import ReportConfig, write_report
from test_report import EXPECTED_ORDER, Case, build_case

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser found (tried {', '.join(BROWSERS)}); install Debian's chromium")


def _run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish in 120 s: {' '.join(cmd)}")
    assert res.returncode == 0, f"chromium failed ({res.returncode}): {res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Case]:
    browser = _browser()
    root = tmp_path_factory.mktemp("report_browser")
    case = build_case(root / "case")
    out = write_report(case.predictions, case.solution, root / "report.html", conf=ReportConfig())
    return browser, out, case


def _visible_rows(dom: str) -> tuple[list[str], list[str]]:
    """(ids of all query rows, ids of the rows not hidden) in the dumped DOM."""
    rows = re.findall(r"<tr ([^>]*class=\"q [^>]*)>", dom)
    ids = [re.search(r'id="q-([^"]+)"', r).group(1) for r in rows]  # type: ignore[union-attr]
    shown = [i for i, r in zip(ids, rows) if not re.search(r"\shidden(=|\s|$)", r)]
    return ids, shown


def test_dom_after_script_shows_all_rows(rendered: tuple[str, Path, Case], tmp_path: Path) -> None:
    browser, out, _ = rendered
    dom = _run_chromium(
        browser, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", out.as_uri()
    ).stdout
    assert 'data-ready="1"' in dom, "the page's script did not run"
    ids, shown = _visible_rows(dom)
    assert ids == EXPECTED_ORDER and shown == EXPECTED_ORDER
    assert re.search(r'id="visible-count">6<', dom)
    assert 'id="pr-curve"' in dom and dom.count('<span class="th t') >= 10


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("#filter=wrong", ["q_fp", "q_wrong"]),
        ("#filter=nonlandmark", ["q_fp", "q_abst"]),
        ("#filter=noprediction", ["q_missed", "q_abst"]),
        ("#filter=all&q=right_h", ["q_right_hi"]),
    ],
)
def test_filters_in_the_page(
    rendered: tuple[str, Path, Case], tmp_path: Path, fragment: str, expected: list[str]
) -> None:
    browser, out, _ = rendered
    dom = _run_chromium(
        browser, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", out.as_uri() + fragment
    ).stdout
    ids, shown = _visible_rows(dom)
    assert ids == EXPECTED_ORDER
    assert shown == expected
    assert re.search(rf'id="visible-count">{len(expected)}<', dom)


def test_screenshot_is_not_blank(rendered: tuple[str, Path, Case], tmp_path: Path) -> None:
    browser, out, _ = rendered
    png = out.with_name("report_screenshot.png")
    _run_chromium(
        browser,
        tmp_path / "profile",
        "--virtual-time-budget=5000",
        "--window-size=1280,1800",
        f"--screenshot={png}",
        out.as_uri(),
    )
    assert png.is_file()
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] >= 1000 and arr.shape[1] >= 1000
    colours = np.unique(arr.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "the screenshot is (nearly) one colour"
    # Not mostly background: a good share of the pixels differ from the page colour (#fafafa).
    assert (np.abs(arr.astype(int) - 250).sum(axis=2) > 30).mean() > 0.05
