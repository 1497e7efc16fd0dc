"""Reading and writing the Kaggle recognition/retrieval CSVs: strict parsing, errors naming the line."""

from __future__ import annotations

import math

import pytest

from landmarks.errors import DataFormatError, LandmarksError
from landmarks.submission import (
    read_recognition_predictions,
    read_recognition_solution,
    read_retrieval_predictions,
    read_retrieval_solution,
    write_recognition_csv,
    write_retrieval_csv,
    write_solution_csv,
)


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_recognition_solution_tolerances(tmp_path):
    path = write(
        tmp_path,
        "sol.csv",
        "\ufeffid,landmarks,Usage\r\n"
        "a,0 12,Public\r\n"
        "\r\n"
        "b,100 200 300 ,Private\r\n"  # one trailing space
        "c,1,Public\r\n"
        "d,,Private\r\n"  # non-landmark
        "x,None,Ignored\r\n"
        "e,,Public\r\n",
    )
    sol = read_recognition_solution(path)
    assert sol.truth == {"a": ["0", "12"], "b": ["100", "200", "300"], "c": ["1"], "d": [], "e": []}
    assert sol.has_usage and sol.ignored == {"x"}
    assert sol.split("Public") == {"a": ["0", "12"], "c": ["1"], "e": []}
    assert sol.split("Private") == {"b": ["100", "200", "300"], "d": []}


def test_solution_without_usage_and_quoted_cells(tmp_path):
    path = write(tmp_path, "sol.csv", 'id,images\n"q1","i1 i2"\nq2,i3\n')
    sol = read_retrieval_solution(path)
    assert sol.truth == {"q1": ["i1", "i2"], "q2": ["i3"]}
    assert not sol.has_usage and sol.split("Public") == {}


def test_predictions_tolerances_and_ignored(tmp_path):
    sol = read_recognition_solution(
        write(tmp_path, "sol.csv", "id,landmarks,Usage\na,1,Public\nb,,Private\nc,2,Public\ni,,Ignored\n")
    )
    path = write(
        tmp_path,
        "pred.csv",
        "id,landmarks\n"
        "a,1 0.5 \n"  # one trailing space tolerated
        "\n"
        "b,\n"  # no prediction
        "c, \n"  # a lone (trailing) space: no prediction
        "i,this is not parsed\n",  # Ignored query: dropped before its cell is read
    )
    preds = read_recognition_predictions(path, sol)
    assert preds == {"a": ("1", 0.5), "b": None, "c": None}
    assert read_recognition_predictions(write(tmp_path, "p2.csv", "id,landmarks\nz,3 -1e-3\n")) == {
        "z": ("3", -0.001)
    }


SOLUTION_ERRORS = [
    # (file text, line named, words in the message)
    ("id,landmarks,Usage\na,1,Public\nb,2,Private\na,3,Public\n", 4, "repeated"),
    ("id,landmarks,Usage\na,1,Public\n\nb,2,public\n", 4, "Usage"),
    ("id,landmarks,Usage\na,1,Public\nb,2\n", 3, "fields"),
    ("id,landmarks,Usage\na,1  2,Public\n", 2, "malformed"),
    ("id,landmarks,Usage\na,1\t2,Public\n", 2, "malformed"),
    ("id,landmarks,Usage\na,1  ,Public\n", 2, "malformed"),  # two trailing spaces
    ("id,landmarks,Usage\n,1,Public\n", 2, "invalid id"),
    ("id,images,Usage\na,1,Public\n", 1, "retrieval"),
    ('id,landmarks,Usage\na,"1,Public\n', 2, "CSV"),
]


@pytest.mark.parametrize("text,line,words", SOLUTION_ERRORS)
def test_solution_errors_name_file_and_line(tmp_path, text, line, words):
    path = write(tmp_path, "solution.csv", text)
    with pytest.raises(DataFormatError) as info:
        read_recognition_solution(path)
    message = str(info.value)
    assert "solution.csv" in message and f"line {line}" in message and words in message


def test_empty_missing_and_binary_files(tmp_path):
    with pytest.raises(DataFormatError, match="empty file"):
        read_recognition_solution(write(tmp_path, "s.csv", "\n\n"))
    with pytest.raises(LandmarksError, match="cannot read"):
        read_recognition_solution(tmp_path / "nope.csv")
    with pytest.raises(DataFormatError, match="UTF-8"):
        read_recognition_solution(write(tmp_path, "b.csv", "id,landmarks\n\xe9,1\n", encoding="latin-1"))


