"""Benchmark: the segmentation module (UperNet Swin-T on 128x128 crops), inference speed and the
memory of a training step against the crops in it.

Paper profile (Swin-T + UperNet 512, random initialisation: speed and memory do not depend on
the weights).

Inference (forward only, ``torch.no_grad``, eval mode), as before:

1. crops/s of the network alone on a batch of ``--batch`` (64) random crops;
2. the time to segment every cell of the real fixture image ``de504eaa5349`` (496 shsy5y cells)
   from its truth boxes: crop (RoIAlign) + forward (in batches of ``--batch``) + paste, as
   ``Segmenter.predict`` does it, with the dense ``[496, 520, 704]`` bool output and with the
   compact per-box windows.

Each is timed ``--repeats`` times after ``--warmup`` untimed runs; the median and the best are
printed. The whole image is timed once by default (``--image-repeats``): on a CPU core it takes
minutes at the paper size.

Training step vs crops per step (``--train-crops``, default 32,64,128,256; the knob is
``crops.max_per_step``): each count runs in a fresh subprocess (so peaks do not mix) that builds
the model and AdamW, takes a 2-crop warm-up step (gradients and AdamW state exist from then
on), then one step of N random 128x128 crops (forward, BCE + Dice, backward, optimizer step),
in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the CPU's stand-in for
CUDA AMP: both keep activations in 16 bits). Printed per N: the process's peak RSS over its RSS
before the step (the step's activations and gradients: the baseline is the same process with
the model, its gradients and the optimizer state already in memory), and the time of the step.
A count whose predicted peak would take more than ``--memory-fraction`` (0.5) of the machine's
available memory is skipped, and said so (the machine is shared): the prediction comes from
the counts measured before it (before the first: 2 GB + 120 MB per crop, 70 under bf16).

From CPU RSS to GPU memory: the autograd graph saves the same tensors on either device, so
the per-crop slope of the step's peak is the GPU's activation memory per crop, bf16 for AMP
(fp16 has the same size). A GPU step then needs about ``16 B x parameters`` (float32 weights,
gradients, AdamW's two moments) plus ``N x slope``, plus the CUDA context and cuDNN workspace
(a few hundred MB, outside ``torch.cuda.max_memory_allocated``) and allocator slack (~10-20%).
``benchmarks/gpu_check.sh`` measures it on a GPU.

Chunked items on a crowded image (``--chunks``): a synthetic 520x704 image of ``--cells`` (2000)
10x10-pixel cells on a 13-pixel grid (a crowded competition image's density) under three
``crops`` layouts: the paper's chunks (``chunk_size: 64``: 32 items, every cell once an epoch),
the old per-image cap (``max_instances: 64``: one item of 64 random cells, 3% of the image an
epoch) and one item of every cell (no cap). Per layout, the loader's item: time (median over the
image's items), Python/numpy peak (``tracemalloc``, a second pass: it slows Python down) and the
item's tensors; and one training step on two of its items, in a fresh subprocess as above (peak
RSS over the model's, time; ``--chunk-dtypes`` bf16 by default, ``bf16,fp32`` for both). The
one-item layout's step (2 x 2000 crops) is not run: its memory is predicted from the per-crop
slope of the chunked step. A step is skipped like a sweep count (``--memory-fraction``; a
128-crop bf16 step is predicted at 11 GB, measured at 8.1 GB with the model), e.g.::

    .venv/bin/python benchmarks/bench_segmenter.py --threads 1 --skip-inference --skip-train --chunks --memory-fraction 0.7

``--threads`` sets ``torch.set_num_threads`` (default: torch's own choice), e.g.::

    .venv/bin/python benchmarks/bench_segmenter.py --threads 1
    .venv/bin/python benchmarks/bench_segmenter.py --threads 1 --skip-inference --train-crops 32,64
    .venv/bin/python benchmarks/bench_segmenter.py --threads 2 --device cuda --skip-train
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "segmenter_upernet_swin_t.yaml"
REAL = ROOT / "tests" / "fixtures" / "sartorius_real"
IMAGE_ID = "de504eaa5349"
MB = 2**20


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def build(profile: str, overrides: list[str]) -> tuple[torch.nn.Module, dict]:
    from cellmask.config import load_config
    from cellmask.models.segmenter import build_segmenter

    cfg = load_config(CONFIG, profile, overrides=["model.backbone.pretrained=false", *overrides])
    torch.manual_seed(0)
    return build_segmenter(cfg["model"]), cfg


# ------------------------------------------------------------------------------------ inference


def inference(args: argparse.Namespace) -> None:
    from cellmask.data.crops import crop_rois, instance_pixels, tight_boxes
    from cellmask.data.images import read_image
    from cellmask.data.sartorius import read_train_csv
    from cellmask.models.segmenter import paste_masks

    device = torch.device(args.device)
    model, cfg = build(args.profile, args.overrides)
    model = model.to(device).eval()
    s = model.crop_size
    channels = cfg["model"]["decoder"]["channels"]
    crops = torch.rand(args.batch, 3, s, s, device=device)
    amp = args.amp and device.type == "cuda"

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            model(crops)

    def encoder_only() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            model.net.encoder(crops)

    print(f"\n== inference ({args.profile}, UperNet decoder {channels} channels, crops {s}x{s})")
    t = timed(forward, args.warmup, args.repeats, device)
    med = statistics.median(t)
    print(
        f"forward, batch {args.batch}: median {med:.3f} s -> {args.batch / med:.1f} crops/s "
        f"(best {args.batch / min(t):.1f} crops/s, {args.repeats} runs after {args.warmup} warm-up)"
    )
    t_enc = statistics.median(timed(encoder_only, 0, 1, device))
    print(
        f"  of which the Swin encoder: {t_enc:.3f} s ({100 * t_enc / med:.0f}%), the rest is the UperNet decoder"
    )

    record = next(r for r in read_train_csv(REAL / "train.csv", REAL / "train") if r.image_id == IMAGE_ID)
    image = torch.from_numpy(read_image(record.path, (record.height, record.width))).to(device)
    boxes = tight_boxes([instance_pixels(record, i) for i in range(len(record))]).to(device)
    t = timed(
        lambda: model.predict(image, boxes, batch_size=args.batch, dense=True, amp=args.amp),
        0,
        args.image_repeats,
        device,
    )
    med = statistics.median(t)
    print(
        f"segment all {len(boxes)} cells of {IMAGE_ID} ({record.height}x{record.width}), crop + forward + "
        f"paste (dense bool masks): {med:.2f} s -> {len(boxes) / med:.1f} cells/s"
    )
    probs = torch.rand(len(boxes), 1, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    size = (record.height, record.width)
    for dense in (True, False):
        t = timed(lambda dense=dense: paste_masks(probs, boxes, size, dense=dense), 1, 5, device)
        form = "dense bool [K, H, W]" if dense else "compact per-box windows"
        print(f"  of which paste alone, {form}: {statistics.median(t) * 1e3:.1f} ms")
    img = image.float()[None, None] / 255

    def crop_only() -> None:
        for start in range(0, len(boxes), args.batch):
            crop_rois(img, [boxes[start : start + args.batch]], model.crop_size, model.sampling_ratio)

    t = timed(crop_only, 1, 5, device)
    print(f"  of which crop (roi_align) alone: {statistics.median(t) * 1e3:.1f} ms")


# ------------------------------------------------------------------------------ training step


def rss_mb() -> float:
    """Resident set size of this process now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MB


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_mb() -> float:
    """MemAvailable of the machine (MB)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def train_step_child(args: argparse.Namespace) -> None:
    """One measured training step of ``args.train_step`` crops (runs in its own process)."""
    model, _ = build(args.profile, args.overrides)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    s = model.crop_size
    gen = torch.Generator().manual_seed(0)

    def step(n: int) -> None:
        crops = [torch.rand(n, 1, s, s, generator=gen)]
        targets = [{"masks": (torch.rand(n, 1, s, s, generator=gen) > 0.5).to(torch.uint8)}]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            losses = model.training_step((crops, targets))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(2)  # gradients and AdamW state exist from here on
    before = rss_mb()
    start = time.perf_counter()
    step(args.train_step)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "crops": args.train_step,
                "bf16": args.bf16,
                "params": params,
                "rss_before_mb": round(before, 1),
                "peak_mb": round(peak, 1),
                "step_mb": round(peak - before, 1),
                "seconds": round(seconds, 2),
            }
        )
    )


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` (slope of one point through the origin)."""
    if len(xs) == 1:
        return ys[0] / xs[0], 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def train_sweep(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.train_crops.split(",") if c]
    print(f"\n== training step vs crops per step ({args.profile}, fresh process per count)")
    print("crops  mode  step peak over the model  step time")
    rows: dict[bool, list[dict]] = {False: [], True: []}
    params = 0
    for n in counts:
        for bf16 in (False, True):
            done = rows[bf16]
            if done:
                slope, intercept = fit_line([r["crops"] for r in done], [r["step_mb"] for r in done])
                need = done[-1]["rss_before_mb"] + intercept + slope * n
            else:
                need = 2048 + (70.0 if bf16 else 120.0) * n
            if need > args.memory_fraction * available_mb():
                print(
                    f"{n:5d}  {'bf16' if bf16 else 'fp32'}  skipped: needs ~{need / 1024:.1f} GB, "
                    f"{available_mb() / 1024:.1f} GB available"
                )
                continue
            cmd = [sys.executable, __file__, "--train-step", str(n), "--profile", args.profile]
            cmd += [f"--set={o}" for o in args.overrides]
            cmd += ["--threads", str(args.threads or torch.get_num_threads())]
            cmd += ["--bf16"] if bf16 else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(
                    f"{n:5d}  {'bf16' if bf16 else 'fp32'}  failed (exit {out.returncode}): {out.stderr[-300:]}"
                )
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            params = row["params"]
            done.append(row)
            print(
                f"{n:5d}  {'bf16' if bf16 else 'fp32'}  {row['step_mb'] / 1024:6.2f} GB"
                f"  (RSS {row['rss_before_mb'] / 1024:.2f} -> {row['peak_mb'] / 1024:.2f} GB)"
                f"  {row['seconds']:7.1f} s"
            )
    fixed_gb = 16 * params / 1024**3
    print(
        f"model: {params / 1e6:.1f} M parameters; weights + gradients + AdamW moments in float32: "
        f"{fixed_gb:.2f} GB"
    )
    for bf16, done in rows.items():
        if not done:
            continue
        slope, intercept = fit_line([r["crops"] for r in done], [r["step_mb"] for r in done])
        mode = "bf16 autocast (~ CUDA AMP)" if bf16 else "float32"
        print(f"{mode}: {slope:.1f} MB per crop (+{intercept:.0f} MB) over {len(done)} counts")
        estimates = ", ".join(
            f"{n}: {fixed_gb + (intercept + slope * n) / 1024:.1f} GB" for n in (32, 64, 128, 256)
        )
        print(f"  GPU estimate (16 B/param + step), crops per step -> {estimates}")
    print(
        "reference: mmseg's upernet_swin_tiny trains 2 x 512x512 per GPU = the pixels of 32 crops of 128x128"
    )


