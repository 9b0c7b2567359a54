"""Benchmark: the segmentation module's inference speed (UperNet Swin-T on 128x128 crops).

Two numbers, for the paper profile (Swin-T + UperNet 512, random initialisation: speed does not
depend on the weights), forward only, under ``torch.no_grad``, in eval mode:

1. crops/s of the network alone on a batch of ``--batch`` (64) random crops;
2. the time to segment every cell of the real fixture image ``de504eaa5349`` (496 shsy5y cells)
   from its truth boxes: crop (RoIAlign) + forward (in batches of ``--batch``) + paste, as
   ``Segmenter.predict`` does it, with the dense ``[496, 520, 704]`` bool output and with the
   compact per-box windows.

Each is timed ``--repeats`` times after ``--warmup`` untimed runs; the median and the best are
printed. The whole image is timed once by default (``--image-repeats``): on a CPU core it takes
minutes at the paper size. ``--threads`` sets ``torch.set_num_threads`` (default: torch's own choice), e.g.::

    .venv/bin/python benchmarks/bench_segmenter.py --threads 1
    .venv/bin/python benchmarks/bench_segmenter.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "segmenter_upernet_swin_t.yaml"
REAL = ROOT / "tests" / "fixtures" / "sartorius_real"
IMAGE_ID = "de504eaa5349"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=64, help="crops per forward pass (default 64)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batch forwards (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batch forwards first (default 1)")
    parser.add_argument(
        "--image-repeats", type=int, default=1, help="timed runs of the whole image (default 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--profile", default="paper", help="config profile (default paper)")
    parser.add_argument("--amp", action="store_true", help="autocast float16 (CUDA)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. --set model.decoder.channels=256",
    )  # fmt: skip
    args = parser.parse_args()

    from cellmask.config import load_config
    from cellmask.data.crops import instance_pixels, tight_boxes
    from cellmask.data.images import read_image
    from cellmask.data.sartorius import read_train_csv
    from cellmask.models.segmenter import build_segmenter, paste_masks

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = ["model.backbone.pretrained=false", *args.overrides]
    cfg = load_config(CONFIG, args.profile, overrides=overrides)
    torch.manual_seed(0)
    model = build_segmenter(cfg["model"]).to(device).eval()
    s = model.crop_size
    params = sum(p.numel() for p in model.parameters()) / 1e6
    encoder = sum(p.numel() for p in model.net.encoder.parameters()) / 1e6
    channels = cfg["model"]["decoder"]["channels"]
    print(f"device {device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(
        f"segmenter ({args.profile}): {params:.1f} M parameters ({encoder:.1f} M Swin encoder, "
        f"UperNet decoder {channels} channels), crops {s}x{s}"
    )

    crops = torch.rand(args.batch, 3, s, s, device=device)
    amp = args.amp and device.type == "cuda"

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            model(crops)

    def encoder_only() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            model.net.encoder(crops)

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
    t = timed(lambda: crop_rois_only(model, image, boxes, args.batch), 1, 5, device)
    print(f"  of which crop (roi_align) alone: {statistics.median(t) * 1e3:.1f} ms")


def crop_rois_only(model: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor, batch: int) -> None:
    from cellmask.data.crops import crop_rois

    img = image.float()[None, None] / 255
    for start in range(0, len(boxes), batch):
        crop_rois(img, [boxes[start : start + batch]], model.crop_size, model.sampling_ratio)


if __name__ == "__main__":
    main()
