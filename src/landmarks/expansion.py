"""Query expansion (αQE) and database-side augmentation (DBA) for global descriptors: pure functions.

Both replace a vector by a weighted sum of itself and its nearest database vectors, then L2-normalise
(Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018)::

    αQE:  q' = normalise( q  + Σ_{i=1..n} max(q·x_i, 0)^α · x_i )      x_i: the n nearest database rows of q
    DBA:  x' = normalise( x  + Σ_{i=1..n} max(x·x_i, 0)^α · x_i )      x_i: the n nearest *other* rows of x

``α = 0`` gives the plain average (AQE / ADBA); ``n = 0`` returns the input unchanged. Every function
takes its nearest neighbours from a ``search(xq, k) -> (D, I)`` callable (FAISS vocabulary: ``D`` (nq, k)
float32 similarities, descending; ``I`` (nq, k) int64 rows, ``-1`` where none), so DBA of millions of
rows runs in chunks through whatever index holds them (exact ``IndexFlatIP`` for small sets, IVF-PQ or
HNSW for large ones) and never forms an N x N matrix: memory is O(chunk · (k + D)) besides the output.

:func:`exact_search` is the default ``search`` (FAISS ``IndexFlatIP`` over the rows). The tests hold every
function against a loop over an explicit similarity matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landmarks.errors import ConfigError

#: ``search(xq (nq, D) float32, k) -> (D (nq, k) float32 descending, I (nq, k) int64, -1 = none)``.
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]

#: Rows per chunk of the DBA kNN pass (8,192 x 512-d float32 = 16 MiB of queries in flight).
DBA_CHUNK = 8192


@dataclass
class ExpansionConfig:
    """One expansion (αQE or DBA): how many neighbours and how sharply their similarity weighs."""

    # neighbours added to the vector (0: off)
    n: int = 0
    # exponent of the similarity weight max(s, 0)^alpha (0: plain average)
    alpha: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or int(self.n) != self.n or self.n < 0:
            raise ConfigError(f"expansion n must be an integer >= 0, got {self.n!r}")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"expansion alpha must be a finite number >= 0, got {self.alpha!r}")
        self.n = int(self.n)
        self.alpha = float(self.alpha)

    @property
    def active(self) -> bool:
        """True when the expansion changes anything (``n > 0``)."""
        return self.n > 0


def exact_search(xb: np.ndarray) -> SearchFn:
    """A ``search`` callable over the rows of ``xb`` ``(N, D)`` float32 by exact inner product (FAISS)."""
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)

    def search(xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k_eff = min(k, index.ntotal)
        D, L = index.search(np.ascontiguousarray(xq, dtype=np.float32), k_eff)
        if k_eff < k:  # FAISS's own convention for missing results
            pad = k - k_eff
            D = np.concatenate([D, np.full((len(D), pad), -np.inf, np.float32)], axis=1)
            L = np.concatenate([L, np.full((len(L), pad), -1, np.int64)], axis=1)
        return D, L

    return search


def weighted_sum(
    x: np.ndarray, sims: np.ndarray, rows: np.ndarray, xb: np.ndarray, alpha: float
) -> np.ndarray:
    """``normalise(x + Σ_j max(sims_j, 0)^alpha · xb[rows_j])`` for each row of ``x``.

    Args:
        x: ``(m, D)`` float32, the vectors to expand (weight 1 each).
        sims: ``(m, n)`` float32 similarities of the neighbours (``-inf`` where none).
        rows: ``(m, n)`` int64 rows of ``xb`` (``-1`` where none: no contribution).
        xb: ``(N, D)`` float32 or float16 database (may be memory-mapped; only the named rows are read).
        alpha: weight exponent (0: every valid neighbour weighs 1).

    Returns:
        ``(m, D)`` float32, L2-normalised (a zero sum stays zero).
    """
    out = np.array(x, dtype=np.float32, copy=True)
    valid = rows >= 0
    s = np.where(valid, np.maximum(np.nan_to_num(sims, neginf=0.0), 0.0), 0.0).astype(np.float32)
    w = (
        np.where(valid, s ** np.float32(alpha), 0.0).astype(np.float32)
        if alpha > 0
        else valid.astype(np.float32)
    )
    for j in range(rows.shape[1]):  # one neighbour rank at a time: (m, D) in flight, never (m, n, D)
        r = rows[:, j]
        m = valid[:, j]
        if m.any():
            out[m] += w[m, j, None] * np.asarray(xb[r[m]], dtype=np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def query_expansion(
    xq: np.ndarray,
    xb: np.ndarray,
    search: SearchFn,
    conf: ExpansionConfig,
) -> np.ndarray:
    """αQE: add each query's ``n`` nearest database rows (weighted by similarity^α) and re-normalise.

    Args:
        xq: ``(nq, D)`` float32, L2-normalised queries.
        xb: ``(N, D)`` the database rows ``search`` returns (as stored: after DBA when the index has it).
        search: nearest-neighbour search over ``xb`` (see :data:`SearchFn`).
        conf: ``n`` (0: ``xq`` is returned as float32) and ``alpha``.

    Returns:
        ``(nq, D)`` float32, L2-normalised: the expanded queries (search again with them).
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if not conf.active or len(xq) == 0:
        return xq.copy()
    D, L = search(xq, conf.n)
    return weighted_sum(xq, D, L, xb, conf.alpha)