# ------------------------------------------------------------------ chunked items, crowded image

LAYOUTS: dict[str, dict] = {  # crops-section overrides
    "chunked (paper, chunk_size 64)": {"chunk_size": 64, "max_instances": None},
    "old cap (max_instances 64)": {"chunk_size": None, "max_instances": 64},
    "one item of every cell": {"chunk_size": None, "max_instances": None},
}


def crowded_dataset(folder: Path, layout: str, args: argparse.Namespace) -> tuple[object, int]:
    """``(CropDataset, items per epoch of the image)``: layout ``layout`` over a synthetic 520x704
    image of ``args.cells`` 10x10 cells (RLE run by run: no full-image mask stack), listed twice
    so that a per-image layout fills a 2-item step too."""
    import cv2
    import numpy as np

    from cellmask.config import load_config
    from cellmask.data.crops import CropDataset
    from cellmask.data.records import ImageRecord

    height, width, pitch, side = 520, 704, 13, 10
    cols = (width - 2) // pitch
    corners = [(1 + (i // cols) * pitch, 1 + (i % cols) * pitch) for i in range(args.cells)]
    if corners[-1][0] + side > height:
        raise ValueError(f"{args.cells} cells do not fit a {height}x{width} image")
    image = np.full((height, width), 40, dtype=np.uint8)
    for y, x in corners:
        image[y : y + side, x : x + side] = 200
    cv2.imwrite(str(folder / "crowded.png"), image)
    record = ImageRecord(
        image_id="crowded", path=folder / "crowded.png", height=height, width=width,
        boxes=np.array([[x, y, x + side, y + side] for y, x in corners], dtype=np.float32),
        labels=np.ones(args.cells, dtype=np.int64), seg_format="rle",
        segmentations=[" ".join(f"{(y + r) * width + x + 1} {side}" for r in range(side)) for y, x in corners],
    )  # fmt: skip
    cfg = load_config(CONFIG, args.profile, overrides=["model.backbone.pretrained=false", *args.overrides])
    crops, crop = {**cfg["crops"], **LAYOUTS[layout]}, cfg["model"]["crop"]
    dataset = CropDataset(
        [record, record], crops, size=int(crop["size"]), sampling_ratio=int(crop["sampling_ratio"]),
        image_cache=bool(cfg["train"]["image_cache"]),
    )  # fmt: skip
    return dataset, (len(dataset) // 2 if crops["chunk_size"] else 1)


def chunk_step_child(args: argparse.Namespace) -> None:
    """One measured training step on the first two items of layout ``args.chunk_step``."""
    from cellmask.data.crops import step_subset
    from cellmask.data.datasets import collate

    with tempfile.TemporaryDirectory() as folder:
        dataset, _ = crowded_dataset(Path(folder), list(LAYOUTS)[args.chunk_step], args)
        torch.manual_seed(0)
        batch = collate([dataset[0], dataset[1]])
    model, _ = build(args.profile, args.overrides)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)

    def step(b: tuple[list, list]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            losses = model.training_step(b)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(([c[:1] for c in batch[0]], [{"masks": t["masks"][:1]} for t in batch[1]]))  # AdamW state
    before = rss_mb()
    start = time.perf_counter()
    step(batch)
    seconds = time.perf_counter() - start
    keep, offered = step_subset(batch[1]), sum(len(c) for c in batch[0])
    row = {"crops": offered if keep is None else len(keep), "offered": offered, "seconds": round(seconds, 2)}
    print(json.dumps(row | {"rss_before_mb": round(before, 1), "step_mb": round(peak_rss_mb() - before, 1)}))


def chunk_report(args: argparse.Namespace) -> None:
    """The loader's items and a training step per layout (see the module docstring)."""
    print(f"\n== chunked items on a crowded image ({args.cells} cells, 520x704, {args.profile} profile)")
    print("layout | items/epoch | crops/item | item time | item py peak | item tensors | crops/epoch")
    with tempfile.TemporaryDirectory() as folder:
        for layout in LAYOUTS:
            dataset, items = crowded_dataset(Path(folder), layout, args)
            seconds, peaks, counts, tensor_mb = [], [], [], 0.0
            for index in range(items):
                torch.manual_seed(index)
                start = time.perf_counter()
                crops, target = dataset[index]
                seconds.append(time.perf_counter() - start)
                counts.append(len(crops))
                tensor_mb = max(tensor_mb, (crops.nbytes + target["masks"].nbytes) / MB)
            tracemalloc.start()  # a second pass: tracing slows Python down
            for index in range(items):
                torch.manual_seed(index)
                tracemalloc.reset_peak()
                dataset[index]
                peaks.append(tracemalloc.get_traced_memory()[1] / MB)
            tracemalloc.stop()
            print(
                f"{layout} | {items} | {min(counts)}-{max(counts)} | {statistics.median(seconds) * 1e3:.0f} ms"
                f" | {max(peaks):.1f} MB | {tensor_mb:.1f} MB | {sum(counts)} ({100 * sum(counts) / args.cells:.0f}%)"
            )
    print("step of 2 items | mode | crops trained (offered) | step peak over the model | step time")
    slopes: dict[str, float] = {}
    for index, layout in enumerate(LAYOUTS):
        for mode in args.chunk_dtypes.split(","):
            if layout == "one item of every cell":  # predicted from the chunked step's slope
                need = 2 * args.cells * slopes.get(mode, float("nan")) / 1024
                print(f"{layout} | {mode} | {2 * args.cells} uncapped: not run, ~{need:.0f} GB predicted")
                continue
            if (
                2048 + (70 if mode == "bf16" else 120) * 128 > args.memory_fraction * available_mb()
            ):  # 128 crops
                print(f"{layout} | {mode} | skipped: {available_mb() / 1024:.1f} GB available")
                continue
            cmd = [sys.executable, __file__, "--chunk-step", str(index), "--cells", str(args.cells)]
            cmd += ["--profile", args.profile, *[f"--set={o}" for o in args.overrides]]
            cmd += [
                "--threads",
                str(args.threads or torch.get_num_threads()),
                *(["--bf16"] * (mode == "bf16")),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"{layout} | {mode} | failed (exit {out.returncode}): {out.stderr[-300:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            slopes.setdefault(mode, row["step_mb"] / row["crops"])
            print(
                f"{layout} | {mode} | {row['crops']} ({row['offered']}) | {row['step_mb'] / 1024:.2f} GB"
                f" (RSS {row['rss_before_mb'] / 1024:.2f} GB before) | {row['seconds']:.1f} s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=64, help="crops per forward pass (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batch forwards (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batch forwards first (default 1)")
    parser.add_argument(
        "--image-repeats", type=int, default=1, help="timed runs of the whole image (default 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda for inference (default cpu)")
    parser.add_argument("--profile", default="paper", help="config profile (default paper)")
    parser.add_argument("--amp", action="store_true", help="autocast float16 at inference (CUDA)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. --set model.decoder.channels=256",
    )  # fmt: skip
    parser.add_argument("--skip-inference", action="store_true", help="only the training-step sweep")
    parser.add_argument("--skip-train", action="store_true", help="only the inference figures")
    parser.add_argument(
        "--train-crops", default="32,64,128,256", help="crops per training step to measure (CPU)"
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="skip a count predicted to need more than this fraction of MemAvailable (default 0.5)",
    )
    parser.add_argument("--chunks", action="store_true", help="chunked items on a crowded image")
    parser.add_argument("--cells", type=int, default=2000, help="cells of the crowded image (default 2000)")
    parser.add_argument(
        "--chunk-dtypes",
        default="bf16",
        help="step modes of --chunks: bf16, fp32 or bf16,fp32 (default bf16)",
    )
    parser.add_argument("--chunk-step", type=int, default=None, help=argparse.SUPPRESS)  # child
    parser.add_argument("--train-step", type=int, default=None, help=argparse.SUPPRESS)  # child
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # child
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_step is not None:
        train_step_child(args)
        return
    if args.chunk_step is not None:
        chunk_step_child(args)
        return
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    model, _ = build(args.profile, args.overrides)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    encoder = sum(p.numel() for p in model.net.encoder.parameters()) / 1e6
    print(f"segmenter ({args.profile}): {params:.1f} M parameters ({encoder:.1f} M Swin encoder)")
    del model
    if not args.skip_inference:
        inference(args)
    if not args.skip_train:
        train_sweep(args)
    if args.chunks:
        chunk_report(args)


if __name__ == "__main__":
    main()
