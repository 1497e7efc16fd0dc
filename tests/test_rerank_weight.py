"""The re-ranking score's weight (``score = s + weight * min(inliers, c) / c``) and its CLI flags."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from landmarks.errors import ConfigError
from landmarks.recognize import RecognizeConfig
from landmarks.rerank import local_scores


def test_weighted_bonus_matches_loop() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(-1, 1, (5, 7)).astype(np.float32)
    base[0, 3] = -np.inf
    inl = rng.integers(-1, 120, (5, 7))
    for c, m, w in ((70.0, 10, 1.0), (20.0, 15, 0.25), (35.0, 0, 0.0)):
        got = local_scores(base, inl, c, m, w)
        for q in range(5):
            for j in range(7):
                n = inl[q, j] if inl[q, j] >= m and inl[q, j] > 0 else 0
                want = base[q, j] + w * min(n, c) / c
                if np.isinf(want):
                    assert np.isneginf(got[q, j])
                else:
                    assert got[q, j] == pytest.approx(want, abs=1e-6)
    # the default weight is today's score
    np.testing.assert_array_equal(local_scores(base, inl, 70.0, 10), local_scores(base, inl, 70.0, 10, 1.0))
    with pytest.raises(ValueError, match="weight"):
        local_scores(base, inl, 70.0, 10, -0.5)


def test_cli_flags_set_the_scoring() -> None:
    from landmarks.commands import recognize as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(
        [
            "--index",
            "ix",
            "q.jpg",
            "--out",
            "p.csv",
            "--rerank",
            "local",
            "--rerank-c",
            "20",
            "--rerank-min-inliers",
            "15",
            "--rerank-weight",
            "0.3",
        ]
    )
    conf = cmd._config(args)
    assert (conf.rerank_c, conf.rerank_min_inliers, conf.rerank_weight) == (20.0, 15, 0.3)
    with pytest.raises(ConfigError, match="rerank_weight"):
        RecognizeConfig(rerank_weight=-1.0)