def dba_neighbours(
    D: np.ndarray, L: np.ndarray, self_rows: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row itself from its ``n + 1`` nearest neighbours and keep ``n`` others.

    Args:
        D, L: ``(m, n + 1)`` search results (similarities, rows) of rows ``self_rows`` ``(m,)`` against the database.

    Returns:
        ``(D (m, n), L (m, n))``: the row's own entry removed (the last one when it is not among them:
        an exact duplicate can outrank it; then it is still added once, as the vector itself).
    """
    is_self = L == self_rows[:, None]
    drop = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), L.shape[1] - 1)
    keep = np.ones(L.shape, bool)
    keep[np.arange(len(L)), drop] = False
    return D[keep].reshape(len(L), -1)[:, :n], L[keep].reshape(len(L), -1)[:, :n]


def database_side_augmentation(
    xb: np.ndarray,
    conf: ExpansionConfig,
    search: SearchFn | None = None,
    *,
    chunk: int = DBA_CHUNK,
    out: np.ndarray | None = None,
    start_chunk: int = 0,
    on_chunk: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """DBA: replace every database row by the weighted sum of itself and its ``n`` nearest other rows.

    The kNN pass runs ``chunk`` rows at a time through ``search`` (default :func:`exact_search` over
    ``xb``; give an approximate index's search for millions of rows): peak extra memory is
    ``chunk · (n + 1) · 12`` bytes of search results plus ``chunk · D · 4`` bytes of sums, never N x N.
    The neighbours are those of the *original* rows (one pass, not iterated).

    Args:
        xb: ``(N, D)`` float32 (or float16, or memory-mapped), L2-normalised.
        conf: ``n`` (0: a float32 copy of ``xb``) and ``alpha``.
        search: nearest-neighbour search over the rows of ``xb`` (row numbers = positions in ``xb``).
        chunk: rows per search call.
        out: ``(N, D)`` float32 array (e.g. a memory-mapped ``.npy``) to write into; allocated if None.
        start_chunk: skip the chunks before this one (resuming; their rows of ``out`` are kept).
        on_chunk: called as ``on_chunk(c, out)`` after chunk ``c`` is written (checkpointing).

    Returns:
        ``out``: ``(N, D)`` float32, L2-normalised.
    """
    n_rows = len(xb)
    if out is None:
        out = np.empty((n_rows, xb.shape[1]), dtype=np.float32)
    if not conf.active or n_rows == 0:
        for s in range(0, n_rows, chunk):
            out[s : s + chunk] = np.asarray(xb[s : s + chunk], dtype=np.float32)
        return out
    if search is None:
        search = exact_search(np.asarray(xb, dtype=np.float32))
    for c, s in enumerate(range(0, n_rows, chunk)):
        if c < start_chunk:
            continue
        x = np.ascontiguousarray(xb[s : s + chunk], dtype=np.float32)
        D, L = search(x, conf.n + 1)
        D, L = dba_neighbours(D, L, np.arange(s, s + len(x), dtype=np.int64), conf.n)
        out[s : s + len(x)] = weighted_sum(x, D, L, xb, conf.alpha)
        if on_chunk is not None:
            on_chunk(c, out)
    return out


def _digest_rows(x: np.ndarray, chunk: int = 65_536) -> str:
    """SHA-1 of an ``(N, D)`` array's bytes, read in chunks (identifies the input of a resumable DBA)."""
    import hashlib

    h = hashlib.sha1(f"{x.shape}{x.dtype}".encode())
    for s in range(0, len(x), chunk):
        h.update(np.ascontiguousarray(x[s : s + chunk]).tobytes())
    return h.hexdigest()


def index_knn(index: Any) -> SearchFn:
    """The kNN ``search`` of a :class:`~landmarks.index.LandmarkIndex` for a DBA pass (rows = positions).

    IVF-PQ re-ranks ``k · refine_factor`` candidates exactly (the index's own re-ranking, without the
    100-candidate floor meant for query-time lists: DBA asks for a handful of neighbours per row, and a
    million rows times 100 candidates would dominate the pass); other types search as they are.
    """
    from landmarks.index import _labels_to_rows

    if index.conf.type != "ivfpq" or index.conf.refine_factor <= 1:
        return index.search  # type: ignore[no-any-return]

    def search(xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(len(index), k * index.conf.refine_factor)
        _, found = index.faiss_index.search(np.ascontiguousarray(xq, dtype=np.float32), kk)
        return index._refine(xq, _labels_to_rows(index.labels, found), k)  # type: ignore[no-any-return]

    return search


def apply_dba(
    index: Any,
    conf: ExpansionConfig,
    *,
    work_dir: str | Path | None = None,
    chunk: int = DBA_CHUNK,
    show_progress: bool = False,
) -> None:
    """Give a :class:`~landmarks.index.LandmarkIndex` database-side augmentation (in memory; save it after).

    The neighbours come from the index's own search over the raw rows (exact for ``flat``, approximate
    for ``ivfpq``/``hnsw``: what makes millions of rows affordable; see :func:`index_knn`). Afterwards ``index.embeddings`` and
    FAISS hold the augmented rows, ``index.raw_embeddings`` the raw ones and ``index.meta["dba"]``
    ``{"n", "alpha"}``; an index that already has DBA is recomputed from its raw rows (after add/remove:
    every row, the simplest rule that is always correct). ``conf.n == 0`` removes DBA.

    With ``work_dir`` the augmented rows are written chunk by chunk into ``work_dir/augmented.npy``
    (memory-mapped; ``progress.json`` after each chunk): a killed run on the same rows and settings
    resumes after its last finished chunk. The caller removes ``work_dir`` once the index is saved.
    """
    from landmarks.utils.io import read_json, write_json
    from landmarks.utils.progress import Progress

    raw = index.raw_embeddings if index.raw_embeddings is not None else index.embeddings
    if index.raw_embeddings is not None:  # FAISS holds augmented rows: search the raw ones
        index.replace_vectors(np.asarray(raw, dtype=np.float32))
    if not conf.active:
        index.raw_embeddings = None
        index.meta.pop("dba", None)
        return
    raw = np.asarray(raw)
    out: np.ndarray | None = None
    start = 0
    on_chunk: Callable[[int, np.ndarray], None] | None = None
    n_chunks = (len(raw) + chunk - 1) // chunk
    bar = Progress(n_chunks, "dba", "chunk", disable=not show_progress)
    if work_dir is not None:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        manifest = {
            "n": conf.n,
            "alpha": conf.alpha,
            "rows": len(raw),
            "dim": int(raw.shape[1]),
            "chunk": chunk,
            "raw_sha1": _digest_rows(raw),
            "type": index.conf.type,
        }
        arr_path, prog_path, man_path = work / "augmented.npy", work / "progress.json", work / "manifest.json"
        if man_path.exists() and read_json(man_path) == manifest and arr_path.exists() and prog_path.exists():
            start = int(read_json(prog_path)["done"])
            out = np.load(arr_path, mmap_mode="r+")
        else:
            for p in (prog_path, man_path):
                p.unlink(missing_ok=True)
            out = np.lib.format.open_memmap(arr_path, mode="w+", dtype=np.float32, shape=raw.shape)
            write_json(man_path, manifest)
        memmap: Any = out

        def on_chunk(c: int, _: np.ndarray) -> None:
            memmap.flush()  # the rows first, then the note that they are there
            write_json(prog_path, {"done": c + 1})
            bar.update(1)

    else:

        def on_chunk(c: int, _: np.ndarray) -> None:
            bar.update(1)

    bar.update(start)
    try:
        aug = database_side_augmentation(
            raw, conf, index_knn(index), chunk=chunk, out=out, start_chunk=start, on_chunk=on_chunk
        )
    finally:
        bar.close()
    index.raw_embeddings = raw
    index.replace_vectors(np.asarray(aug, dtype=np.float32))
    index.meta["dba"] = {"n": conf.n, "alpha": conf.alpha}
