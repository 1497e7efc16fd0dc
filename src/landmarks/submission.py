"""Kaggle submission and solution CSVs of the Google Landmark Recognition / Retrieval challenges.

Files (all with a header row; cells hold space-separated ids):

==========================  ==================================  =====================================
file                        header                              cell
==========================  ==================================  =====================================
recognition solution        ``id,landmarks,Usage``              true landmark ids; empty = non-landmark
recognition predictions     ``id,landmarks``                    ``<landmark> <score>``; empty = none
retrieval solution          ``id,images,Usage``                 relevant index image ids
retrieval predictions       ``id,images``                       index image ids, best first
==========================  ==================================  =====================================

Parsing is strict and every error is a :class:`~landmarks.errors.DataFormatError` naming the file and
the line: a repeated id, a row with the wrong number of fields, a malformed cell, an unknown Usage,
a prediction for an id absent from the solution. Tolerated: blank lines (skipped), one trailing space
at the end of a cell (as Kaggle's own reader does), a UTF-8 byte-order mark, a solution without the
``Usage`` column (then there is no public/private split). ``Usage`` is ``Public``, ``Private`` or
``Ignored``; Ignored rows are dropped from the solution and predictions for them are dropped too.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from landmarks.errors import DataFormatError, LandmarksError
from landmarks.utils.io import atomic_write

RECOGNITION = "recognition"
RETRIEVAL = "retrieval"
#: The name of the second column for each task.
CELL_COLUMN = {RECOGNITION: "landmarks", RETRIEVAL: "images"}
USAGES = ("Public", "Private", "Ignored")
_ANY_SPACE = re.compile(r"\s")
_OTHER_SPACE = re.compile(r"[^\S ]")  # whitespace other than the separating space


@dataclass
class Solution:
    """A parsed solution file.

    ``truth`` maps each scored (non-Ignored) query id to its list of true ids (landmark ids for
    recognition, ``[]`` for a non-landmark query; index image ids for retrieval), in file order.
    """

    task: str  # "recognition" or "retrieval"
    truth: dict[str, list[str]]  # query id -> true ids, Ignored rows excluded
    usage: dict[str, str] | None = None  # query id -> "Public"/"Private"; None without a Usage column
    ignored: set[str] = field(default_factory=set)  # query ids whose Usage is Ignored

    @property
    def has_usage(self) -> bool:
        """Whether the file had a ``Usage`` column (and so public/private splits)."""
        return self.usage is not None

    def split(self, usage: str) -> dict[str, list[str]]:
        """The truth restricted to ``"Public"`` or ``"Private"`` queries (empty without Usage)."""
        if usage not in ("Public", "Private"):
            raise ValueError(f"usage must be 'Public' or 'Private', got {usage!r}")
        if self.usage is None:
            return {}
        return {q: t for q, t in self.truth.items() if self.usage[q] == usage}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _error(path: Path, line: int, message: str) -> DataFormatError:
    return DataFormatError(f"{path}, line {line}: {message}")


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` for each non-blank row of a CSV file, header included."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise LandmarksError(f"{path}: cannot read: {e.strerror or e}") from e
    with f:
        reader = csv.reader(f, strict=True)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise _error(path, reader.line_num, f"malformed CSV: {e}") from e
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            yield reader.line_num, row


def _check_header(path: Path, line: int, row: list[str], expected: list[str], optional: str | None) -> int:
    """Check a header row; return the number of fields each row must have."""
    names = [c.strip() for c in row]
    lowered = [c.lower() for c in names]
    if lowered == [c.lower() for c in expected]:
        return len(expected)
    if optional is not None and lowered == [c.lower() for c in [*expected, optional]]:
        return len(expected) + 1
    want = ",".join(expected) + (f"[,{optional}]" if optional else "")
    hint = ""
    other = {v: k for k, v in CELL_COLUMN.items()}
    if len(lowered) >= 2 and lowered[1] in other and lowered[1] != expected[1]:
        hint = f" (this looks like a {other[lowered[1]]} file)"
    raise _error(path, line, f"header must be {want!r}, found {','.join(names)!r}{hint}")


def _split_cell(cell: str) -> list[str] | None:
    """Space-separated tokens of a cell (one trailing space allowed); ``None`` if malformed."""
    if cell.endswith(" "):
        cell = cell[:-1]
    if not cell:
        return []
    tokens = cell.split(" ")
    if "" in tokens or _OTHER_SPACE.search(cell):
        return None
    return tokens


def _check_id(path: Path, line: int, query_id: str) -> None:
    if not query_id or _ANY_SPACE.search(query_id):
        raise _error(path, line, f"invalid id {query_id!r} (ids are non-empty and contain no whitespace)")


def read_solution(path: str | Path, task: str) -> Solution:
    """Read a recognition (``id,landmarks,Usage``) or retrieval (``id,images,Usage``) solution file.

    The ``Usage`` column may be absent. Ignored rows are recorded in ``ignored`` and not parsed further
    (GLDv2 writes ``None`` in their cells).

    Raises:
        DataFormatError: bad header, wrong field count, empty/whitespace id, repeated id, malformed
            cell (empty token, e.g. a double space), unknown Usage. The message names file and line.
        LandmarksError: the file cannot be opened.
    """
    if task not in CELL_COLUMN:
        raise ValueError(f"task must be {RECOGNITION!r} or {RETRIEVAL!r}, got {task!r}")
    path = Path(path)
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise DataFormatError(f"{path}: empty file (expected a header 'id,{CELL_COLUMN[task]},Usage')")
    n_fields = _check_header(path, first[0], first[1], ["id", CELL_COLUMN[task]], "Usage")
    has_usage = n_fields == 3
    truth: dict[str, list[str]] = {}
    usage: dict[str, str] = {}
    ignored: set[str] = set()
    seen: dict[str, int] = {}
    for line, row in rows:
        if len(row) != n_fields:
            raise _error(path, line, f"expected {n_fields} fields, found {len(row)}")
        query_id = row[0]
        _check_id(path, line, query_id)
        if query_id in seen:
            raise _error(path, line, f"id {query_id!r} is repeated (first on line {seen[query_id]})")
        seen[query_id] = line
        if has_usage:
            use = row[2]
            if use not in USAGES:
                raise _error(
                    path,
                    line,
                    f"unknown Usage {use!r} for id {query_id!r} (expected Public, Private or Ignored)",
                )
            if use == "Ignored":
                ignored.add(query_id)
                continue
            usage[query_id] = use
        tokens = _split_cell(row[1])
        if tokens is None:
            raise _error(path, line, f"malformed {CELL_COLUMN[task]} cell {row[1]!r} for id {query_id!r}")
        truth[query_id] = tokens
    return Solution(task=task, truth=truth, usage=usage if has_usage else None, ignored=ignored)


def read_recognition_solution(path: str | Path) -> Solution:
    """Read ``id,landmarks[,Usage]``; see :func:`read_solution`."""
    return read_solution(path, RECOGNITION)


def read_retrieval_solution(path: str | Path) -> Solution:
    """Read ``id,images[,Usage]``; see :func:`read_solution`."""
    return read_solution(path, RETRIEVAL)


def _read_predictions(
    path: str | Path, task: str, solution: Solution | None
) -> Iterator[tuple[int, str, list[str]]]:
    """Yield ``(line, id, tokens)`` of each prediction row after the shared checks."""
    path = Path(path)
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise DataFormatError(f"{path}: empty file (expected a header 'id,{CELL_COLUMN[task]}')")
    n_fields = _check_header(path, first[0], first[1], ["id", CELL_COLUMN[task]], None)
    seen: dict[str, int] = {}
    for line, row in rows:
        if len(row) != n_fields:
            raise _error(path, line, f"expected {n_fields} fields, found {len(row)}")
        query_id = row[0]
        _check_id(path, line, query_id)
        if query_id in seen:
            raise _error(path, line, f"id {query_id!r} is repeated (first on line {seen[query_id]})")
        seen[query_id] = line
        if solution is not None and query_id not in solution.truth:
            if query_id in solution.ignored:
                continue
            raise _error(path, line, f"id {query_id!r} is not in the solution")
        tokens = _split_cell(row[1])
        if tokens is None:
            raise _error(path, line, f"malformed {CELL_COLUMN[task]} cell {row[1]!r} for id {query_id!r}")
        yield line, query_id, tokens


def _parse_score(text: str) -> float | None:
    try:
        score = float(text)
    except ValueError:
        return None
    return None if math.isnan(score) else score


def read_recognition_predictions(
    path: str | Path, solution: Solution | None = None
) -> dict[str, tuple[str, float] | None]:
    """Read a recognition submission ``id,landmarks`` whose cells are ``<landmark> <score>`` or empty.

    Args:
        path: the CSV file.
        solution: if given, every id must be in it; predictions for its Ignored ids are dropped.

    Returns:
        ``{query_id: (landmark_id, score) or None}`` in file order (``None`` = empty cell).

    Raises:
        DataFormatError: bad header, wrong field count, repeated id, a cell that is not
            ``<landmark> <score>`` (score a finite or infinite float, not NaN), an id absent from the
            solution. The message names file and line.
    """
    out: dict[str, tuple[str, float] | None] = {}
    for line, query_id, tokens in _read_predictions(path, RECOGNITION, solution):
        if not tokens:
            out[query_id] = None
            continue
        score = _parse_score(tokens[1]) if len(tokens) == 2 else None
        if score is None:
            raise _error(
                Path(path),
                line,
                f"landmarks cell {' '.join(tokens)!r} for id {query_id!r} is not '<landmark> <score>'",
            )
        out[query_id] = (tokens[0], score)
    return out


def read_retrieval_predictions(path: str | Path, solution: Solution | None = None) -> dict[str, list[str]]:
    """Read a retrieval submission ``id,images`` (index image ids, best first; empty = no prediction).

    Returns ``{query_id: [index_id, ...]}`` in file order. Same checks as
    :func:`read_recognition_predictions`; a repeated index id inside a list is allowed (the metric
    gives it nothing).
    """
    return {query_id: tokens for _, query_id, tokens in _read_predictions(path, RETRIEVAL, solution)}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _check_token(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value or _ANY_SPACE.search(value):
        raise DataFormatError(
            f"{kind} {value!r} cannot be written: ids must be non-empty strings without whitespace"
        )
    return value


def _ordered_ids(ids: Sequence[str] | None, keys: Sequence[str], what: str) -> list[str]:
    if ids is None:
        return list(keys)
    order = list(ids)
    if len(set(order)) != len(order):
        raise DataFormatError(f"ids to write contain a repeated id; {what} rows must be unique")
    missing = set(keys) - set(order)
    if missing:
        raise DataFormatError(f"{len(missing)} {what} ids are not in `ids`, e.g. {sorted(missing)[0]!r}")
    return order


def write_recognition_csv(
    path: str | Path, predictions: Mapping[str, tuple[str, float] | None], ids: Sequence[str] | None = None
) -> None:
    """Write a recognition submission ``id,landmarks`` with cells ``<landmark> <score>``, atomically.

    Args:
        path: output CSV.
        predictions: ``{query_id: (landmark_id, score) or None}``; ``None`` writes an empty cell.
        ids: the rows to write, in order (e.g. every test id); ids absent from ``predictions`` get an
            empty cell. Default: the keys of ``predictions`` in their order.

    Scores are written with ``repr`` so they read back bit-for-bit.

    Raises:
        DataFormatError: an id or landmark is empty or contains whitespace, a score is NaN, ``ids``
            repeats an id or lacks one of ``predictions``.
    """
    rows = _ordered_ids(ids, list(predictions.keys()), "prediction")
    with atomic_write(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "landmarks"])
        for query_id in rows:
            _check_token("query id", query_id)
            pred = predictions.get(query_id)
            if pred is None:
                w.writerow([query_id, ""])
                continue
            landmark, score = pred
            score = float(score)
            if math.isnan(score):
                raise DataFormatError(f"prediction for {query_id!r} has a NaN score")
            w.writerow([query_id, f"{_check_token('landmark id', str(landmark))} {score!r}"])


def write_retrieval_csv(path: str | Path, ranked: Mapping[str, Sequence[str]]) -> None:
    """Write a retrieval submission ``id,images`` (index ids best first, space-separated), atomically."""
    with atomic_write(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "images"])
        for query_id, images in ranked.items():
            _check_token("query id", query_id)
            w.writerow([query_id, " ".join(_check_token("image id", x) for x in images)])


def write_solution_csv(
    path: str | Path, task: str, truth: Mapping[str, Sequence[str]], usage: Mapping[str, str] | None = None
) -> None:
    """Write a solution file ``id,landmarks|images[,Usage]`` atomically (``Usage`` column iff ``usage``).

    ``usage`` maps every id of ``truth`` to ``Public``, ``Private`` or ``Ignored``.
    """
    if task not in CELL_COLUMN:
        raise ValueError(f"task must be {RECOGNITION!r} or {RETRIEVAL!r}, got {task!r}")
    with atomic_write(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", CELL_COLUMN[task], *(["Usage"] if usage is not None else [])])
        for query_id, ids in truth.items():
            _check_token("query id", query_id)
            row = [query_id, " ".join(_check_token("id", x) for x in ids)]
            if usage is not None:
                use = usage.get(query_id)
                if use not in USAGES:
                    raise DataFormatError(f"usage of {query_id!r} must be one of {USAGES}, got {use!r}")
                row.append(use)
            w.writerow(row)
