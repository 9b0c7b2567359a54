"""Soft Teacher vs supervised-only training: few labeled, many unlabeled synthetic images.

Both arms start from the same detector (the same start, as Soft Teacher starts from a
LIVECell-pretrained Faster R-CNN in the paper): a Faster R-CNN ResNeXt-101 (demo profile of
``configs/soft_teacher_resnext101.yaml``, ``type: faster_rcnn``) trained supervised on the
labeled images for ``--warm-steps`` steps (AdamW, the demo recipe). From it, for ``--steps``
steps each, with the same optimiser and schedule (the config's SGD):

* **supervised**: the detector on the labeled images alone (one labeled image per step);
* **soft teacher**: student + EMA teacher, one labeled + one unlabeled image per step
  (``cellmask.training.soft_teacher.soft_teacher_parts``: the real loader, views and model).

Printed: box AP and AP50 on held-out labeled images (the supervised detector; Soft Teacher's
teacher, the inference model, and its student) every ``--eval-every`` steps, and each arm's
time per step. Written into ``--out``: ``curves.png`` (AP50 and Soft Teacher's pseudo-label
statistics against the step), ``pseudo_boxes.png`` (the final teacher's pseudo-boxes on
unlabeled images) and ``results.json``.

    python benchmarks/bench_soft_teacher.py [--labeled 8] [--unlabeled 32] [--val 16]
        [--warm-steps 500] [--steps 150] [--eval-every 50] [--threads 1] [--out runs/bench_soft_teacher]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "soft_teacher_resnext101.yaml"
NUM_CLASSES = 4


def _loss(out: dict) -> Any:
    return sum(v for k, v in out.items() if k.startswith("loss"))


def _batches(loader, seed: int):
    """Endless batches of a loader made by ``build_train_loader``, re-seeded per epoch."""
    from cellmask.engine import set_loader_epoch

    epoch = 0
    while True:
        set_loader_epoch(loader, epoch, seed)
        yield from loader
        epoch += 1


def _train(model, loader, cfg: dict, steps: int, on_step, evaluate, eval_every: int, seed: int) -> dict:
    """``steps`` optimiser steps (the engine's optimiser, schedule and gradient clip; the EMA
    hook after each step, as the engine calls it); returns the mean step time (the first step
    left out), the evaluations and the per-step statistics."""
    import torch
    from tqdm.auto import tqdm

    from cellmask.engine import build_optimizer, build_scheduler, train_config

    tcfg = train_config(cfg)
    optimizer = build_optimizer(cfg, model)
    # the config's schedule compressed to the step budget: its epochs become steps / epochs each
    epochs = int(tcfg["epochs"])
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=max(steps // epochs, 1), epochs=epochs)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    times, stats, evals = [], [], [evaluate(model, 0)]
    batches = _batches(loader, seed)
    for it in tqdm(range(steps), desc="train", leave=False):
        batch = next(batches)
        start = time.perf_counter()
        out = on_step(model, batch)
        loss = _loss(out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(tcfg["grad_clip"]))
        optimizer.step()
        scheduler.step()
        if hasattr(model, "on_optimizer_step"):
            model.on_optimizer_step(it)
        times.append(time.perf_counter() - start)
        stats.append(
            {k: float(v) for k, v in out.items() if not k.startswith("loss")} | {"loss": float(loss.detach())}
        )
        if (it + 1) % eval_every == 0 or it + 1 == steps:
            evals.append(evaluate(model, it + 1))
            model.train()
    warm = times[1:] or times
    return {"step_s": sum(warm) / len(warm), "evals": evals, "stats": stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labeled", type=int, default=8, help="labeled training images")
    p.add_argument("--unlabeled", type=int, default=32, help="unlabeled images")
    p.add_argument("--val", type=int, default=16, help="held-out labeled images (box AP)")
    p.add_argument("--warm-steps", type=int, default=500, help="supervised steps of the shared start")
    p.add_argument("--steps", type=int, default=150, help="steps of each arm after the start")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--size", default="256x352", help="synthetic image size HxW (the demo size)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_soft_teacher"))
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a value of the demo config, e.g. --set semi.pseudo.score_thresh=0.7",
    )  # fmt: skip
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from cellmask.config import deep_merge, load_config
    from cellmask.data import synthetic
    from cellmask.data.datasets import DetectionDataset, UnlabeledDataset, collate
    from cellmask.data.images import read_image
    from cellmask.data.sartorius import read_train_csv
    from cellmask.data.semi import load_unlabeled
    from cellmask.data.transforms import build_transforms
    from cellmask.engine import DistInfo, build_eval_loader, build_train_loader, seed_everything
    from cellmask.models import build_detector
    from cellmask.models.soft_teacher.figure import pseudo_boxes, save_pseudo_box_figure
    from cellmask.training.soft_teacher import soft_teacher_parts
    from cellmask.training.validation import evaluate_detector

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    height, width = synthetic.parse_size(args.size)
    data = out / "data"
    synthetic.write_dataset(
        data, n_train=args.labeled + args.val, n_unlabeled=args.unlabeled, n_test=0, n_livecell=0,
        seed=args.seed, size=(height, width),
    )  # fmt: skip
    records = read_train_csv(data / "train.csv")
    train_records, val_records = records[: args.labeled], records[args.labeled :]
    overrides = ["train.progress=false", f"train.seed={args.seed}", *args.overrides]
    cfg = load_config(CONFIG, profile="demo", overrides=overrides)
    cfg["data"] = {"root": str(data), "num_classes": NUM_CLASSES}
    cfg["run"] = {"out_dir": str(out)}
    info = DistInfo()
    augment = cfg.get("augment") or {}
    val_loader = build_eval_loader(
        DetectionDataset(val_records, build_transforms(augment, train=False)), cfg, collate
    )

    def evaluate(model, step: int) -> dict:
        models = {"model": model}
        if hasattr(model, "inference_model"):
            models = {"teacher": model.inference_model(), "student": model.student}
        row = {"step": step}
        for name, m in models.items():
            ap = evaluate_detector(m, val_loader, "cpu", num_classes=NUM_CLASSES)
            row |= {f"{name}_AP": ap["AP"], f"{name}_AP50": ap["AP50"]}
        print(
            "  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        )
        return row

    labeled = DetectionDataset(train_records, build_transforms(augment, train=True))

    # the shared start: supervised Faster R-CNN, AdamW (the demo recipe of the other branches)
    print(f"start: supervised Faster R-CNN on {args.labeled} labeled images, {args.warm_steps} steps")
    plain_cfg = {**cfg, "model": {**cfg["model"], "type": "faster_rcnn"}}
    warm_cfg = deep_merge(
        plain_cfg,
        {
            "train": {
                "optimizer": "adamw",
                "lr": 1e-3,
                "weight_decay": 1e-2,
                "scheduler": "cosine",
                "batch_size": 1,
            }
        },
    )
    seed_everything(args.seed)
    start_model = build_detector(plain_cfg["model"], num_classes=NUM_CLASSES)
    cache = out / "start.pt"  # the shared start, reused by a later run with the same data and steps
    key = {k: getattr(args, k) for k in ("labeled", "unlabeled", "val", "warm_steps", "size", "seed")}
    cached = torch.load(cache, weights_only=True) if cache.is_file() else None
    if cached is not None and cached["key"] == key:
        start_model.load_state_dict(cached["model"])
        warm, warm_s = {"evals": [cached["eval"]]}, float(cached["seconds"])
        print(f"  (reused {cache})")
    else:
        loader = build_train_loader(labeled, warm_cfg, collate, info)
        t0 = time.perf_counter()
        warm = _train(
            start_model,
            loader,
            warm_cfg,
            args.warm_steps,
            lambda m, b: m(*b),
            evaluate,
            args.warm_steps,
            args.seed,
        )
        warm_s = time.perf_counter() - t0
        payload = {
            "key": key,
            "model": start_model.state_dict(),
            "eval": warm["evals"][-1],
            "seconds": warm_s,
        }
        torch.save(payload, cache)
    start_state = copy.deepcopy(start_model.state_dict())
    _score_histogram(start_model, UnlabeledDataset(load_unlabeled(data)[:8]), cfg)

    print(f"supervised only: {args.steps} steps, {cfg['train']['optimizer']} lr {cfg['train']['lr']}")
    seed_everything(args.seed + 1)
    baseline = build_detector(plain_cfg["model"], num_classes=NUM_CLASSES)
    baseline.load_state_dict(start_state)
    loader = build_train_loader(labeled, cfg, collate, info)
    sup = _train(baseline, loader, cfg, args.steps, lambda m, b: m(*b), evaluate, args.eval_every, args.seed)

    print(f"soft teacher: {args.steps} steps, + {args.unlabeled} unlabeled images")
    seed_everything(args.seed + 1)
    model, loader, _ = soft_teacher_parts(cfg, train_records, val_records, NUM_CLASSES, info)
    model.load_state_dict(model.map_init_state_dict(start_state))
    semi = _train(
        model, loader, cfg, args.steps, lambda m, b: m.training_step(b), evaluate, args.eval_every, args.seed
    )

    unl = load_unlabeled(data)[:4]
    images = [read_image(r.path) for r in unl]
    save_pseudo_box_figure(
        out / "pseudo_boxes.png", images, pseudo_boxes(model, images), [r.image_id for r in unl],
        title=f"teacher after {args.steps} Soft Teacher steps",
    )  # fmt: skip
    _plot(out / "curves.png", sup, semi, cfg)

    final_sup, final_semi = sup["evals"][-1], semi["evals"][-1]
    mean = {k: sum(s[k] for s in semi["stats"]) / len(semi["stats"]) for k in semi["stats"][0]}
    summary = {
        "args": vars(args),
        "start": warm["evals"][-1],
        "start_train_s": warm_s,
        "supervised": {"AP": final_sup["model_AP"], "AP50": final_sup["model_AP50"], "step_s": sup["step_s"]},
        "soft_teacher": {
            "teacher_AP": final_semi["teacher_AP"],
            "teacher_AP50": final_semi["teacher_AP50"],
            "student_AP": final_semi["student_AP"],
            "student_AP50": final_semi["student_AP50"],
            "step_s": semi["step_s"],
            "mean_stats": mean,
        },
        "curves": {"supervised": sup["evals"], "soft_teacher": semi["evals"]},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nstart (shared): AP {warm['evals'][-1]['model_AP']:.4f}, AP50 {warm['evals'][-1]['model_AP50']:.4f}"
        f"\nsupervised only: AP {final_sup['model_AP']:.4f}, AP50 {final_sup['model_AP50']:.4f}, "
        f"{sup['step_s']:.2f} s/step"
        f"\nsoft teacher (teacher): AP {final_semi['teacher_AP']:.4f}, AP50 {final_semi['teacher_AP50']:.4f}, "
        f"{semi['step_s']:.2f} s/step ({semi['step_s'] / sup['step_s']:.1f}x)"
        f"\nsoft teacher (student): AP {final_semi['student_AP']:.4f}, AP50 {final_semi['student_AP50']:.4f}"
        f"\nmean per step: {mean['pseudo_boxes_per_image']:.1f} pseudo-boxes per unlabeled image, "
        f"uncertainty filter kept {mean['uncertainty_kept_fraction']:.2f}, "
        f"sup loss {mean['sup_loss']:.3f}, unsup loss {mean['unsup_loss']:.3f}"
        f"\nfigures and results.json in {out}"
    )
    return 0


def _score_histogram(model, dataset, cfg: dict) -> None:
    """Print how many of the start model's detections per unlabeled image pass each threshold."""
    import torch

    model.eval()
    with torch.no_grad():
        scores = torch.cat([model([dataset[i][0]])[0]["scores"] for i in range(len(dataset))])
    n = max(len(dataset), 1)
    pseudo = cfg["semi"]["pseudo"]
    cuts = sorted({0.5, 0.7, 0.8, 0.9, float(pseudo["score_thresh"]), float(pseudo["reg_score_thresh"])})
    counts = ", ".join(f"{c:g}: {int((scores >= c).sum()) / n:.1f}" for c in cuts)
    print(f"  start model on unlabeled images, detections per image with score >= {counts}")


def _plot(path: Path, sup: dict, semi: dict, cfg: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(
        [e["step"] for e in sup["evals"]], [e["model_AP50"] for e in sup["evals"]], "o-", label="supervised"
    )
    for who, style in (("teacher", "s-"), ("student", "^--")):
        ax.plot(
            [e["step"] for e in semi["evals"]],
            [e[f"{who}_AP50"] for e in semi["evals"]],
            style,
            label=f"soft teacher: {who}",
        )
    ax.set_xlabel("step after the shared start")
    ax.set_ylabel("val box AP50")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    steps = range(1, len(semi["stats"]) + 1)
    for key in ("pseudo_boxes_per_image", "reg_boxes_per_image"):
        ax.plot(steps, [s[key] for s in semi["stats"]], label=key, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("boxes per unlabeled image")
    twin = ax.twinx()
    twin.plot(
        steps,
        [s["uncertainty_kept_fraction"] for s in semi["stats"]],
        color="gray",
        lw=0.6,
        label="kept fraction",
    )
    twin.set_ylabel("uncertainty filter: kept fraction")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"pseudo-labels (score >= {cfg['semi']['pseudo']['score_thresh']})", fontsize=9)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
