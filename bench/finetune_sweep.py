"""Fine-tuning recipes for the ``cpu`` preset, compared at the step counts a 5-minute CPU budget buys.

Each recipe fine-tunes EfficientNet-Lite0 (``pypi:lite0``) on the index images of a ``bench/realworld.py``
split for a fixed number of optimizer steps, chosen per recipe from its CPU throughput (img/s on 2 idle
cores at batch 32, ``README``: 10 everything trained, 52 feature levels 1-4 frozen, 85 all frozen) x ~200 s
of training x 0.6 for a shared CPU. Then: kNN (k = 3) of the landmark queries against the index images,
GAP over the landmark queries, top-1, and top-1 on the web photos of world landmarks. The baselines embed
with the pretrained backbone + GeM (p = 3) and no training. Run it where steps are cheap (a GPU: the
whole grid takes ~5 minutes) since only the step count matters for the comparison:

    python bench/finetune_sweep.py --work /tmp/landmarks-realworld --device cuda:0 --out /tmp/sweep.json

``--downsize PX`` first writes copies of the images at most PX on a side (what the published run used, 400,
to carry the images to the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def lite0(
    size: int = 224,
    lv: int = 4,
    fbn: bool = True,
    ho: float = 0.1,
    lr: float = 1e-4,
    mult: float = 10.0,
    head: str = "arcface",
    m: float = 0.2,
) -> dict[str, Any]:
    """One recipe as TrainConfig overrides."""
    h: dict[str, Any] = {"kind": head, "scale": 30.0} | ({"margin_rad": m} if head == "arcface" else {})
    return {
        "model": {
            "backbone": "tf_efficientnet_lite0",
            "pretrained": "pypi:lite0",
            "embedding_dim": 512,
            "head": h,
        },
        "data": {"image_size": size},
        "batch_size": 32,
        "amp": "auto",
        "seed": 0,
        "finetune": {"frozen_levels": lv, "freeze_bn": fbn, "head_only_fraction": ho},
        "optim": {
            "name": "adamw",
            "lr": lr,
            "head_lr_mult": mult,
            "weight_decay": 1e-4,
            "warmup_fraction": 0.05,
        },
    }


GRID = [  # (name, overrides, steps)
    ("levels 1-4 frozen, BN frozen, lr 1e-4, ArcFace", lite0(), 190),
    ("same, cosine-softmax head", lite0(head="softmax"), 190),
    ("same, lr 3e-4", lite0(lr=3e-4), 190),
    ("same, BN statistics updated", lite0(fbn=False), 190),
    ("all levels frozen (neck + head only)", lite0(lv=5, ho=0.0), 310),
    ("levels 1-3 frozen", lite0(lv=3), 130),
    ("everything trained", lite0(lv=0), 38),
    ("levels 1-4 frozen, neck/head x30", lite0(mult=30.0), 190),
    ("levels 1-4 frozen, 256 px", lite0(256), 145),
    ("levels 1-4 frozen, 600 steps (3x the budget)", lite0(), 600),
    ("levels 1-4 frozen, no head-only phase", lite0(ho=0.0), 190),
    ("levels 1-4 frozen, ArcFace m = 0.3", lite0(m=0.3), 190),
]


def main(argv: list[str] | None = None) -> int:
    """Run the grid; print a markdown table and write ``--out`` (JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a bench/realworld.py work folder (split.json)")
    ap.add_argument("--device", default="cpu", help="torch device (a GPU: only step counts matter here)")
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument(
        "--downsize", type=int, default=0, help="copy the images at most this many px first (0: no)"
    )
    args = ap.parse_args(argv)

    from PIL import Image, ImageOps

    from landmarks.data.decode import decode_image
    from landmarks.data.transforms import Preprocess
    from landmarks.extract import embed_images, load_embedder
    from landmarks.metrics import global_average_precision
    from landmarks.models.backbone import Backbone
    from landmarks.models.pooling import GeM
    from landmarks.train import knn_predict, make_config, train

    split = json.loads((args.work / "split.json").read_text(encoding="utf-8"))
    data = args.work / "sweep"
    index: list[tuple[Path, str]] = []
    for it in split["index"]:
        lm, name = it["id"].split("/", 1)
        dst = data / "index" / lm / f"{name}.jpg"
        if not dst.exists():
            im = ImageOps.exif_transpose(Image.open(it["path"])).convert("RGB")
            if args.downsize:
                im.thumbnail((args.downsize, args.downsize), Image.BICUBIC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            im.save(dst, quality=90)
        index.append((dst, lm))
    queries = [
        (Path(q["path"]), q["landmark"], q["collection"], q["id"]) for q in split["queries"] if q["landmark"]
    ]
    classes = sorted({lm for _, lm in index})
    cid = {c: i for i, c in enumerate(classes)}
    imgs_i = [decode_image(p) for p, _ in index]
    imgs_q = [decode_image(p) for p, *_ in queries]
    if args.downsize:
        imgs_q = [
            np.asarray(
                Image.fromarray(a).resize(
                    (
                        max(1, a.shape[1] * args.downsize // max(a.shape[:2])),
                        max(1, a.shape[0] * args.downsize // max(a.shape[:2])),
                    )
                )
                if max(a.shape[:2]) > args.downsize
                else Image.fromarray(a)
            )
            for a in imgs_q
        ]
    results: dict[str, Any] = {}

    def score(xb: np.ndarray, xq: np.ndarray, name: str, extra: dict[str, Any]) -> None:
        lab, sc = knn_predict(xq, xb, np.array([cid[lm] for _, lm in index]), k=3)
        pred = {q[3]: (classes[label], float(s)) for q, label, s in zip(queries, lab, sc)}
        sol = {q[3]: [q[1]] for q in queries}
        ok = [pred[q[3]][0] == q[1] for q in queries]
        web = [o for o, q in zip(ok, queries) if q[2] == "landmarks13_web"]
        results[name] = {
            "gap_lq": global_average_precision(pred, sol),
            "top1": float(np.mean(ok)),
            "web_top1": float(np.mean(web)) if web else None,
            **extra,
        }
        print(name, json.dumps(results[name]), flush=True)
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")

    for size in (224, 256):
        b = Backbone("tf_efficientnet_lite0", "pypi:lite0").to(args.device).eval()
        gem = GeM(3.0, learnable=False)
        dc = b.data_config()
        pre = Preprocess(size, tuple(dc["mean"]), tuple(dc["std"]))

        def emb(ims: list[np.ndarray], b: Backbone = b, pre: Preprocess = pre, gem: GeM = gem) -> np.ndarray:
            out = []
            with torch.inference_mode():
                for s in range(0, len(ims), 64):
                    x = torch.stack([pre(i) for i in ims[s : s + 64]]).to(args.device)
                    out.append(torch.nn.functional.normalize(gem(b(x)).float(), dim=1).cpu())
            return torch.cat(out).numpy()

        score(emb(imgs_i), emb(imgs_q), f"no training, {size} px", {"steps": 0})
    for name, over, steps in GRID:
        out = args.work / "sweep-runs" / str(len(results))
        conf = make_config(None, over)
        conf.steps, conf.eval_every_epochs = steps, 1000
        t = time.perf_counter()
        train(conf, str(data / "index"), out, device=args.device)
        e = load_embedder(out, args.device)
        score(
            embed_images(e, imgs_i),
            embed_images(e, imgs_q),
            name,
            {"steps": steps, "train_s": round(time.perf_counter() - t, 1)},
        )
    print("| recipe | steps | GAP (landmark queries) | top-1 | web photos top-1 |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['steps']} | {100 * r['gap_lq']:.1f} | {100 * r['top1']:.1f} | "
            f"{100 * (r['web_top1'] or 0):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
