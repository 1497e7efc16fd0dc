"""The console script: --help lists every verb; user errors exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys

from landmarks.cli import VERBS, main


def test_help_lists_every_verb() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "landmarks", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for verb, _ in VERBS:
        assert f"    {verb}" in out


def test_every_verb_has_a_module_with_help() -> None:
    for verb, _ in VERBS:
        try:
            main([verb, "--help"])
        except SystemExit as e:
            assert e.code == 0, verb


def test_no_verb_prints_help(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([]) == 0
    assert "verbs" in capsys.readouterr().out
