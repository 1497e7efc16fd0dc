"""The training loop: schedule, kNN validation, run folders, reproducibility, kill/resume, stages."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from landmarks import checkpoint as ckpt
from landmarks.errors import ConfigError, LandmarksError
from landmarks.train import (
    Trainer,
    knn_predict,
    lr_factor,
    make_config,
    plan_steps,
    read_log,
    train,
)


def make_shapes(root: Path, n_classes: int = 6, per_class: int = 9, size: int = 48, seed: int = 0) -> Path:
    """A folder-per-landmark collection of coloured shapes on noisy backgrounds, plus one bad file."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"lm{c}"
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3).tolist()
        background = rng.integers(0, 256, 3)
        for i in range(per_class):
            img = np.clip(background + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
            r = int(rng.integers(size // 8, size // 4))
            if c % 3 == 0:
                cv2.circle(img, (cx, cy), r, colour, -1)
            elif c % 3 == 1:
                cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
            else:
                cv2.fillPoly(
                    img, [np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)], colour
                )
            cv2.imwrite(str(d / f"{i}.jpg"), img[:, :, ::-1])
    (root / "lm0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def tiny(**over: object) -> object:
    base: dict[str, object] = {"batch_size": 8, "epochs": 2, "data": {"image_size": 48, "val_fraction": 0.15}}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}  # type: ignore[dict-item]
        else:
            base[k] = v
    return make_config("tiny", base)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine, 2 spinning OpenMP threads stall each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run (2 epochs, validated before training too), shared by several tests."""
    out = tmp_path_factory.mktemp("runs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside the function-scoped thread fixture
    try:
        train(tiny(eval_at_start=True), shapes, out)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    return out


# --- pure helpers ----------------------------------------------------------------------------------------


def test_lr_schedule() -> None:
    f = [lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.01, abs=0.01)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(0, 5, 0, 0.0) == pytest.approx(1.0)


def test_knn_predict_matches_loop() -> None:
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(40, 8)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    yb = rng.integers(0, 5, 40)
    xq = rng.normal(size=(13, 8)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    for k in (1, 3, 7):
        labels, scores = knn_predict(xq, xb, yb, k=k, chunk=5)
        for q in range(13):
            sims = xb @ xq[q]
            order = np.argsort(-sims, kind="stable")[:k]
            votes: dict[int, float] = {}
            for i in order:
                votes[int(yb[i])] = votes.get(int(yb[i]), 0.0) + float(sims[i])
            best = max(votes.values())
            winner = next(int(yb[i]) for i in order if abs(votes[int(yb[i])] - best) < 1e-6)
            assert labels[q] == winner
            assert scores[q] == pytest.approx(best, abs=1e-5)  # the sum, as recognition reports it


def test_plan_steps_fits_budget() -> None:
    for avail in (60.0, 300.0, 3000.0):
        steps, every = plan_steps(
            avail, step_s=0.5, steps_per_epoch=40, eval_s=8.0, epoch_overhead_s=1.0, final_s=10.0
        )
        epochs = math.ceil(steps / 40)
        used = steps * 0.5 + epochs * 1.0 + math.ceil(epochs / every) * 8.0 + 10.0
        assert used <= avail and steps >= 1
        assert used > 0.8 * avail or avail < 100
    assert plan_steps(600, 0.5, 40, 8, 1, 10)[0] > plan_steps(300, 0.5, 40, 8, 1, 10)[0]
    # Expensive validations are spread out to stay within ~15 % of the budget.
    assert plan_steps(300, 0.1, 10, 20, 0.1, 5)[1] > 1


# --- a run folder -----------------------------------------------------------------------------------------


def test_run_folder_contents(trained: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "meta.json",
        "train_state.safetensors",
        "train_state.json",
        "log.jsonl",
        "skipped.csv",
    ):
        assert (trained / name).is_file(), name
    log = read_log(trained)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert all("val_gap" in r for r in log)
    assert log[-1]["step"] == 2 * log[1]["step"]
    assert "broken.jpg" in (trained / "skipped.csv").read_text()
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["num_classes"] == 6 and sum(c["count"] for c in meta["classes"]) > 0
    assert (
        set(meta["preprocessing"]) >= {"image_size", "mean", "std"}
        and meta["preprocessing"]["image_size"] == 48
    )
    assert {"torch", "timm", "python"} <= set(meta["versions"]) and "git_sha" in meta
    assert meta["margins"]["kind"] == "arcface"
    conf = json.loads((trained / "config.json").read_text())
    assert conf["steps"] == log[-1]["step"] and conf["model"]["backbone"] == "test_resnet"
    loaded = ckpt.load_model(trained)
    assert loaded.fingerprint == meta["fingerprint"]
    x = loaded.preprocess(np.zeros((30, 40, 3), np.uint8)).unsqueeze(0)
    with torch.no_grad():
        assert loaded.model.embed(x).shape == (1, 64)


def test_training_learns(trained: Path) -> None:
    """Both, not either: the loss falls clearly (4.28 -> 1.43 with this seed) and validation does not get worse
    (7 queries: GAP 0.857 before training already)."""
    log = read_log(trained)
    assert log[-1]["train_loss"] < 0.6 * log[1]["train_loss"]
    assert log[-1]["val_gap"] >= log[0]["val_gap"] and log[-1]["val_top1"] >= log[0]["val_top1"]


def test_same_seed_same_weights(trained: Path, shapes: Path, tmp_path: Path) -> None:
    train(tiny(eval_at_start=True), shapes, tmp_path / "again")  # type: ignore[arg-type]
    a, b = (
        load_file(str(trained / "model.safetensors")),
        load_file(str(tmp_path / "again" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_existing_run_needs_resume(trained: Path, shapes: Path) -> None:
    with pytest.raises(LandmarksError, match="--resume"):
        train(tiny(), shapes, trained)  # type: ignore[arg-type]
    # Resuming a finished run does nothing more.
    result = train(tiny(), shapes, trained, resume=True)  # type: ignore[arg-type]
    assert result.steps == read_log(trained)[-1]["step"]


def test_strict_config() -> None:
    with pytest.raises(ConfigError):
        make_config("tiny", {"optim": {"lr_typo": 1}})
    with pytest.raises(ConfigError):
        make_config("no-such-preset")


# --- kill -9 and resume ----------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "landmarks", "-q", "train", *args]


def test_resume_after_sigkill_mid_epoch(shapes: Path, tmp_path: Path) -> None:
    common = [
        "--data",
        str(shapes),
        "--preset",
        "tiny",
        "--threads",
        "1",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--image-size",
        "48",
        "data.val_fraction=0.15",
    ]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _cli("--out", str(out), *common, "checkpoint_every_steps=1"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    state_json = out / "train_state.json"
    killed_at = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if state_json.exists():
                try:
                    st = json.loads(state_json.read_text())
                except json.JSONDecodeError:
                    st = {}
                spe = st.get("total_steps", 15) // 3
                if st.get("step", 0) > spe and st["step"] % spe:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = st["step"]
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL
    before = json.loads(state_json.read_text())["step"]
    assert before % (before and json.loads(state_json.read_text())["total_steps"] // 3)  # mid-epoch
    res = subprocess.run(
        _cli("--out", str(out), "--resume", "--threads", "1"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    total = json.loads(state_json.read_text())["total_steps"]
    assert summary["steps"] == total == json.loads((out / "config.json").read_text())["steps"]
    # ... and with the same weights as a run that was never interrupted (same config, one thread).
    ref = tmp_path / "reference"
    conf = make_config(
        "tiny", {"epochs": 3, "batch_size": 8, "data": {"image_size": 48, "val_fraction": 0.15}}
    )
    assert train(conf, shapes, ref).steps == total
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [r["epoch"] for r in read_log(out)] == [1, 2, 3]


# --- stages: higher resolution from a checkpoint, local head ----------------------------------------------


def test_second_stage_keeps_head(trained: Path, shapes: Path, tmp_path: Path) -> None:
    seen = {}

    def grab(tr: Trainer) -> None:
        seen["head"] = tr.net.head.weight.detach().clone()

    conf = tiny(init=str(trained), epochs=1, data={"image_size": 64})
    train(conf, shapes, tmp_path / "stage2", on_trainer=grab)  # type: ignore[arg-type]
    first = load_file(str(trained / "model.safetensors"))
    torch.testing.assert_close(seen["head"], first["head.weight"])
    meta = json.loads((tmp_path / "stage2" / "meta.json").read_text())
    assert meta["preprocessing"]["image_size"] == 64
    assert [c["landmark"] for c in meta["classes"]] == [
        c["landmark"] for c in ckpt.read_meta(trained)["classes"]
    ]


def test_local_only_stage_freezes_global_model(trained: Path, shapes: Path, tmp_path: Path) -> None:
    conf = tiny(init=str(trained), local_only=True, epochs=1)
    train(conf, shapes, tmp_path / "local")  # type: ignore[arg-type]
    before = load_file(str(trained / "model.safetensors"))
    after = load_file(str(tmp_path / "local" / "model.safetensors"))
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)  # backbone, BN stats, neck, head
    assert any(k.startswith("local.") for k in after)
    log = read_log(tmp_path / "local")
    assert "train_local_loss" in log[-1] and "val_local_acc" in log[-1] and "train_loss" not in log[-1]
    loaded = ckpt.load_model(tmp_path / "local")
    assert loaded.model.has_local_head
    assert loaded.meta["local"]["receptive_field"] == list(loaded.model.local_receptive_field)
    with torch.no_grad():
        att, desc = loaded.model.local_features(torch.randn(1, 3, 64, 64))
    assert att.shape == (1, 4, 4) and desc.shape == (1, 128, 4, 4)


def test_joint_local_training(shapes: Path, tmp_path: Path) -> None:
    conf = tiny(epochs=1, model={"local": {"enabled": True}})
    res = train(conf, shapes, tmp_path / "joint")  # type: ignore[arg-type]
    row = res.metrics
    assert {"train_loss", "train_local_loss", "train_recon", "val_gap", "val_local_acc"} <= set(row)
    assert ckpt.load_model(tmp_path / "joint").model.has_local_head


@pytest.mark.slow
def test_time_budget(shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The schedule is sized from the rates the trainer measured: checked on its own arithmetic, not a stopwatch."""
    budget_s = 0.4 * 60
    with caplog.at_level(logging.INFO, logger="landmarks"):
        res = train(tiny(), shapes, tmp_path / "budget", time_budget_min=0.4)  # type: ignore[arg-type]
    conf = json.loads((tmp_path / "budget" / "config.json").read_text())
    assert conf["time_budget_min"] == 0.4 and conf["steps"] == res.steps >= 1
    log = read_log(tmp_path / "budget")
    assert log[-1]["step"] == res.steps
    plan = re.search(r"time budget 0\.4 min: ([0-9.]+) s/step, .* (\d+) steps planned", caplog.text)
    assert plan, caplog.text
    step_s, planned = float(plan.group(1)), int(plan.group(2))
    assert 1 <= planned and planned * step_s <= budget_s  # the plan fits the budget at the measured rate


def test_cli_config_resolution(tmp_path: Path) -> None:
    import argparse

    from landmarks.commands import train as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)

    def resolve(*argv: str) -> object:
        return cmd.resolve_config(parser.parse_args(["--out", str(tmp_path / "r"), *argv]))

    conf = resolve(
        "--preset",
        "tiny",
        "--epochs",
        "3",
        "--image-size",
        "80",
        "--lr",
        "0.01",
        "optim.grad_clip=2",
        "model.head.subcenters=3",
    )
    assert (conf.epochs, conf.data.image_size, conf.optim.lr) == (3, 80, 0.01)  # type: ignore[attr-defined]
    assert conf.optim.grad_clip == 2.0 and conf.model.head.subcenters == 3  # type: ignore[attr-defined]
    assert resolve().preset == "cpu"  # type: ignore[attr-defined]
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"epochs": 7, "model": {"backbone": "test_resnet"}}))
    conf = resolve("--config", str(saved))
    assert conf.epochs == 7 and conf.model.backbone == "test_resnet"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError):
        resolve("model.head.no_such_key=1")
    with pytest.raises(ConfigError):
        resolve("--local-only")
    assert resolve("--local").model.local.enabled  # type: ignore[attr-defined]
