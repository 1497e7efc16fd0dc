"""landmarks.metrics against hand-computed fixtures and slow, obviously-correct loop oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from landmarks.metrics import (
    global_average_precision,
    mean_average_precision,
    mean_median_position,
    mean_precisions,
    recognition_metrics,
    retrieval_metrics,
    retrieval_per_query,
    revisited_map,
    top1_accuracy,
)

# --------------------------------------------------------------------------------------------------
# Oracles: loops written from the definitions, no numpy tricks
# --------------------------------------------------------------------------------------------------


def gap_oracle(predictions, solution, ignore_non_landmarks=False):
    m = sum(1 for truth in solution.values() if truth)
    if m == 0:
        return math.nan
    entries = [(q, p[0], float(p[1])) for q, p in predictions.items() if p is not None]
    entries.sort(key=lambda e: (-e[2], e[0], e[1]))
    seen = correct = 0
    total = 0.0
    for q, landmark, _ in entries:
        if ignore_non_landmarks and not solution[q]:
            continue
        seen += 1
        if landmark in solution[q]:
            correct += 1
            total += correct / seen
    return total / m


def top1_oracle(predictions, solution):
    n = ok = 0
    for q, truth in solution.items():
        if truth:
            n += 1
            p = predictions.get(q)
            ok += p is not None and p[0] in truth
    return ok / n if n else math.nan


def ap_oracle(ranked, truth, k):
    seen = set()
    correct = 0
    total = 0.0
    for i, x in enumerate(ranked[:k]):
        if x in seen:
            continue
        seen.add(x)
        if x in truth:
            correct += 1
            total += correct / (i + 1)
    norm = min(len(truth), k)
    return total / norm if norm else 0.0


def map_oracle(predictions, solution, k):
    if not solution:
        return math.nan
    return sum(ap_oracle(predictions.get(q, []), t, k) for q, t in solution.items()) / len(solution)


def precision_oracle(predictions, solution, k):
    if not solution:
        return math.nan
    total = 0.0
    for q, truth in solution.items():
        distinct = {x for x in predictions.get(q, [])[:k] if x in truth}
        total += len(distinct) / k
    return total / len(solution)


def positions_oracle(predictions, solution, k):
    positions = []
    for q, truth in solution.items():
        pos = k + 1
        for i, x in enumerate(predictions.get(q, [])[:k]):
            if x in truth:
                pos = i + 1
                break
        positions.append(pos)
    if not positions:
        return math.nan, math.nan
    positions.sort()
    n = len(positions)
    median = positions[n // 2] if n % 2 else (positions[n // 2 - 1] + positions[n // 2]) / 2
    return sum(positions) / n, median


def revisited_oracle(ranks, gnd, kappas):
    """Remove junk from each ranked list, then walk it: trapezoid AP and revisitop's mP@k."""
    protocols = {
        "easy": (["easy"], ["junk", "hard"]),
        "medium": (["easy", "hard"], ["junk"]),
        "hard": (["hard"], ["junk", "easy"]),
    }
    out = {}
    for name, (pos_keys, junk_keys) in protocols.items():
        aps, prs = [], []
        for row, g in zip(ranks, gnd):
            ok = [x for key in pos_keys for x in g.get(key, [])]
            if not ok:
                continue
            junk = {x for key in junk_keys for x in g.get(key, [])}
            kept = [int(x) for x in row if int(x) not in junk]
            found = [r for r, x in enumerate(kept) if x in set(ok)]  # 0-based ranks of positives
            ap = 0.0
            for j, r in enumerate(found):
                before = 1.0 if r == 0 else j / r
                after = (j + 1) / (r + 1)
                ap += (before + after) / 2 / len(ok)
            aps.append(ap)
            pr = []
            for kappa in kappas:
                if not found:
                    pr.append(0.0)
                    continue
                kq = min(found[-1] + 1, kappa)
                pr.append(sum(1 for r in found if r + 1 <= kq) / kq)
            prs.append(pr)
        if aps:
            out[name] = {
                "map": sum(aps) / len(aps),
                "mp@k": [sum(p[i] for p in prs) / len(prs) for i in range(len(kappas))],
            }
        else:
            out[name] = {"map": math.nan, "mp@k": [math.nan] * len(kappas)}
    return out


def close(a, b, tol=1e-9):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= tol


# --------------------------------------------------------------------------------------------------
# GAP and top-1
# --------------------------------------------------------------------------------------------------

CHALLENGE_SOLUTION = {"a": ["0", "12"], "b": ["100", "200", "300"], "c": ["1"], "d": [], "e": []}
CHALLENGE_PREDICTIONS = {"d": ("150", 15.0), "c": ("1", 10.0), "b": ("0", 0.01)}


