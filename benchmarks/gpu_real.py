"""GPU run on real images: one branch and the segmenter trained within a global deadline, then
scored on held-out images per cell type.

On a Kaggle-layout root (``--data``; default: the repository's real fixtures,
``tests/fixtures/sartorius_real``, 6 annotated images):

* splits the annotated images 80/10/10 (``train.val_fraction=0.1``,
  ``train.holdout_fraction=0.1``: :func:`cellmask.training.split.competition_split`, grouped by
  sample and stratified by cell type; on a root with few sample groups the fractions grow, as
  there: the fixtures give 4 / 1 / 1);
* trains Faster R-CNN Swin-T (``configs/faster_rcnn_swin_t.yaml``), then the segmenter
  (``configs/segmenter_upernet_swin_t.yaml``), each with
  :func:`cellmask.training.command.run_training` (``--profile``, paper on CUDA: AMP on; random
  init unless ``--pretrained``) for its share of the budget (``train.max_hours``: the run stops
  after the step that passes it, validated and saved). Validation is bounded: the first
  ``--val-images`` images of the val fold (4), and its time counts in the budget. On a small root
  the training images are repeated so that an epoch has ``--min-epoch-steps`` steps (50):
  otherwise the epochs' checkpoints and validations would take most of the time. Epoch
  checkpoints (``epoch_XXX.pt``) are written only where a run stops (``last.pt`` and ``best.pt``
  as always);
* scores that branch + the segmenter (:class:`cellmask.predict.Predictor`, flip TTA + WBF, the
  default predict options) on the first ``--holdout-images`` held-out images (8), image by image,
  with the competition metric: the score overall and per cell type.

Per model: steps done, epochs, why it stopped, s/step (from the loader's side: the time from one
batch handed out to the next asked for, GPU synchronised, within an epoch: the steps themselves,
without validation or checkpoints; the first step apart), the time waiting for data, the
validation time, the peak accelerator memory (``torch.cuda.max_memory_allocated``; CPU: the
process's peak RSS), the AMP dtype, the first and last loss and whether every loss was finite.

**Deadline.** ``--minutes`` (default 4.5; 0.75 with the smoke profile) is the whole run's budget,
counted from the start: the scoring keeps ``--score-reserve`` (20%) of it; of the rest the branch
trains for ``--branch-share`` (55%) and the segmenter for what is left, each ``train.max_hours``
set to 75% of its share (its model build, the validation of the cut epoch and the checkpoints
take the rest). A model whose turn comes with less than 3 s left is skipped; the scoring stops
between images at the deadline. What was skipped is listed in the JSON (``skipped``, reason
``time``).

**Written as it goes.** ``OUT/gpu_real.json`` is rewritten after every item (the split, each
model, each held-out image) to a temporary file renamed over it, so a run cut at any moment
leaves a valid JSON with every figure measured so far; one progress line per item, also in
``OUT/gpu_real.log``. ``OUT``: ``--out``, else ``$OUT``, else ``benchmarks/gpu/``; the runs go to
``--work`` (default ``build/gpu_real``), the scoring needs no files.

    python benchmarks/gpu_real.py [--data ROOT] [--minutes 4.5] [--out DIR]        # a CUDA machine
    python benchmarks/gpu_real.py --smoke                                         # the code paths

``benchmarks/gpu_real.sh`` installs what is needed first and runs it under a backstop timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gpu_common as common

Deadline, Record, Stopped = common.Deadline, common.Record, common.Stopped
data_root, finite_or_none = common.data_root, common.finite_or_none

ROOT = common.ROOT
CONFIGS = ROOT / "configs"
BRANCH = "faster_rcnn_swin_t"
SEGMENTER = "segmenter_upernet_swin_t"
SPLIT = ["train.val_fraction=0.1", "train.holdout_fraction=0.1"]
DEFAULT_MINUTES = 4.5
MIN_TRAIN_S = 3.0
IMPORTS = [
    "cellmask.training.command",
    "cellmask.training.split",
    "cellmask.training.validation",
    "cellmask.engine",
    "cellmask.models",
    "cellmask.predict",
    "cellmask.metric",
    "segmentation_models_pytorch",
    "ensemble_boxes",
]


class StepClock:
    """A training loader that times the steps from its side: the time from one batch handed out
    to the next asked for (the device synchronised first), within one pass; the time spent
    waiting for each batch apart. Everything else is the wrapped loader's (``len``, samplers,
    ``batch_size``: :func:`cellmask.engine.set_loader_epoch` finds them)."""

    def __init__(self, loader: Any, device: Any, steps: list[float], waits: list[float]) -> None:
        self.loader, self.device, self.steps, self.waits = loader, device, steps, waits

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        batches, handed = iter(self.loader), None
        while True:
            if handed is not None:  # the step on the batch handed out last is done
                common.sync(self.device)
                self.steps.append(time.perf_counter() - handed)
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            handed = time.perf_counter()
            self.waits.append(handed - asked)
            yield batch


@contextlib.contextmanager
def instrumented(args: argparse.Namespace, device: Any, figures: dict[str, Any]) -> Iterator[None]:
    """While active, the parts ``cellmask train`` builds are: the training images repeated up to
    ``--min-epoch-steps`` steps an epoch, the first ``--val-images`` validation images, the loader
    timed (:class:`StepClock`) and every validation timed; ``figures`` receives ``step_s``,
    ``wait_s``, ``val_s`` (lists), ``repeat``, ``train_images`` and ``val_images``."""
    import cellmask.training.command as command

    original = command.parts_builder
    for key in ("step_s", "wait_s", "val_s"):
        figures[key] = []

    def builder(cfg: dict[str, Any]) -> Any:
        build = original(cfg)

        def parts(cfg: dict[str, Any], train_records: list, val_records: list, *rest: Any) -> Any:
            batch, n = int(cfg["train"]["batch_size"]), max(len(train_records), 1)
            small = math.ceil(n / batch) < args.min_epoch_steps
            repeat = math.ceil(args.min_epoch_steps * batch / n) if small else 1
            val_records = list(val_records)[: args.val_images]
            figures.update(repeat=repeat, train_images=len(train_records), val_images=len(val_records))
            model, loader, val_fn = build(cfg, list(train_records) * repeat, val_records, *rest)
            loader = StepClock(loader, device, figures["step_s"], figures["wait_s"])
            if val_fn is None:
                return model, loader, None

            def timed(m: Any, epoch: int, info: Any) -> Any:
                start = time.perf_counter()
                try:
                    return val_fn(m, epoch, info)
                finally:
                    figures["val_s"].append(time.perf_counter() - start)

            return model, loader, timed

        return parts

    command.parts_builder = builder
    try:
        yield
    finally:
        command.parts_builder = original


def load(name: str, args: argparse.Namespace, profile: str, seconds: float | None = None) -> dict[str, Any]:
    """The config ``name`` under ``profile`` with the split, a budget of ``seconds``, epoch
    checkpoints only where the run stops, and ``--set`` applied."""
    from cellmask.config import load_config

    overrides = [*SPLIT, "train.checkpoint_every=0"]
    if seconds is not None:  # 1e-05 (no dot) would be a YAML string
        overrides.append(f"train.max_hours={seconds / 3600:.9e}")
    if not args.pretrained:
        overrides.append("model.backbone.pretrained=false")
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    return load_config(CONFIGS / f"{name}.yaml", profile=profile, overrides=[*overrides, *args.overrides])


def train(
    name: str, root: Path, runs: Path, device: Any, args: argparse.Namespace, profile: str, seconds: float
) -> dict[str, Any]:
    """Train ``name`` for a budget of ``seconds`` (``train.max_hours``); its figures."""
    from cellmask.engine.history import read_rows_csv
    from cellmask.engine.memory import reset_peak
    from cellmask.training.command import run_training

    cfg = load(name, args, profile, seconds)
    out_dir = runs / name
    if out_dir.exists():  # this script's own run of an earlier call: a fresh run, fresh logs
        shutil.rmtree(out_dir)
    figures: dict[str, Any] = {}
    reset_peak(device)
    start = time.perf_counter()
    with instrumented(args, device, figures):
        result = run_training(cfg, root, "sartorius", out_dir, device=device.type)
    wall = time.perf_counter() - start
    steps = [r for r in read_rows_csv(out_dir / "steps.csv") if r["rank"] == "0"]
    losses = [float(r["loss"]) for r in steps if r["skipped"] == "0"]
    step_s, wait_s = figures["step_s"], figures["wait_s"]
    later = step_s[1:] or step_s  # the first step pays the warm-up
    best = result.get("best")
    amp, amp_dtype, scaler = common.amp_settings(cfg["train"], device, tune=False)
    return {
        "model": name,
        "run_dir": str(out_dir),
        "steps": len(steps),
        "epochs": len(result["history"]),
        "stopped": result.get("stopped"),
        "budget_s": seconds,
        "s_per_step": sum(later) / len(later) if later else math.nan,
        "steps_per_s": len(later) / sum(later) if later and sum(later) > 0 else math.nan,
        "first_step_s": step_s[0] if step_s else math.nan,
        "timed_steps": len(step_s),
        "wait_s_per_step": sum(wait_s) / len(wait_s) if wait_s else math.nan,
        "val_s": sum(figures["val_s"]),
        "validations": len(figures["val_s"]),
        "val_images": figures.get("val_images"),
        "train_images": figures.get("train_images"),
        "repeat": figures.get("repeat"),
        "wall_s": wall,
        **common.memory_figures(device),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "skipped_steps": sum(r["skipped"] != "0" for r in steps),
        "finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "best": dict(best) if best else None,
        "batch": int(cfg["train"]["batch_size"]),
        "amp": amp,
        "amp_dtype": amp_dtype,
        "grad_scaler": scaler,
    }


def score(
    holdout: list, runs: Path, device: Any, args: argparse.Namespace, record: Record, deadline: Deadline
) -> None:
    """The branch + segmenter on the first ``--holdout-images`` held-out images, one at a time
    (none started after the deadline but the first); ``record["holdout"]`` holds the metric's
    report of the images done so far, saved after each."""
    from cellmask.engine.memory import reset_peak
    from cellmask.metric import score_submission
    from cellmask.predict import Predictor

    records = holdout[: args.holdout_images]
    reset_peak(device)
    start = time.perf_counter()
    predictor = Predictor.from_runs([runs / BRANCH], runs / SEGMENTER, device=device.type)
    load_s = time.perf_counter() - start
    preds: dict[str, list[str]] = {}
    done, seconds = [], []
    for rec in records:
        if done and deadline.passed():
            record.skip(
                "holdout scoring",
                "time",
                f"deadline reached: {len(records) - len(done)} of {len(records)} held-out images not scored",
            )
            return
        begin = time.perf_counter()
        preds.update(predictor.predict_records([rec], progress=False))
        common.sync(device)
        seconds.append(time.perf_counter() - begin)
        done.append(rec)
        report = score_submission(done, preds).to_dict()
        later = seconds[1:] or seconds
        record.data["holdout"] = {
            **report,
            "images": [r.image_id for r in done],
            "cell_types": [r.cell_type for r in done],
            "instances": {k: len(v) for k, v in preds.items()},
            "images_planned": len(records),
            "holdout_images": len(holdout),
            "load_s": load_s,
            "first_image_s": seconds[0],
            "s_per_image": sum(later) / len(later),
            **common.memory_figures(device),
        }
        record.save()
        record.progress(
            f"held-out image {len(done)}/{len(records)} {rec.image_id} ({rec.cell_type}): "
            f"{seconds[-1]:.2f} s, {len(preds[rec.image_id])} instances; score so far {report['score']:.4f}"
        )


def run(
    args: argparse.Namespace,
    root: Path,
    work: Path,
    device: Any,
    profile: str,
    record: Record,
    deadline: Deadline,
) -> None:
    """The split, the two trainings, the scoring (the module docstring gives the budget)."""
    from cellmask.training.split import competition_split

    record.data["import_s"] = common.preload(IMPORTS)
    validation = sys.modules["cellmask.training.validation"]
    if hasattr(validation, "default_backend"):
        record.data["coco_eval"] = validation.default_backend()
    split = competition_split(load(BRANCH, args, profile), root)
    record.data["split"] = {k: len(v) for k, v in split._asdict().items()}
    record.save()
    record.progress(f"split {record.data['split']} of {root}")
    runs = work / "runs"
    score_until = deadline.at - args.score_reserve * deadline.seconds
    for name, share in ((BRANCH, args.branch_share), (SEGMENTER, 1.0)):
        left = deadline.left(score_until)
        if left < MIN_TRAIN_S:
            record.skip(
                name, "time", f"{max(left, 0):.1f} s left before the scoring's reserve (< {MIN_TRAIN_S:g} s)"
            )
            continue
        try:
            row = train(name, root, runs, device, args, profile, 0.75 * share * left)
        except Exception as exc:
            record.error(name, exc)
            common.free_memory(device)
            continue
        record.data["train"].append(row)
        record.save()
        common.free_memory(device)
        record.progress(
            f"{name}: {row['steps']} steps in {row['epochs']} epoch(s) (budget {row['budget_s']:.0f} s, stopped: "
            f"{row['stopped']}), {row['s_per_step']:.3f} s/step after a first of {row['first_step_s']:.2f} s, "
            f"data wait {row['wait_s_per_step']:.3f} s/step, {row['validations']} validation(s) of "
            f"{row['val_images']} image(s) {row['val_s']:.1f} s, peak {row['peak_gb']:.2f} GB, "
            f"amp {row['amp_dtype'] or 'off'}, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f} "
            f"({'finite' if row['finite'] else 'NON-FINITE'}), wall {row['wall_s']:.0f} s"
        )
    if not all((runs / m / "best.pt").is_file() for m in (BRANCH, SEGMENTER)):
        trained = {r["model"] for r in record.data["train"]}
        missing = [m for m in (BRANCH, SEGMENTER) if m not in trained]
        record.skip("holdout scoring", "missing runs", f"not trained: {', '.join(missing) or '?'}")
        return
    if not split.holdout:
        record.skip("holdout scoring", "no images", f"{root}: the held-out split is empty")
        return
    if deadline.passed():
        record.skip("holdout scoring", "time", "the deadline passed before the scoring's turn")
        return
    try:
        score(list(split.holdout), runs, device, args, record, deadline)
    except Exception as exc:
        record.error("holdout scoring", exc)
        return
    holdout = record.data.get("holdout")
    if holdout:
        classes = ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.4f}'} ({holdout['class_counts'].get(k, 0)})"
            for k, v in holdout["per_class"].items()
        )
        record.progress(
            f"holdout score {holdout['score']:.4f} over {holdout['n_images']} image(s) ({classes}); "
            f"{holdout['s_per_image']:.2f} s/image, peak {holdout['peak_gb']:.2f} GB"
        )


def main(argv: list[str] | None = None) -> int:
    began = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, DEFAULT_MINUTES, "gpu_real")
    parser.add_argument(
        "--pretrained", action="store_true", help="keep the configs' ImageNet weights (downloads)"
    )
    parser.add_argument("--val-images", type=int, default=4, help="validation images per validation")
    parser.add_argument("--holdout-images", type=int, default=8, help="held-out images scored at most")
    parser.add_argument(
        "--min-epoch-steps", type=int, default=50, help="repeat a small training set up to this"
    )
    parser.add_argument("--score-reserve", type=float, default=0.2, help="budget fraction kept for scoring")
    parser.add_argument("--branch-share", type=float, default=0.55, help="the branch's share of training")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (both models)",
    )
    args = parser.parse_args(argv)
    device, profile, mode = common.resolve_run(args, DEFAULT_MINUTES)
    deadline = Deadline(args.minutes * 60, start=began)
    root = data_root(args.data)
    out = Path(args.out) if args.out else common.default_out()
    work = Path(args.work)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    record = Record(
        out / "gpu_real.json",
        deadline,
        script="gpu_real",
        device=common.device_info(device),
        profile=profile,
        mode=mode,
        data=str(root),
        work=str(work),
        args=vars(args),
        split=None,
        train=[],
        holdout=None,
    )
    record.progress(
        f"gpu_real: {record.data['device']['name']}, {mode}; {args.minutes:g} min; JSON {record.path}"
    )
    with common.stop_on_signals():
        try:
            run(args, root, work, device, profile, record, deadline)
        except ImportError as exc:
            record.error("imports", exc)
        except Stopped as stop:
            record.finish(f"interrupted: {stop}")
            return 124
        except Exception as exc:  # the split: nothing else can run
            record.error("split", exc)
    record.finish(record.final_status())
    holdout = record.data.get("holdout") or {}
    bad = record.data["errors"] or not all(r["finite"] for r in record.data["train"])
    return 1 if bad or (holdout and holdout.get("score") is None) else 0


if __name__ == "__main__":
    sys.exit(main())