PREDICTION_ERRORS = [
    ("id,landmarks\na,1 0.5\nb,2 0.1\na,1 0.9\n", 4, "repeated"),
    ("id,landmarks\na,1 0.5\nb,2 0.1\nb,\n", 4, "repeated"),
    ("id,landmarks\na,1\n", 2, "<landmark> <score>"),
    ("id,landmarks\na,1 0.5 3\n", 2, "<landmark> <score>"),
    ("id,landmarks\na,1 high\n", 2, "<landmark> <score>"),
    ("id,landmarks\na,1 nan\n", 2, "<landmark> <score>"),
    ("id,landmarks\na,1  0.5\n", 2, "malformed"),
    ("id,landmarks\na, 1 0.5\n", 2, "malformed"),
    ("id,landmarks\na,1 0.5\n\nzz,1 0.5\n", 4, "not in the solution"),
    ("id,landmarks\na,1 0.5,extra\n", 2, "fields"),
    ("id,landmarks,Usage\na,1 0.5,Public\n", 1, "header"),
    ("id,images\na,1 0.5\n", 1, "retrieval"),
]


@pytest.mark.parametrize("text,line,words", PREDICTION_ERRORS)
def test_prediction_errors_name_file_and_line(tmp_path, text, line, words):
    sol = read_recognition_solution(write(tmp_path, "s.csv", "id,landmarks,Usage\na,1,Public\nb,,Private\n"))
    path = write(tmp_path, "predictions.csv", text)
    with pytest.raises(DataFormatError) as info:
        read_recognition_predictions(path, sol)
    message = str(info.value)
    assert "predictions.csv" in message and f"line {line}" in message and words in message


def test_retrieval_predictions(tmp_path):
    sol = read_retrieval_solution(
        write(tmp_path, "s.csv", "id,images,Usage\nq1,i1 i2,Public\nq2,i3,Private\nq3,None,Ignored\n")
    )
    preds = read_retrieval_predictions(
        write(tmp_path, "p.csv", "id,images\nq1,i2 i9 i2 i1 \nq2,\nq3,whatever\n"), sol
    )
    assert preds == {"q1": ["i2", "i9", "i2", "i1"], "q2": []}
    with pytest.raises(DataFormatError, match=r"line 3: .*not in the solution"):
        read_retrieval_predictions(write(tmp_path, "p.csv", "id,images\nq1,i1\nq7,i1\n"), sol)
    with pytest.raises(DataFormatError, match=r"line 2: .*malformed"):
        read_retrieval_predictions(write(tmp_path, "p.csv", "id,images\nq1,i1  i2\n"), sol)


def test_recognition_round_trip(tmp_path):
    predictions = {
        "q1": ("17", 0.1 + 0.2),
        "q2": None,
        "q3": ("5", 1e-300),
        "q4": ("5", -0.0),
        "q5": ("9", 123456789.123456789),
        "q6": ("9", float("inf")),
    }
    path = tmp_path / "out" / "submission.csv"
    write_recognition_csv(path, predictions, ids=["q0", "q6", "q5", "q4", "q3", "q2", "q1"])
    assert path.read_text().splitlines()[:3] == ["id,landmarks", "q0,", "q6,9 inf"]
    back = read_recognition_predictions(path)
    assert list(back) == ["q0", "q6", "q5", "q4", "q3", "q2", "q1"]
    assert back["q0"] is None and back["q2"] is None
    for q, pred in predictions.items():
        if pred is not None:
            assert back[q] is not None and back[q][0] == pred[0]
            assert back[q][1] == pred[1] and math.copysign(1, back[q][1]) == math.copysign(1, pred[1])
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary left


def test_writers_reject_what_cannot_be_read_back(tmp_path):
    with pytest.raises(DataFormatError, match="whitespace"):
        write_recognition_csv(tmp_path / "a.csv", {"q": ("Eiffel Tower", 1.0)})
    with pytest.raises(DataFormatError, match="NaN"):
        write_recognition_csv(tmp_path / "a.csv", {"q": ("1", float("nan"))})
    with pytest.raises(DataFormatError, match="not in `ids`"):
        write_recognition_csv(tmp_path / "a.csv", {"q": ("1", 1.0)}, ids=["r"])
    with pytest.raises(DataFormatError, match="repeated"):
        write_recognition_csv(tmp_path / "a.csv", {}, ids=["r", "r"])
    with pytest.raises(DataFormatError, match="whitespace"):
        write_retrieval_csv(tmp_path / "b.csv", {"q": ["i 1"]})
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()
    assert list(tmp_path.iterdir()) == []


def test_retrieval_and_solution_round_trip(tmp_path):
    ranked = {"q1": ["i3", "i1", "i3"], "q2": []}
    write_retrieval_csv(tmp_path / "r.csv", ranked)
    assert read_retrieval_predictions(tmp_path / "r.csv") == ranked
    truth = {"a": ["1", "2"], "b": [], "c": ["3"]}
    usage = {"a": "Public", "b": "Private", "c": "Ignored"}
    write_solution_csv(tmp_path / "s.csv", "recognition", truth, usage)
    sol = read_recognition_solution(tmp_path / "s.csv")
    assert sol.truth == {"a": ["1", "2"], "b": []} and sol.ignored == {"c"}
    write_solution_csv(tmp_path / "s2.csv", "retrieval", {"q": ["i1"]})
    assert read_retrieval_solution(tmp_path / "s2.csv").usage is None