def test_challenge_example():
    assert global_average_precision(CHALLENGE_PREDICTIONS, CHALLENGE_SOLUTION) == pytest.approx(
        1 / 6, abs=1e-12
    )
    assert global_average_precision(
        CHALLENGE_PREDICTIONS, CHALLENGE_SOLUTION, ignore_non_landmarks=True
    ) == pytest.approx(1 / 3, abs=1e-12)
    assert top1_accuracy(CHALLENGE_PREDICTIONS, CHALLENGE_SOLUTION) == pytest.approx(1 / 3, abs=1e-12)
    assert recognition_metrics(CHALLENGE_PREDICTIONS, CHALLENGE_SOLUTION) == pytest.approx(
        {"gap": 1 / 6, "gap_ignore_non_landmarks": 1 / 3, "top1_accuracy": 1 / 3}
    )


def test_gap_ties_broken_by_query_id():
    solution = {"b": ["x"], "a": [], "c": ["y"]}
    # c first (higher score); a and b tie: a (wrong, non-landmark) goes before b.
    predictions = {"b": ("x", 1.0), "a": ("z", 1.0), "c": ("y", 2.0)}
    assert global_average_precision(predictions, solution) == pytest.approx((1 + 2 / 3) / 2)
    assert global_average_precision(predictions, solution, ignore_non_landmarks=True) == pytest.approx(1.0)
    # Query ids compare as strings: "q10" < "q9".
    solution = {"q9": ["x"], "q10": ["y"]}
    predictions = {"q9": ("x", 0.5), "q10": ("n", 0.5)}
    assert global_average_precision(predictions, solution) == pytest.approx((1 / 2) / 2)


def test_gap_multilabel_blank_and_negative_scores():
    solution = {"a": ["1", "2"], "b": ["3"], "c": ["4", "5", "6"], "d": []}
    predictions = {"a": ("2", -1.0), "b": None, "c": ("6", -0.5), "d": ("4", -2.0)}
    # Ranking: c (ok 1/1), a (ok 2/2), d (wrong); b is blank and left out. M = 3.
    assert global_average_precision(predictions, solution) == pytest.approx(2 / 3)
    assert top1_accuracy(predictions, solution) == pytest.approx(2 / 3)


def test_gap_empty_inputs_and_errors():
    assert math.isnan(global_average_precision({}, {}))
    assert math.isnan(global_average_precision({}, {"a": []}))
    assert math.isnan(top1_accuracy({}, {"a": []}))
    assert global_average_precision({}, {"a": ["1"]}) == 0.0
    assert global_average_precision({"a": None}, {"a": ["1"]}) == 0.0
    assert top1_accuracy({}, {"a": ["1"]}) == 0.0
    with pytest.raises(ValueError, match="'zz'"):
        global_average_precision({"zz": ("1", 1.0)}, {"a": ["1"]})
    with pytest.raises(ValueError, match="'zz'"):
        top1_accuracy({"zz": ("1", 1.0)}, {"a": ["1"]})
    with pytest.raises(ValueError, match="'zz'"):
        recognition_metrics({"zz": None}, {"a": ["1"]})
    with pytest.raises(ValueError, match="NaN"):
        global_average_precision({"a": ("1", float("nan"))}, {"a": ["1"]})


def random_recognition(rng, n_queries):
    landmarks = [str(i) for i in range(int(rng.integers(1, 8)))]
    ids = [f"q{int(i)}" for i in rng.permutation(n_queries * 3)[:n_queries]]
    solution, predictions = {}, {}
    for q in ids:
        n_true = int(rng.choice([0, 0, 1, 1, 1, 2, 3]))
        solution[q] = [
            str(x) for x in rng.choice(len(landmarks), size=min(n_true, len(landmarks)), replace=False)
        ]
        r = rng.random()
        if r < 0.15:
            continue  # no row at all
        if r < 0.25:
            predictions[q] = None
            continue
        # Few distinct scores so that ties are common; sometimes infinite.
        score = float(rng.integers(0, 4)) / 2 if rng.random() < 0.7 else float(rng.normal())
        if rng.random() < 0.02:
            score = float("inf") if rng.random() < 0.5 else -float("inf")
        predictions[q] = (str(rng.choice(landmarks)), score)
    return predictions, solution


def test_gap_matches_oracle_on_random_data():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        predictions, solution = random_recognition(rng, int(rng.integers(0, 60)))
        for ignore in (False, True):
            got = global_average_precision(predictions, solution, ignore_non_landmarks=ignore)
            assert close(got, gap_oracle(predictions, solution, ignore)), (seed, ignore)
        assert close(top1_accuracy(predictions, solution), top1_oracle(predictions, solution)), seed
        together = recognition_metrics(predictions, solution)
        assert close(together["gap"], gap_oracle(predictions, solution)), seed
        assert close(together["gap_ignore_non_landmarks"], gap_oracle(predictions, solution, True)), seed
        assert close(together["top1_accuracy"], top1_oracle(predictions, solution)), seed


