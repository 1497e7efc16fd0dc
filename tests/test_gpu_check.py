"""bench/gpu_check.py --dry-run: every stage of the GPU check runs on the CPU at tiny sizes, so the script
that will run once on an accelerator cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    md = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--dry-run",
            "--work",
            str(tmp_path / "work"),
            "--results",
            str(md),
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    figures = json.loads(out.read_text())
    st = figures["stages"]
    assert list(st) == ["synth", "throughput", "train", "ddp", "local", "extract", "recognize"]
    assert not [k for k, v in st.items() if "error" in v or "skipped" in v], st
    assert st["synth"]["images"] > 100
    assert st["throughput"]["ours_img_s"] > 0 and st["throughput"]["bare_img_s"] > 0
    tr = st["train"]
    # killed mid-epoch after a checkpoint; the resumed session starts at the checkpoint's next step, redoes the
    # steps the killed one made after it with the same losses (bit-exact on a CPU), and ends at the planned step
    assert tr["mid_epoch"] and tr["killed_at_step"] > tr["killed_after_checkpoint"]
    assert tr["resumed_at"] == tr["killed_after_checkpoint"] + 1 and tr["last_step"] == tr["steps"] == 12
    assert tr["steps_continue"] and tr["redone_steps"] >= 1 and tr["redone_max_rel_diff"] == 0.0
    assert tr["curve_continues"] and tr["loss_falls"] and tr["loss_last"] < tr["loss_first"]
    assert st["ddp"]["procs"] == 2 and st["ddp"]["steps"] == 4
    assert st["local"]["steps"] == 4
    assert st["extract"]["images"] == min(64, st["synth"]["train_images"]) and st["extract"]["ratio"] > 0
    rec = st["recognize"]
    assert rec["local_head_device"] == "cpu" and rec["queries"] == 12 and "gap_local" in rec
    text = md.read_text()
    assert "CPU dry run" in text and "GPU run is pending" in text
    assert "| train |" in text and "| recognize |" in text and "| total |" in text


def test_stages_past_the_budget_are_skipped(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    seen: list[list[str]] = []
    res, seconds = gpu_check.run_stages(
        tmp_path, gpu_check.dry_sizes(), budget_s=-1.0, after_stage=lambda r, s: seen.append(list(r))
    )
    assert list(res) == ["synth", "throughput", "train", "ddp", "local", "extract", "recognize"]
    assert res["synth"] == {"skipped": "the -1 s budget of the run was spent"}
    assert all("skipped" in r for r in res.values()) and seconds == {} and seen == []
    assert not any(tmp_path.iterdir())  # nothing ran
