"""``landmarks evaluate recognition|retrieval``: JSON shape, table, splits and exit status 2 on bad files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from landmarks.cli import main
from landmarks.metrics import recognition_metrics, retrieval_metrics
from landmarks.submission import write_recognition_csv, write_retrieval_csv, write_solution_csv

RECOGNITION_KEYS = ["gap", "gap_ignore_non_landmarks", "top1_accuracy"]


def retrieval_keys(k):
    return [
        f"map@{k}",
        *[f"mean_precision@{r}" for r in (1, 5, 10, 50, 100)],
        "mean_position",
        "median_position",
    ]


def run_json(capsys, *argv):
    assert main(["evaluate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def challenge_files(tmp_path):
    solution = tmp_path / "solution.csv"
    solution.write_text(
        "id,landmarks,Usage\na,0 12,Public\nb,100 200 300,Public\nc,1,Public\nd,,Private\ne,,Private\ni,7,Ignored\n"
    )
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("id,landmarks\nd,150 15.0\nc,1 10.0\nb,0 0.01\ni,7 99\na,\n")
    return solution, predictions


def test_recognition_json(capsys, challenge_files):
    solution, predictions = challenge_files
    out = run_json(capsys, "recognition", "--solution", str(solution), "--predictions", str(predictions))
    assert list(out) == ["all", "public", "private"]
    assert all(list(v) == RECOGNITION_KEYS for v in out.values())
    assert out["all"] == pytest.approx(
        {"gap": 1 / 6, "gap_ignore_non_landmarks": 1 / 3, "top1_accuracy": 1 / 3}, abs=1e-12
    )
    # Public: c (right) then b (wrong), M = 3. Private: no landmark query -> undefined -> null.
    assert out["public"] == pytest.approx(
        {"gap": 1 / 3, "gap_ignore_non_landmarks": 1 / 3, "top1_accuracy": 1 / 3}
    )
    assert out["private"] == {"gap": None, "gap_ignore_non_landmarks": None, "top1_accuracy": None}


def test_recognition_table(capsys, challenge_files):
    solution, predictions = challenge_files
    assert (
        main(["evaluate", "recognition", "--solution", str(solution), "--predictions", str(predictions)]) == 0
    )
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "GAP" in lines[1] and "top-1" in lines[1]
    assert lines[2].split()[:3] == ["all", "5", "16.67"]
    assert lines[4].split()[:3] == ["private", "2", "n/a"]


def test_no_usage_column_gives_only_all(tmp_path, capsys):
    (tmp_path / "s.csv").write_text("id,landmarks\na,1\nb,\n")
    (tmp_path / "p.csv").write_text("id,landmarks\nb,1 0.9\na,1 0.5\n")
    out = run_json(
        capsys, "recognition", "--solution", str(tmp_path / "s.csv"), "--predictions", str(tmp_path / "p.csv")
    )
    assert out == {"all": {"gap": 0.5, "gap_ignore_non_landmarks": 1.0, "top1_accuracy": 1.0}}


def test_retrieval_json_and_k(tmp_path, capsys):
    (tmp_path / "s.csv").write_text("id,images,Usage\nq1,a b c,Public\nq2,x,Private\nq3,None,Ignored\n")
    (tmp_path / "p.csv").write_text("id,images\nq1,a a d b\nq2,m x\nq3,zz\n")
    args = ["retrieval", "--solution", str(tmp_path / "s.csv"), "--predictions", str(tmp_path / "p.csv")]
    out = run_json(capsys, *args)
    assert list(out) == ["all", "public", "private"]
    assert all(list(v) == retrieval_keys(100) for v in out.values())
    # q1: (1 + 2/4) / 3 = 0.5 ; q2: (1/2) / 1 = 0.5
    assert out["all"]["map@100"] == pytest.approx(0.5)
    assert out["public"]["mean_precision@5"] == pytest.approx(2 / 5)
    assert out["private"]["mean_position"] == 2.0 and out["all"]["median_position"] == 1.5
    out = run_json(capsys, *args, "--k", "1")
    assert list(out["all"]) == retrieval_keys(1)
    assert out["all"]["map@1"] == pytest.approx(0.5)  # q1: 1/min(3,1) ; q2: 0
    assert out["private"]["mean_position"] == 2.0  # k + 1 when none in the first k
    assert main(["evaluate", *args]) == 0
    assert "mAP@100" in capsys.readouterr().out


def random_case(rng):
    n = int(rng.integers(1, 40))
    usage = {f"q{i}": str(rng.choice(["Public", "Private", "Ignored"], p=[0.5, 0.4, 0.1])) for i in range(n)}
    truth = {
        q: [str(x) for x in rng.choice(6, size=int(rng.choice([0, 1, 1, 2])), replace=False)] for q in usage
    }
    preds = {}
    for q in usage:
        if rng.random() < 0.8:
            preds[q] = (
                str(rng.integers(0, 6)),
                float(rng.integers(0, 3)) / 4 if rng.random() < 0.6 else float(rng.random()),
            )
    return truth, usage, preds


def test_recognition_cli_matches_library_per_split(tmp_path, capsys):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        truth, usage, preds = random_case(rng)
        write_solution_csv(tmp_path / "s.csv", "recognition", truth, usage)
        write_recognition_csv(tmp_path / "p.csv", preds, ids=list(truth))
        out = run_json(
            capsys,
            "recognition",
            "--solution",
            str(tmp_path / "s.csv"),
            "--predictions",
            str(tmp_path / "p.csv"),
        )
        for split, wanted in (
            ("all", ("Public", "Private")),
            ("public", ("Public",)),
            ("private", ("Private",)),
        ):
            sub = {q: t for q, t in truth.items() if usage[q] in wanted}
            expected = recognition_metrics({q: p for q, p in preds.items() if q in sub}, sub)
            for key in RECOGNITION_KEYS:
                if math.isnan(expected[key]):
                    assert out[split][key] is None
                else:
                    assert out[split][key] == pytest.approx(expected[key], abs=1e-12), (seed, split, key)


def test_retrieval_cli_matches_library(tmp_path, capsys):
    rng = np.random.default_rng(7)
    truth = {
        f"q{i}": [f"i{x}" for x in rng.choice(30, size=int(rng.integers(1, 8)), replace=False)]
        for i in range(25)
    }
    usage = {q: ("Public" if i % 2 else "Private") for i, q in enumerate(truth)}
    ranked = {q: [f"i{x}" for x in rng.integers(0, 30, size=int(rng.integers(0, 120)))] for q in truth}
    write_solution_csv(tmp_path / "s.csv", "retrieval", truth, usage)
    write_retrieval_csv(tmp_path / "p.csv", ranked)
    out = run_json(
        capsys,
        "retrieval",
        "--solution",
        str(tmp_path / "s.csv"),
        "--predictions",
        str(tmp_path / "p.csv"),
        "--k",
        "10",
    )
    assert out["all"] == pytest.approx(retrieval_metrics(ranked, truth, k=10), abs=1e-12)
    public = {q: t for q, t in truth.items() if usage[q] == "Public"}
    assert out["public"] == pytest.approx(
        retrieval_metrics({q: ranked[q] for q in public}, public, k=10), abs=1e-12
    )


BAD_PREDICTIONS = [
    ("id,landmarks\nd,150 15.0\nc,1 10.0\nd,1 1.0\n", 4),  # repeated id
    ("id,landmarks\nd,150\n", 2),  # not <landmark> <score>
    ("id,landmarks\nd,150 15.0\n\nzz,1 1.0\n", 4),  # id absent from the solution
]


@pytest.mark.parametrize("text,line", BAD_PREDICTIONS)
def test_bad_predictions_exit_2_naming_the_line(tmp_path, capsys, challenge_files, text, line):
    solution, _ = challenge_files
    (tmp_path / "bad.csv").write_text(text)
    status = main(
        [
            "evaluate",
            "recognition",
            "--solution",
            str(solution),
            "--predictions",
            str(tmp_path / "bad.csv"),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert "bad.csv" in captured.err and f"line {line}" in captured.err


def test_bad_solution_and_missing_file_exit_2(tmp_path, capsys, challenge_files):
    _, predictions = challenge_files
    (tmp_path / "s.csv").write_text("id,landmarks,Usage\na,1,Public\nb,2,Secret\n")
    assert (
        main(
            [
                "evaluate",
                "recognition",
                "--solution",
                str(tmp_path / "s.csv"),
                "--predictions",
                str(predictions),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "line 3" in err and "Usage" in err
    assert (
        main(
            [
                "evaluate",
                "retrieval",
                "--solution",
                str(tmp_path / "none.csv"),
                "--predictions",
                str(predictions),
            ]
        )
        == 2
    )
    assert "none.csv" in capsys.readouterr().err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "retrieval", "--solution", "s", "--predictions", "p", "--k", "0"])
    assert info.value.code == 2
    capsys.readouterr()