# --------------------------------------------------------------------------------------------------
# Retrieval: mAP@k, precision@k, positions
# --------------------------------------------------------------------------------------------------

RETRIEVAL_SOLUTION = {"q1": ["a", "b", "c"], "q2": ["x"], "q3": ["y", "z"], "q4": ["w"]}
RETRIEVAL_PREDICTIONS = {"q1": ["a", "a", "d", "b"], "q2": ["m", "x", "x"], "q3": ["y", "q", "z"]}


def test_map_hand_computed():
    # q1: a@1 (1/1), a repeated@2 earns nothing but keeps its rank, b@4 (2/4) -> 1.5 / 3 = 0.5
    # q2: x@2 (1/2) -> 0.5 ; q3: y@1 (1), z@3 (2/3) -> (5/3) / 2 = 5/6 ; q4: no prediction -> 0
    assert mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION) == pytest.approx(
        (0.5 + 0.5 + 5 / 6) / 4, abs=1e-12
    )
    # k=2: q1 [a, a] -> 1 / min(3, 2) ; q2 [m, x] -> 0.5 ; q3 [y, q] -> 1 / 2
    assert mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, k=2) == pytest.approx(0.375)
    # k=1: normaliser 1/min(|gt|, 1) = 1 -> q1 1, q2 0, q3 1, q4 0
    assert mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, k=1) == pytest.approx(0.5)
    # A repeated relevant id is counted once; the list is not "compacted".
    assert mean_average_precision({"q": ["b", "a", "a", "a"]}, {"q": ["a", "b"]}) == pytest.approx(1.0)
    assert mean_average_precision({"q": ["n", "a", "a", "b"]}, {"q": ["a", "b"]}) == pytest.approx(
        (1 / 2 + 2 / 4) / 2
    )


def test_retrieval_per_query_hand_computed():
    got = retrieval_per_query(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION)
    want = {"q1": (0.5, 1), "q2": (0.5, 2), "q3": (5 / 6, 1), "q4": (0.0, None)}  # see test_map_hand_computed
    assert list(got) == list(want)
    for q, (ap, first) in want.items():
        assert got[q][0] == pytest.approx(ap, abs=1e-12) and got[q][1] == first
    assert retrieval_per_query(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, k=1)["q2"] == (0.0, None)


def test_precisions_and_positions_hand_computed():
    precisions = mean_precisions(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION)
    assert precisions[1] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert precisions[5] == pytest.approx((2 / 5 + 1 / 5 + 2 / 5) / 4)
    assert precisions[100] == pytest.approx((2 + 1 + 2) / 100 / 4)
    # first correct: q1 1, q2 2, q3 1, q4 none -> 101
    assert mean_median_position(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION) == pytest.approx((105 / 4, 1.5))
    assert mean_median_position(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, k=1) == pytest.approx((1.5, 1.5))
    everything = retrieval_metrics(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION)
    assert list(everything) == [
        "map@100",
        "mean_precision@1",
        "mean_precision@5",
        "mean_precision@10",
        "mean_precision@50",
        "mean_precision@100",
        "mean_position",
        "median_position",
    ]
    assert list(retrieval_metrics(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, k=7))[0] == "map@7"


def test_retrieval_empty_inputs_and_errors():
    assert math.isnan(mean_average_precision({}, {}))
    assert all(math.isnan(v) for v in retrieval_metrics({}, {}).values())
    assert mean_average_precision({}, {"q": ["a"]}) == 0.0
    assert mean_average_precision({"q": []}, {"q": ["a"]}) == 0.0
    assert mean_average_precision({"q": ["a"]}, {"q": []}) == 0.0  # empty truth: AP 0, still counted
    assert mean_median_position({"q": []}, {"q": ["a"]}, k=10) == (11.0, 11.0)
    with pytest.raises(ValueError, match="'zz'"):
        mean_average_precision({"zz": ["a"]}, {"q": ["a"]})
    with pytest.raises(ValueError, match="positive"):
        mean_average_precision({}, {"q": ["a"]}, k=0)


def random_retrieval(rng):
    n_db = int(rng.integers(1, 40))
    n_q = int(rng.integers(0, 25))
    solution, predictions = {}, {}
    for i in range(n_q):
        q = f"q{i}"
        n_true = int(rng.integers(0, min(n_db, 12) + 1))
        solution[q] = [f"i{int(x)}" for x in rng.choice(n_db, size=n_true, replace=False)]
        if rng.random() < 0.15:
            continue
        length = int(rng.integers(0, 130))
        # Draw with replacement so that repeated ids happen.
        predictions[q] = [f"i{int(x)}" for x in rng.integers(0, n_db, size=length)]
    return predictions, solution


