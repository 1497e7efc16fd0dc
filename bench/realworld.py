"""Real photos: what a user with a small collection and no GPU gets, end to end through the ``landmarks`` CLI.

Data: ``../shared/data/realworld`` (``landmarks.csv``: ``path,landmark,collection``, 29 classes;
``distractors.csv``: ``path,collection``, out-of-domain photos). Nothing is copied into the repository:
the work folder (``--work``, default ``/tmp/landmarks-realworld``) holds symlinks to the photos.

Stages (each one is skipped when its output is already in ``--work``, so a rerun after a crash is cheap;
``--overwrite`` starts afresh):

1. ``split``: each class is split (seeded) into index images (``index/<landmark>/``) and queries
   (about ``--query-fraction`` of a class, at least one query, at least two index images where the class
   has three or more); the distractors are split (seeded, per collection) into a non-landmark set N
   (``nonlandmarks/``, given to ``landmarks index --non-landmarks``) and non-landmark queries. The
   queries (``queries/q0000.jpg`` ...) get neutral ids. Writes ``recognition_solution.csv``
   (``id,landmarks,Usage``, empty cell = non-landmark) and ``retrieval_solution.csv`` (landmark query ->
   the index images of its landmark; non-landmark queries Ignored).
2. the model, one per row of the table: ``--preset P`` trains ``landmarks train --preset P --time-budget
   MINUTES --local`` on the index images only (the run holds out its own validation split from them; the
   DELG-style local head in the same run; ``--local-mode stage``: a second ``--init RUN --local-only``
   stage instead; ``none``: no local head); ``--init lite0`` writes a run with no training (``landmarks
   init``: ImageNet backbone + GeM); ``--skip-train RUN`` reuses a run trained elsewhere (``--model-note``
   says how, for the page).
3. ``index``: ``landmarks index`` of the index images with N (``--whiten``: PCA-whitening learned on them),
   ``--local sift`` / ``--local model`` when a re-ranking variant needs that index, else global only.
4. ``recognize``: every query with global kNN only (``--no-ood``), + out-of-domain handling, + SIFT
   re-ranking, + learned local re-ranking; ``--retrieval`` CSVs too.
5. ``evaluate``: ``landmarks evaluate recognition|retrieval --json``, plus the calibrated ``is_landmark``
   of the ``--neighbours`` rows; the row goes to ``bench/results/realworld.json`` (every row measured so
   far, by label) and the page with all rows to ``bench/results/realworld.md`` and to stdout.

    python bench/realworld.py                                   # the cpu preset's row (~15 min on 2 idle cores)
    python bench/realworld.py --preset cpu-scratch             # today's scratch recipe
    python bench/realworld.py --init lite0 --init-size 224 [--whiten]   # no training
    python bench/realworld.py --skip-train RUN --model-note "..." --label "Lite2 fine-tuned"
    python bench/realworld.py --variants global,global+ood     # no re-ranking (global-only index)

A hand-written section after the line ``<!-- notes -->`` in the results file is kept when it is
rewritten.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MARKER = ".landmarks-realworld-bench"  # file that marks a work folder as ours (so --overwrite may delete it)
NOTES = "<!-- notes -->"


@dataclass(frozen=True)
class Variant:
    """One way of recognizing the queries."""

    name: str  # label in the tables and the predictions file name
    index: str  # "sift" or "model": which index (which local features) it uses
    ood: bool  # out-of-domain handling with the index's non-landmark set
    rerank: bool  # local-feature re-ranking (+ RANSAC) of the top candidates


VARIANTS = (
    Variant("global", "sift", ood=False, rerank=False),
    Variant("global+ood", "sift", ood=True, rerank=False),
    Variant("global+ood+sift", "sift", ood=True, rerank=True),
    Variant("global+ood+delg", "model", ood=True, rerank=True),
)


def log(msg: str) -> None:
    """Progress message on stderr (stdout carries the table)."""
    print(f"[realworld {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*argv: str, capture: bool = False) -> str:
    """Run ``python -m landmarks ARGV`` as a user would; stderr passes through. Returns stdout if ``capture``."""
    cmd = [sys.executable, "-m", "landmarks", *argv]
    log("$ landmarks " + " ".join(argv))
    res = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"`landmarks {' '.join(argv)}` failed with status {res.returncode}")
    return res.stdout if capture else ""


def has_flag(verb: str, flag: str) -> bool:
    """Whether ``landmarks VERB --help`` lists FLAG (some flags are newer than others)."""
    res = subprocess.run(
        [sys.executable, "-m", "landmarks", verb, "--help"], capture_output=True, text=True, cwd=REPO
    )
    return res.returncode == 0 and f"{flag} " in res.stdout.replace("\n", " ") + " "


# --- stage 1: the split ------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV with a header, as dictionaries."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def n_queries_for(n: int, fraction: float) -> int:
    """Queries taken from a class of ``n`` images.

    About ``fraction`` of them, at least 1 (when ``n >= 2``), and at least 2 left in the index when
    ``n >= 3`` (one when ``n == 2``; none taken from a single image).
    """
    if n < 2:
        return 0
    q = max(1, round(n * fraction))
    return min(q, n - 2) if n >= 3 else 1


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def make_split(
    data: Path, work: Path, seed: int, query_fraction: float, nonlandmark_fraction: float
) -> dict[str, Any]:
    """Stage 1: symlink folders, solutions and ``split.json`` (see the module docstring)."""
    rng = random.Random(seed)
    rows = read_csv(data / "landmarks.csv")
    distractors = read_csv(data / "distractors.csv")
    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_class[r["landmark"]].append(r)

    for sub in ("index", "queries", "nonlandmarks"):
        shutil.rmtree(work / sub, ignore_errors=True)
    index_items: list[dict[str, str]] = []  # id, path, landmark, collection
    queries: list[dict[str, str]] = []  # path, landmark ("" for non-landmarks), collection
    for lm in sorted(by_class):
        items = sorted(by_class[lm], key=lambda r: r["path"])
        q = set(rng.sample(range(len(items)), n_queries_for(len(items), query_fraction)))
        used: Counter[str] = Counter()
        for i, r in enumerate(items):
            src = data / r["path"]
            if i in q:
                queries.append({"path": str(src), "landmark": lm, "collection": r["collection"]})
                continue
            stem = Path(r["path"]).stem
            used[stem] += 1
            name = stem if used[stem] == 1 else f"{stem}_{used[stem]}"
            dst = work / "index" / lm / f"{name}{Path(r['path']).suffix.lower()}"
            _link(src, dst)
            index_items.append(
                {"id": f"{lm}/{name}", "path": str(src), "landmark": lm, "collection": r["collection"]}
            )

    by_coll: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in distractors:
        by_coll[r["collection"]].append(r)
    nonlandmarks: list[dict[str, str]] = []
    for coll in sorted(by_coll):
        items = sorted(by_coll[coll], key=lambda r: r["path"])
        n_set = round(len(items) * nonlandmark_fraction)
        in_set = set(rng.sample(range(len(items)), n_set))
        for i, r in enumerate(items):
            src = data / r["path"]
            if i in in_set:
                _link(src, work / "nonlandmarks" / coll / Path(r["path"]).name)
                nonlandmarks.append({"path": str(src), "collection": coll})
            else:
                queries.append({"path": str(src), "landmark": "", "collection": coll})

    rng.shuffle(queries)
    for n, qr in enumerate(queries):
        qr["id"] = f"q{n:04d}"
        _link(Path(qr["path"]), work / "queries" / f"{qr['id']}{Path(qr['path']).suffix.lower()}")

    # Solutions: Kaggle recognition (id,landmarks,Usage) and retrieval (id,images,Usage).
    usage = {qr["id"]: ("Public" if rng.random() < 1 / 3 else "Private") for qr in queries}
    index_of: dict[str, list[str]] = defaultdict(list)
    for it in index_items:
        index_of[it["landmark"]].append(it["id"])
    with open(work / "recognition_solution.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "landmarks", "Usage"])
        for qr in queries:
            w.writerow([qr["id"], qr["landmark"], usage[qr["id"]]])
    with open(work / "retrieval_solution.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "images", "Usage"])
        for qr in queries:
            if qr["landmark"]:
                w.writerow([qr["id"], " ".join(index_of[qr["landmark"]]), usage[qr["id"]]])
            else:
                w.writerow([qr["id"], "", "Ignored"])

    split = {
        "seed": seed,
        "query_fraction": query_fraction,
        "nonlandmark_fraction": nonlandmark_fraction,
        "data": str(data),
        "index": index_items,
        "queries": queries,
        "nonlandmarks": nonlandmarks,
    }
    (work / "split.json").write_text(json.dumps(split, indent=1), encoding="utf-8")
    return split


# --- helpers for the run's record --------------------------------------------------------------------


def run_record(run: Path) -> dict[str, Any]:
    """Steps, epochs and the last validation figures of a run, from its ``meta.json`` and ``log.jsonl``."""
    out: dict[str, Any] = {}
    meta_path = run / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        out["epochs"] = meta.get("epoch")
        out["steps"] = meta.get("step")
        out["local_head"] = bool(meta.get("local"))
        conf = meta.get("config") or {}
        out["image_size"] = (conf.get("data") or {}).get("image_size")
        out["backbone"] = (conf.get("model") or {}).get("backbone")
        out["head"] = ((conf.get("model") or {}).get("head") or {}).get("kind")
        out["budget_min"] = conf.get("time_budget_min")
        out.update({k: v for k, v in (meta.get("metrics") or {}).items() if k.startswith("val_")})
    log_path = run / "log.jsonl"
    if log_path.exists():
        rows = [
            json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        evals = [r for r in rows if "val_gap" in r]
        if evals:
            out.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
        out["log_epochs"] = len(rows)
    return out


def load_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or ``{}`` when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def save_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# --- analysis ----------------------------------------------------------------------------------------


def read_predictions(path: Path) -> dict[str, tuple[str, float] | None]:
    """``{query id: (landmark, confidence) or None}`` of a recognition CSV."""
    out: dict[str, tuple[str, float] | None] = {}
    for r in read_csv(path):
        cell = r["landmarks"].split()
        out[r["id"]] = (cell[0], float(cell[1])) if len(cell) == 2 else None
    return out


def top1_by(
    queries: list[dict[str, str]], preds: dict[str, tuple[str, float] | None], key: str
) -> dict[str, tuple[int, int]]:
    """``{group: (correct, landmark queries)}`` with groups given by ``key`` of the query rows."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for q in queries:
        if not q["landmark"]:
            continue
        p = preds.get(q["id"])
        out[q[key]][0] += int(p is not None and p[0] == q["landmark"])
        out[q[key]][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def outrank_by_collection(
    queries: list[dict[str, str]], preds: dict[str, tuple[str, float] | None]
) -> dict[str, float]:
    """Per distractor collection: the mean share of correct landmark predictions that a non-landmark
    query of it outranks (its confidence is higher; 0 = harmless for GAP, 1 = above every right answer)."""
    correct = sorted(
        p[1]
        for q in queries
        if q["landmark"] and (p := preds.get(q["id"])) is not None and p[0] == q["landmark"]
    )
    import bisect

    shares: dict[str, list[float]] = defaultdict(list)
    for q in queries:
        if q["landmark"]:
            continue
        p = preds.get(q["id"])
        share = 0.0 if p is None or not correct else bisect.bisect_left(correct, p[1]) / len(correct)
        shares[q["collection"]].append(share)
    return {k: sum(v) / len(v) for k, v in shares.items()}


def confusions(
    queries: list[dict[str, str]], preds: dict[str, tuple[str, float] | None]
) -> dict[str, Counter[str]]:
    """Per class: the wrong landmarks predicted for its queries."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for q in queries:
        p = preds.get(q["id"])
        if q["landmark"] and (p is None or p[0] != q["landmark"]):
            out[q["landmark"]][p[0] if p else "(none)"] += 1
    return out


# --- the report --------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals (``–`` when missing)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def frac(c: int, n: int) -> str:
    """``c/n (p%)``."""
    return f"{c}/{n} ({100 * c / n:.0f}%)" if n else "–"


def ap_default_variants() -> str:
    """The default of ``--variants`` (every variant)."""
    return ",".join(v.name for v in VARIANTS)


def is_landmark_shares(queries: list[dict[str, str]], neighbours_jsonl: Path) -> dict[str, float]:
    """From ``recognize --neighbours`` rows (``landmark`` is null when ``is_landmark`` is false): the share of
    non-landmark queries called landmarks and of landmark queries called not."""
    called: dict[str, bool] = {}
    if neighbours_jsonl.exists():
        for line in neighbours_jsonl.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                called[Path(str(row["id"])).stem] = row.get("landmark") is not None
    lq = [called.get(q["id"], False) for q in queries if q["landmark"]]
    nq = [called.get(q["id"], False) for q in queries if not q["landmark"]]
    return {
        "distractors_called_landmark": sum(nq) / max(1, len(nq)),
        "landmarks_called_not": sum(1 for c in lq if not c) / max(1, len(lq)),
    }


def row_summary(
    label: str,
    command: str,
    split: dict[str, Any],
    record: dict[str, Any],
    timings: dict[str, float],
    results: dict[str, dict[str, Any]],
    preds: dict[str, dict[str, tuple[str, float] | None]],
    shares: dict[str, dict[str, float]],
    notes: dict[str, str],
    model_note: str,
) -> dict[str, Any]:
    """One model's row of the page (JSON-ready): metrics, timings and breakdowns of each variant."""
    queries = split["queries"]
    n_q = len(queries)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    variants: dict[str, Any] = {}
    for name, r in results.items():
        variants[name] = {
            "gap": r.get("gap"),
            "gap_lq": r.get("gap_ignore_non_landmarks"),
            "top1": r.get("top1_accuracy"),
            "map100": r.get("map@100"),
            "s_per_query": timings.get("recognize " + name, 0.0) / max(1, n_q),
            "top1_by_collection": {
                c: list(v) for c, v in top1_by(queries, preds[name], "collection").items()
            },
            "outrank_by_collection": outrank_by_collection(queries, preds[name]),
            **shares.get(name, {}),
        }
    return {
        "label": label,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": model_note,
        "record": record,
        "timings": timings,
        "variants": variants,
        "notes": notes,
        "load_avg": [round(x, 1) for x in load],
    }


def _cell(v: dict[str, Any] | None) -> str:
    if not v:
        return "–"
    return f"{pct(v['gap'])} / {pct(v['gap_lq'])} / {pct(v['top1'])} / {pct(v['map100'])}"


def build_report(rows: dict[str, dict[str, Any]], split: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown page: the table of every model row, then each row's details."""
    queries = split["queries"]
    n_lq = sum(1 for q in queries if q["landmark"])
    n_nq = len(queries) - n_lq
    classes = sorted(
        {it["landmark"] for it in split["index"]} | {q["landmark"] for q in queries if q["landmark"]}
    )
    nl_coll = Counter(n["collection"] for n in split["nonlandmarks"])
    nq_coll = Counter(q["collection"] for q in queries if not q["landmark"])
    vnames = [v.name for v in VARIANTS]
    lines = [
        "# bench/realworld: real photos, through the `landmarks` CLI",
        "",
        f"CPU: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average at the end of "
        "each row's run below: seconds are indicative); offline. Each row is one command (below the table); "
        "the rows are kept in `bench/results/realworld.json` and this page is rewritten from them.",
        "",
        "## Setup",
        "",
        f"- Data: `../shared/data/realworld` (not in the repo): {len(classes)} classes; "
        f"**{len(split['index'])} index images**, **{n_lq} landmark queries** (~{args.query_fraction:.0%} of "
        "each class, at least 1 query and 2 index images where the class allows), "
        f"**{n_nq} non-landmark queries** and a disjoint **non-landmark set N of {len(split['nonlandmarks'])}** "
        f"(distractors split {args.nonlandmark_fraction:.0%} to N per collection, seed {args.seed}).",
        "- Distractors (N / queries): "
        + ", ".join(f"{c} {nl_coll[c]}/{nq_coll[c]}" for c in sorted(nq_coll))
        + ".",
        "- Variants: `recognize --no-ood` (global kNN, k = 3); + OOD (index- and query-side penalties from N); "
        "+ `--rerank local` on an index built with `--local sift` (RootSIFT + RANSAC) or `--local model` "
        "(the run's DELG-style head). s/query = wall time of the `recognize` call (model load, embedding "
        f"{len(queries)} queries, re-ranking) / {len(queries)}.",
        "- `is_landmark`: the index's calibrated threshold (`landmarks index`, precision target 0.9 on held-out "
        "index images vs N); reported for the + OOD variant as the share of non-landmark queries called "
        "landmarks / of landmark queries called not.",
        "",
        "## Results: GAP / GAP (landmark queries only) / top-1 / mAP@100 (%)",
        "",
        "| model | global | + OOD | + SIFT re-rank | + learned re-rank | s/query (global / SIFT / learned) "
        "| is_landmark: distractors called yes / landmarks called no | web landmarks top-1 (best variant) |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for label, row in rows.items():
        v = row["variants"]
        sq = " / ".join(
            f"{v[n]['s_per_query']:.2f}" if n in v else "–"
            for n in ("global+ood", "global+ood+sift", "global+ood+delg")
        )
        ood = v.get("global+ood", {})
        il = (
            f"{pct(ood.get('distractors_called_landmark'))} / {pct(ood.get('landmarks_called_not'))}"
            if "distractors_called_landmark" in ood
            else "–"
        )
        web = max(
            (x["top1_by_collection"].get("landmarks13_web", [0, 1]) for x in v.values()),
            key=lambda cn: cn[0],
            default=[0, 1],
        )
        lines.append(
            f"| {label} | "
            + " | ".join(_cell(v.get(n)) for n in vnames)
            + f" | {sq} | {il} | {frac(web[0], web[1])} |"
        )
    for label, row in rows.items():
        v = row["variants"]
        rec = row.get("record", {})
        names = [n for n in vnames if n in v]
        lines += [
            "",
            f"## {label}",
            "",
            f"Command: `{row['command']}`; {row['date']}; load average "
            f"{' / '.join(str(x) for x in row.get('load_avg', []))} (1/5/15 min) at the end.",
            "",
            f"- Model: {row['model']}.",
        ]
        if rec.get("steps"):
            lines.append(
                f"- Training: {rec.get('backbone')}, {rec.get('image_size')} px, "
                f"budget {rec.get('budget_min')} min"
                + (f" ({row['timings']['train']:.0f} s wall)" if row["timings"].get("train") else "")
                + f"; {rec.get('steps')} steps, epoch {rec.get('epochs')}; validation in the run's log: "
                f"GAP {pct(rec.get('val_gap'))}, top-1 {pct(rec.get('val_top1'))}"
                + (
                    f", local head's class accuracy {pct(rec.get('val_local_acc'))}"
                    if rec.get("val_local_acc") is not None
                    else ""
                )
                + "."
            )
        idx_t = ", ".join(
            f"{k} {t:.0f} s" for k, t in row["timings"].items() if k.startswith(("index", "init"))
        )
        if idx_t:
            lines.append(f"- Stages: {idx_t}.")
        for k, note in row.get("notes", {}).items():
            if k in vnames:
                lines.append(f"- {k}: {note}.")
        lines += [
            "",
            "| variant | GAP | GAP (landmark q.) | top-1 | mAP@100 | s/query | distractors called landmark "
            "| landmarks called not |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in names:
            x = v[n]
            lines.append(
                f"| {n} | {pct(x['gap'])} | {pct(x['gap_lq'])} | {pct(x['top1'])} | {pct(x['map100'])} | "
                f"{x['s_per_query']:.3f} | {pct(x.get('distractors_called_landmark'))} | "
                f"{pct(x.get('landmarks_called_not'))} |"
            )
        colls = sorted({c for n in names for c in v[n]["top1_by_collection"]})
        lines += ["", "| top-1 by collection | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for c in colls:
            lines.append(
                f"| {c} | "
                + " | ".join(frac(*v[n]["top1_by_collection"].get(c, [0, 0])) for n in names)
                + " |"
            )
        dcolls = sorted({c for n in names for c in v[n]["outrank_by_collection"]})
        lines += [
            "",
            "| distractors: share of right answers outranked (%) | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for c in dcolls:
            lines.append(
                f"| {c} | " + " | ".join(pct(v[n]["outrank_by_collection"].get(c)) for n in names) + " |"
            )
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the stages for one model row and print / write the report; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "realworld",
        help="the realworld folder (landmarks.csv, distractors.csv, images/)",
    )
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/landmarks-realworld"), help="work folder (outside the repo)"
    )
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "realworld.md", help="markdown results file"
    )
    ap.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="JSON file of the model rows (default: the --out file with a .json suffix)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the split, the training run and RANSAC")
    ap.add_argument("--preset", default="cpu", help="training preset (default cpu: Lite0 fine-tuned)")
    ap.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="no training: `landmarks init --pretrained WEIGHTS` (e.g. lite0) instead of a preset",
    )
    ap.add_argument("--init-size", type=int, default=320, help="image size of the --init model (default 320)")
    ap.add_argument(
        "--whiten", action="store_true", help="index with --whiten (PCA-whitening learned on the index)"
    )
    ap.add_argument("--label", default=None, help="the row's name in the table (default: from the options)")
    ap.add_argument("--train-minutes", type=float, default=5.0, help="training time budget (default 5)")
    ap.add_argument(
        "--local-mode",
        choices=("joint", "stage", "none"),
        default="joint",
        help="local head: trained in the same run (joint), as a second --local-only stage, or none",
    )
    ap.add_argument(
        "--local-minutes", type=float, default=1.5, help="budget of the --local-only stage (stage mode)"
    )
    ap.add_argument("--skip-train", type=Path, default=None, metavar="RUN", help="reuse this trained run")
    ap.add_argument("--model-note", default=None, help="how the --skip-train run was made (for the page)")
    ap.add_argument("--query-fraction", type=float, default=0.3, help="share of each class used as queries")
    ap.add_argument(
        "--nonlandmark-fraction",
        type=float,
        default=0.5,
        help="share of the distractors that form N (the rest are non-landmark queries)",
    )
    ap.add_argument(
        "--variants",
        default=ap_default_variants(),
        help="comma-separated variants to run (default: all: %(default)s)",
    )
    ap.add_argument(
        "--recognize-args", default="", help="extra `landmarks recognize` arguments (e.g. rerank settings)"
    )
    ap.add_argument("--device", default="cpu", help="torch device for every stage (default cpu)")
    ap.add_argument("--overwrite", action="store_true", help="delete the work folder first")
    args = ap.parse_args(argv)

    data, work = args.data.resolve(), args.work.resolve()
    wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {v.name for v in VARIANTS})
    if unknown or not wanted:
        raise SystemExit(f"--variants: unknown {unknown} (choose from {', '.join(v.name for v in VARIANTS)})")
    variants = [v for v in VARIANTS if v.name in wanted]
    if not (data / "landmarks.csv").is_file() or not (data / "distractors.csv").is_file():
        raise SystemExit(f"{data}: expected landmarks.csv and distractors.csv (see --data)")
    if work == REPO or REPO in work.parents:
        raise SystemExit(f"--work {work} is inside the repository; use a folder outside it")
    if args.overwrite and work.exists():
        if not (work / MARKER).exists():
            raise SystemExit(f"{work} exists and was not made by this benchmark; not deleting it")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("bench/realworld.py work folder\n")
    notes: dict[str, str] = {}

    # 1. split
    split_path = work / "split.json"
    if split_path.exists():
        split = json.loads(split_path.read_text(encoding="utf-8"))
        same = (split["seed"], split["query_fraction"], split["nonlandmark_fraction"]) == (
            args.seed,
            args.query_fraction,
            args.nonlandmark_fraction,
        )
        if not same:
            raise SystemExit(
                f"{work} holds a split made with other settings; use --overwrite or another --work"
            )
        log("split: already done")
    else:
        split = make_split(data, work, args.seed, args.query_fraction, args.nonlandmark_fraction)
        log(
            f"split: {len(split['index'])} index images, {len(split['queries'])} queries, "
            f"{len(split['nonlandmarks'])} in N"
        )

    # 2. the model: a reused run, a pretrained model with no training, or a training run of a preset
    if args.skip_train:
        run = args.skip_train.resolve()
        tag = run.name
        if not (run / "meta.json").exists():
            raise SystemExit(f"{run}: not a trained run (no meta.json)")
        model_note = args.model_note or f"reused run `{run.name}`"
        label = args.label or f"reused {run.name}"
    elif args.init:
        tag = f"init-{args.init}-{args.init_size}"
        run = work / tag
        model_note = (
            f"`landmarks init --pretrained {args.init} --image-size {args.init_size}`: ImageNet backbone + "
            "GeM (p = 3) + L2, no training"
        )
        label = args.label or f"{args.init}, no training (GeM)"
    else:
        tag = f"run-{args.preset}"
        run = work / tag
        model_note = f"`landmarks train --preset {args.preset} --time-budget {args.train_minutes:g}` on the index images"
        label = args.label or f"`{args.preset}`, {args.train_minutes:g}-min budget"
    if args.whiten:
        label = args.label or f"{label} + PCA-whitening from the index"
    timings_path = work / f"timings-{tag}{'-whiten' if args.whiten else ''}.json"
    timings = load_json(timings_path)

    def stage(name: str, done: bool, fn: Any) -> None:
        if done:
            log(f"{name}: already done, skipped ({timings.get(name, 0):.0f} s last time)")
            return
        t = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t, 1)
        save_json(timings_path, timings)
        log(f"{name}: {timings[name]:.0f} s")

    if args.init:
        stage(
            "init",
            (run / "meta.json").exists(),
            lambda: cli(
                "init", "--pretrained", args.init, "--image-size", str(args.init_size), "--out", str(run)
            ),
        )
    elif not args.skip_train:
        train_args = [
            "train",
            "--data",
            str(work / "index"),
            "--out",
            str(run),
            "--preset",
            args.preset,
            "--time-budget",
            f"{args.train_minutes:g}",
            "--seed",
            str(args.seed),
            "--device",
            args.device,
        ]
        if args.local_mode == "joint":
            train_args.append("--local")
        done = (run / "BENCH_DONE").exists()
        budget = run_record(run).get("budget_min") if done else None
        if done and budget is not None and not math.isclose(float(budget), args.train_minutes):
            raise SystemExit(
                f"{run} was trained with a {budget:g}-minute budget, not {args.train_minutes:g}: "
                "use --overwrite or another --work"
            )
        if not done and (run / "train_state.json").exists():
            train_args = ["train", "--out", str(run), "--resume", "--device", args.device]

        def _train() -> None:
            out = cli(*train_args, capture=True)
            (run / "BENCH_DONE").write_text(out)

        stage("train", done, _train)
        notes["local"] = {
            "joint": "trained in the same run (`--local`), within the same budget",
            "stage": f"second stage `--init RUN --local-only`, {args.local_minutes:g} min",
            "none": "none",
        }[args.local_mode]
        if args.local_mode == "stage":
            run_local = work / f"{tag}-local"
            stage(
                "train local",
                (run_local / "BENCH_DONE").exists(),
                lambda: (run_local / "BENCH_DONE").write_text(
                    cli(
                        "train",
                        "--data",
                        str(work / "index"),
                        "--out",
                        str(run_local),
                        "--init",
                        str(run),
                        "--local-only",
                        "--time-budget",
                        f"{args.local_minutes:g}",
                        "--seed",
                        str(args.seed),
                        "--device",
                        args.device,
                        capture=True,
                    )
                ),
            )
            timings["train"] = timings.get("train", 0) + timings.get("train local", 0)
            run = run_local
    record = run_record(run)
    log(f"run: {json.dumps(record)}")

    # 3. index: with local features (SIFT / the model's) only when a re-ranking variant needs them; the global
    # variants use a local-feature index when one was built, else a global-only one (cheaper on a loaded CPU)
    suffix = f"{tag}{'-whiten' if args.whiten else ''}"
    indexes = {
        "sift": work / f"index-sift-{suffix}",
        "model": work / f"index-model-{suffix}",
        "global": work / f"index-global-{suffix}",
    }
    needed = {v.index for v in variants if v.rerank}
    if any(not v.rerank for v in variants) and not needed and not (indexes["sift"] / "meta.json").exists():
        needed.add("global")
    for kind in ("sift", "model", "global"):
        if kind not in needed:
            continue
        out = indexes[kind]
        if kind == "model" and not record.get("local_head"):
            notes["global+ood+delg"] = "the model has no local head"
            continue
        argv = [
            "index",
            "--model",
            str(run),
            "--images",
            str(work / "index"),
            "--out",
            str(out),
            "--non-landmarks",
            str(work / "nonlandmarks"),
            "--device",
            args.device,
        ]
        if kind != "global":
            argv += ["--local", kind]
        if args.whiten:
            argv.append("--whiten")
        stage(f"index {kind}", (out / "meta.json").exists(), lambda argv=argv: cli(*argv))

    # 4. recognize + 5. evaluate
    pred_dir = work / f"predictions-{suffix}"
    pred_dir.mkdir(exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    preds: dict[str, dict[str, tuple[str, float] | None]] = {}
    shares: dict[str, dict[str, float]] = {}
    extra = args.recognize_args.split()
    for v in variants:
        index = indexes[v.index]
        if not v.rerank and not (index / "meta.json").exists():
            index = indexes["global"]
        if not (index / "meta.json").exists():
            continue
        csv_path, ret_path = pred_dir / f"{v.name}.csv", pred_dir / f"{v.name}.retrieval.csv"
        nb_path = pred_dir / f"{v.name}.neighbours.jsonl"
        argv = [
            "recognize",
            "--index",
            str(index),
            str(work / "queries"),
            "--out",
            str(csv_path),
            "--retrieval",
            str(ret_path),
            "--neighbours",
            str(nb_path),
            "--device",
            args.device,
        ]
        if not v.ood:
            argv.append("--no-ood")
        if v.rerank:
            argv += ["--rerank", "local", "--seed", str(args.seed), *extra]
        stage(f"recognize {v.name}", csv_path.exists() and ret_path.exists(), lambda argv=argv: cli(*argv))
        rec = json.loads(
            cli(
                "evaluate",
                "recognition",
                "--solution",
                str(work / "recognition_solution.csv"),
                "--predictions",
                str(csv_path),
                "--json",
                capture=True,
            )
        )["all"]
        ret = json.loads(
            cli(
                "evaluate",
                "retrieval",
                "--solution",
                str(work / "retrieval_solution.csv"),
                "--predictions",
                str(ret_path),
                "--json",
                capture=True,
            )
        )["all"]
        results[v.name] = {**rec, **ret}
        preds[v.name] = read_predictions(csv_path)
        shares[v.name] = is_landmark_shares(split["queries"], nb_path)
    if not results:
        raise SystemExit("no variant could be run")

    # The row's command line, with repo-relative data and no machine paths beyond the work folder.
    cmd = "python bench/realworld.py" + "".join(f" {a}" for a in (argv_list(args)))
    row = row_summary(label, cmd, split, record, timings, results, preds, shares, notes, model_note)
    rows_path = args.rows or args.out.with_suffix(".json")
    rows = load_json(rows_path).get("rows", {}) if rows_path.exists() else {}
    rows[label] = row
    save_json(rows_path, {"data": "../shared/data/realworld", "seed": args.seed, "rows": rows})
    report = build_report(rows, split, args)
    old = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    if NOTES in old:
        report += "\n" + old[old.index(NOTES) :]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(report, encoding="utf-8")
    os.replace(tmp, args.out)
    print(report)
    log(f"wrote {args.out} and {rows_path}")
    return 0


def argv_list(args: argparse.Namespace) -> list[str]:
    """The options that define a row, as a command line (paths outside the repo shown by name only)."""
    out: list[str] = []
    if args.skip_train:
        out += ["--skip-train", f"RUN({args.skip_train.name})"]
    elif args.init:
        out += ["--init", args.init, "--init-size", str(args.init_size)]
    else:
        out += ["--preset", args.preset, "--train-minutes", f"{args.train_minutes:g}"]
        if args.local_mode != "joint":
            out += ["--local-mode", args.local_mode]
    if args.whiten:
        out.append("--whiten")
    if args.seed:
        out += ["--seed", str(args.seed)]
    if args.recognize_args:
        out += ["--recognize-args", repr(args.recognize_args)]
    if args.variants != ap_default_variants():
        out += ["--variants", args.variants]
    return out


if __name__ == "__main__":
    sys.exit(main())