def test_retrieval_matches_oracle_on_random_data():
    for seed in range(150):
        rng = np.random.default_rng(1000 + seed)
        predictions, solution = random_retrieval(rng)
        for k in (1, 3, 10, 100):
            assert close(
                mean_average_precision(predictions, solution, k=k), map_oracle(predictions, solution, k)
            ), (seed, k)
            got = mean_median_position(predictions, solution, k=k)
            want = positions_oracle(predictions, solution, k)
            assert close(got[0], want[0]) and close(got[1], want[1]), (seed, k)
        precisions = mean_precisions(predictions, solution)
        for r, value in precisions.items():
            assert close(value, precision_oracle(predictions, solution, r)), (seed, r)
        everything = retrieval_metrics(predictions, solution, k=100)
        assert close(everything["map@100"], map_oracle(predictions, solution, 100))
        for r in (1, 5, 10, 50, 100):
            assert close(everything[f"mean_precision@{r}"], precisions[r])


# --------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# --------------------------------------------------------------------------------------------------


def test_revisited_hand_worked():
    ranks = np.array([[5, 0, 3, 1, 4, 2], [0, 1, 2, 3, 4, 5]])
    gnd = [{"easy": [0, 2], "hard": [4], "junk": [3]}, {"easy": [0], "hard": [], "junk": []}]
    out = revisited_map(ranks, gnd)
    # Query 0, easy: junk {3, 4} removed -> 5,0,1,2: positives at ranks 1, 3 (0-based)
    #   AP = [(0 + 1/2) + (1/3 + 2/4)] / (2 * 2) = 1/3 ; mP@1 0, @5 and @10: 2 of the first 4 -> 1/2
    # Query 1, easy: AP 1, mP 1.
    assert out["easy"]["map"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["easy"]["mp@k"] == pytest.approx([0.5, 0.75, 0.75])
    # Query 0, medium: junk {3} removed -> 5,0,1,4,2: positives at 1, 3, 4 of 3
    #   AP = [(0 + 1/2) + (1/3 + 2/4) + (2/4 + 3/5)] / 6 = 73/180 ; mP@5 = 3/5, mP@10 = 3/5 (cut at 5)
    assert out["medium"]["map"] == pytest.approx((73 / 180 + 1) / 2)
    assert out["medium"]["mp@k"] == pytest.approx([0.5, 0.8, 0.8])
    # Query 0, hard: junk {3, 0, 2} removed -> 5,1,4: positive at 2 -> AP (0 + 1/3) / 2 = 1/6;
    # query 1 has no hard positive and is left out.
    assert out["hard"]["map"] == pytest.approx(1 / 6)
    assert out["hard"]["mp@k"] == pytest.approx([0.0, 1 / 3, 1 / 3])


def test_revisited_edge_cases():
    out = revisited_map(np.zeros((0, 4), dtype=np.int64), [])
    assert math.isnan(out["medium"]["map"])
    out = revisited_map(np.array([[2, 1, 0]]), [{"easy": [0], "junk": []}])  # no "hard" key
    assert math.isnan(out["hard"]["map"]) and out["easy"]["map"] == pytest.approx(1 / 6)
    # Truncated ranking: a positive that is not listed earns nothing.
    out = revisited_map(np.array([[0]]), [{"easy": [0, 1], "hard": [], "junk": []}])
    assert out["easy"]["map"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="transpose"):
        revisited_map(np.zeros((3, 2), dtype=np.int64), [{"easy": [0]}])


def test_revisited_matches_oracle_on_random_data():
    for seed in range(60):
        rng = np.random.default_rng(5000 + seed)
        n_db, n_q = int(rng.integers(1, 60)), int(rng.integers(1, 8))
        ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
        if rng.random() < 0.3:
            ranks = ranks[:, : int(rng.integers(1, n_db + 1))]
        gnd = []
        for _ in range(n_q):
            labels = rng.integers(0, 5, size=n_db)  # 0 easy, 1 hard, 2 junk, 3-4 negatives
            gnd.append(
                {
                    name: np.flatnonzero(labels == i).tolist()
                    for i, name in enumerate(["easy", "hard", "junk"])
                }
            )
        kappas = (1, 5, 10)
        got, want = revisited_map(ranks, gnd, kappas), revisited_oracle(ranks.tolist(), gnd, kappas)
        for name in ("easy", "medium", "hard"):
            assert close(got[name]["map"], want[name]["map"]), (seed, name)
            for a, b in zip(got[name]["mp@k"], want[name]["mp@k"]):
                assert close(a, b), (seed, name)
