"""Hot paths without per-box host reads (issue 22, item 7): truth-mask targets and mask paste.

One synthetic shsy5y image at the paper's scale (800x1088) with 2000 cells (the cells of two
generated images on one canvas; overlapping cells go to further label layers), as a record with
RLE masks. Two cases, each "before" (reimplemented here as the baseline) and "after" (the code):

(a) ``target``: one training sample of the Cascade Mask R-CNN baseline,
    ``DetectionDataset(with_masks=True)[0]`` with the paper augmentations and the warp forced
    (``shift_scale_rotate.p = 1``), then one mask-head target build (:func:`roi_mask_targets`)
    for 128 positive RoIs (the paper config's 512 sampled x 0.25; jittered truth boxes).
    Before: the warped label layers unpacked into a full-image ``uint8 [N, H, W]`` stack of the
    kept cells, and the targets copied RoI by RoI from it (the old ``roi_mask_targets``).
    After: :class:`MaskWindows` (each cell cropped to its box) and the targets gathered from them.
(b) ``paste``: the 2000 cells' soft 28x28 crops pasted at their (jittered) boxes and handed to
    the host as NumPy windows, as :func:`cellmask.predict.pipeline.segmenter_masks` does.
    Before: the old ``paste_masks`` (``int(hs[i])``, ``int(ws[i])`` per box) and one ``.cpu()``
    per window. After: ``paste_masks`` and ``PastedMasks.to("cpu")``; "packed": the same with
    the windows packed into one buffer as on a GPU (on the CPU they are views of the groups).

Each case runs in a fresh process: peak RSS above the RSS just before the case (the high-water
mark reset through ``/proc/self/clear_refs``), the best of ``--repeats`` times, and the host
reads counted with a ``TorchFunctionMode``: ``.cpu()``, ``.to("cpu")``, ``.item()``,
``.tolist()``, ``int()``/``float()``/``bool()`` of a tensor, ``nonzero`` and boolean-mask
indexing (in case (a) only in the mask-head target build: the sample itself is made on the CPU
by a loader worker). On a GPU each is a device -> host copy or a wait; here on the CPU some are
reads of host tensors (group indices) and an already-there ``.to("cpu")`` copies nothing, so
the counts compare the two sides but are not exactly a GPU's. Before and after must give identical
results (checked by digests).

    python benchmarks/bench_hot_paths.py [--size 800 1088] [--cells 2000] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
CROP = 28
POSITIVES = 128  # roi.batch_size_per_image 512 x roi.positive_fraction 0.25 (paper config)


# ---------------------------------------------------------------------------------- measuring


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _reads_mode():
    """A TorchFunctionMode counting host reads (module doc), by name."""
    import torch
    from torch.overrides import TorchFunctionMode

    reads = {
        torch.Tensor.cpu,
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__bool__,
        torch.Tensor.__index__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.masked_select,
        torch.Tensor.masked_select,
    }

    def bool_index(args) -> bool:
        index = args[1] if len(args) > 1 else None
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    class Reads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: Counter[str] = Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            to_cpu = func is torch.Tensor.to and any(
                isinstance(t, str) and t.startswith("cpu") for t in (*args[1:], kwargs.get("device"))
            )
            getitem = func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and bool_index(args)
            if func in reads or to_cpu or getitem:
                self.calls[getattr(func, "__name__", str(func))] += 1
            return func(*args, **kwargs)

    return Reads()


def _measure(fn, repeats: int, count: bool = True) -> tuple[object, dict]:
    """``fn()`` once for the peak RSS and (``count``) the host reads, then ``repeats`` times for
    the time."""
    gc.collect()
    _reset_peak()
    rss0 = _status_mb("VmRSS:")
    with _reads_mode() if count else contextlib.nullcontext() as reads:
        out = fn()
    peak = _status_mb("VmHWM:") - rss0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    calls = dict(reads.calls) if count else {}
    return out, {"peak_mb": peak, "ms": 1000 * min(times), "reads": sum(calls.values()), "calls": calls}


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ the data


def make_record(folder: Path, size: tuple[int, int], cells: int):
    """An 800x1088 (``size``) shsy5y record with ``cells`` RLE instances, its image in ``folder``."""
    import cv2
    import numpy as np

    from cellmask.data.records import ImageRecord
    from cellmask.data.synthetic import synth_image

    h, w = size
    first = synth_image("shsy5y", h, w, rng=0)
    instances, seed = list(first.instances), 1
    while len(instances) < cells:
        instances += synth_image("shsy5y", h, w, rng=seed).instances
        seed += 1
    instances = instances[:cells]
    path = folder / "dense.png"
    cv2.imwrite(str(path), first.image)
    return ImageRecord(
        image_id="dense",
        path=path,
        height=h,
        width=w,
        cell_type="shsy5y",
        boxes=np.stack([inst.box() for inst in instances]).astype(np.float32),
        labels=np.ones(len(instances), dtype=np.int64),
        segmentations=[inst.rle(h, w) for inst in instances],
        seg_format="rle",
    )


def jittered(boxes, n: int, seed: int):
    """``(rois float32 [n, 4], truth indices int64 [n])``: truth boxes moved by ~2 px."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(boxes), generator=g)[:n] if n <= len(boxes) else torch.arange(len(boxes))
    rois = boxes[idx] + torch.randn(len(idx), 4, generator=g) * 2
    return torch.cat([torch.minimum(rois[:, :2], rois[:, 2:] - 1), rois[:, 2:]], 1), idx


# ---------------------------------------------------------------------- the baselines (before)


def old_roi_mask_targets(masks, rois, matched_idxs, size: int, sampling_ratio: int):
    """The mask head's targets from a full-image ``[G, H, W]`` stack, one RoI at a time."""
    import torch

    from cellmask.data.crops import crop_rois, window_groups

    out = torch.zeros((rois.shape[0], size, size), dtype=torch.float32)
    height, width = masks.shape[-2:]
    boxes = rois.detach().float().cpu()
    wx0 = torch.floor(boxes[:, 0] - 0.5).long() - 1
    wy0 = torch.floor(boxes[:, 1] - 0.5).long() - 1
    ww = (torch.floor(boxes[:, 2] - 0.5).long() + 3 - wx0).clamp(min=1)
    wh = (torch.floor(boxes[:, 3] - 0.5).long() + 3 - wy0).clamp(min=1)
    idx = matched_idxs.tolist()
    x0s, y0s, ws, hs = wx0.tolist(), wy0.tolist(), ww.tolist(), wh.tolist()
    local = boxes - torch.stack([wx0, wy0, wx0, wy0], 1).float()
    for group in window_groups(torch.stack([wh, ww], 1), 1 << 22):
        members = group.tolist()
        canvas = torch.zeros((len(members), 1, max(hs[i] for i in members), max(ws[i] for i in members)))
        for j, i in enumerate(members):
            ys, ye = max(y0s[i], 0), min(y0s[i] + hs[i], height)
            xs, xe = max(x0s[i], 0), min(x0s[i] + ws[i], width)
            if ye > ys and xe > xs:
                canvas[j, 0, ys - y0s[i] : ye - y0s[i], xs - x0s[i] : xe - x0s[i]] = masks[
                    idx[i], ys:ye, xs:xe
                ]
        batch_idx = torch.arange(len(members), dtype=torch.float32)[:, None]
        out[group] = crop_rois(canvas, torch.cat([batch_idx, local[group]], 1), size, sampling_ratio)[:, 0]
    return out


def old_paste_masks(probs, boxes, image_size, threshold: float = 0.5):
    """The old ``paste_masks(dense=False)``: ``(offsets, windows, conf)``, windows sliced per box
    with ``int(hs[i])``, ``int(ws[i])`` (a device read each on a GPU)."""
    import torch
    import torch.nn.functional as F

    from cellmask.data.crops import window_groups
    from cellmask.models.paste import _pixel_span

    height, width = image_size
    device = probs.device
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    k = len(boxes)
    with torch.autocast(device.type, enabled=False):
        xs0, xs1 = _pixel_span(boxes[:, 0], boxes[:, 2], width)
        ys0, ys1 = _pixel_span(boxes[:, 1], boxes[:, 3], height)
        ws, hs = xs1 - xs0, ys1 - ys0
        conf = torch.zeros(k, dtype=torch.float32, device=device)
        windows = [torch.zeros((0, 0), dtype=torch.bool, device=device)] * k
        bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
        bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
        for group in window_groups(torch.stack([hs, ws], 1).clamp(min=1).cpu(), 1 << 22):
            g = group.to(device)
            gh, gw = int(hs[g].max()), int(ws[g].max())
            if gh == 0 or gw == 0:
                continue
            tx = torch.arange(gw, device=device, dtype=torch.float32)
            ty = torch.arange(gh, device=device, dtype=torch.float32)
            gx = 2 * (xs0[g, None] + tx + 0.5 - boxes[g, 0, None]) / bw[g, None] - 1
            gy = 2 * (ys0[g, None] + ty + 0.5 - boxes[g, 1, None]) / bh[g, None] - 1
            grid = torch.stack([gx[:, None, :].expand(-1, gh, -1), gy[:, :, None].expand(-1, -1, gw)], dim=-1)
            vals = F.grid_sample(
                probs[g].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            vals = vals[:, 0]
            valid = (ty[None, :, None] < hs[g, None, None]) & (tx[None, None, :] < ws[g, None, None])
            keep = (vals >= threshold) & valid
            conf[g] = (vals * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1)
            for j, i in enumerate(group.tolist()):
                windows[i] = keep[j, : int(hs[i]), : int(ws[i])]
    return torch.stack([ys0, xs0], 1), windows, conf


# --------------------------------------------------------------------------------------- cases


def case_target(record, side: str, repeats: int) -> dict:
    import torch

    import cellmask.data.datasets as datasets_module
    from cellmask.config import load_config
    from cellmask.data.datasets import DetectionDataset
    from cellmask.data.layers import MaskWindows, layers_to_masks
    from cellmask.data.transforms import build_transforms
    from cellmask.models.mask_head import roi_mask_targets

    cfg = load_config(ROOT / "configs" / "cascade_mask_rcnn_resnext101.yaml", profile="paper")
    augment = {**cfg["augment"], "shift_scale_rotate": {**cfg["augment"]["shift_scale_rotate"], "p": 1.0}}
    dataset = DetectionDataset([record], build_transforms(augment, train=True), with_masks=True)
    if side == "before":  # the old full-image path: the kept cells' uint8 [N, H, W] stack
        n = len(record)
        datasets_module.layers_to_windows = lambda layers, keep: layers_to_masks(layers, n)[keep]
        build = old_roi_mask_targets
    else:
        build = roi_mask_targets
    parts: dict = {"item_ms": [], "heads_ms": []}
    counted: list[dict] = []

    def run():
        torch.manual_seed(0)
        start = time.perf_counter()
        _, target = dataset[0]
        parts["item_ms"].append(1000 * (time.perf_counter() - start))
        rois, idx = jittered(target["boxes"], POSITIVES, seed=1)
        if counted:
            start = time.perf_counter()
            targets = build(target["masks"], rois, idx, CROP, 2)
            parts["heads_ms"].append(1000 * (time.perf_counter() - start))
        else:  # the first (untimed) run counts the model's part: the sample is made by a worker
            with _reads_mode() as reads:
                targets = build(target["masks"], rois, idx, CROP, 2)
            counted.append(dict(reads.calls))
        return target, targets

    (target, targets), out = _measure(run, repeats, count=False)
    out["calls"] = counted[0]
    out["reads"] = sum(counted[0].values())
    parts = {"item_ms": min(parts["item_ms"][1:]), "heads_ms": min(parts["heads_ms"])}  # timed runs
    masks = target["masks"]
    out["mask_mb"] = (masks.data.nbytes + masks.boxes.nbytes if side == "after" else masks.nbytes) / MB
    windows = masks if side == "after" else MaskWindows.from_dense(masks)
    out["digest"] = _digest(target["boxes"], windows.boxes, windows.data, targets)
    out["cells"] = len(target["boxes"])
    return {**out, **parts}


def case_paste(record, side: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from cellmask.data.crops import crop_masks, instance_pixels
    from cellmask.predict.pipeline import segmenter_masks

    size = (record.height, record.width)
    boxes, idx = jittered(torch.as_tensor(record.boxes), len(record), seed=2)  # "detections"
    probs = crop_masks([instance_pixels(record, i) for i in idx.tolist()], boxes, size=CROP)
    image = torch.zeros((3, *size))
    keep = np.arange(len(record))

    class Crops(torch.nn.Module):  # the "segmenter": the precomputed crops
        threshold = 0.5

        def predict_probs(self, images, rois, batch_size=None, amp=False):
            return probs

    def after():
        return segmenter_masks(Crops(), image, boxes.numpy())(keep)

    if side == "packed":  # the GPU's path: the windows packed into one buffer per image
        import cellmask.models.paste as paste_module

        paste_module._pack_windows = lambda device: True

    def before():  # the old segmenter_masks(...)(keep): one .cpu() per window
        sel = np.asarray(boxes.numpy(), dtype=np.float32).reshape(-1, 4)[keep]
        b = torch.as_tensor(sel)
        crops = Crops().predict_probs(image[None], torch.cat([torch.zeros((len(b), 1)), b], 1))
        offsets, windows, conf = old_paste_masks(crops, torch.as_tensor(sel), size, 0.5)
        return (
            offsets.cpu().numpy().astype(np.int64).reshape(-1, 2),
            [w.cpu().numpy() for w in windows],
            conf.cpu().numpy().astype(np.float32),
        )

    (offsets, windows, conf), out = _measure(before if side == "before" else after, repeats)
    flat = np.concatenate([w.reshape(-1) for w in windows])
    shapes = np.array([w.shape for w in windows], dtype=np.int64)
    out["digest"] = _digest(*(torch.from_numpy(a) for a in (offsets, shapes, flat, conf)))
    out["pixels"] = int(flat.sum())
    return out


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    with open(spec["record"], "rb") as f:
        record = pickle.load(f)
    fn = case_target if spec["case"] == "target" else case_paste
    print(json.dumps(fn(record, spec["side"], spec["repeats"])))


# ----------------------------------------------------------------------------------------- main


def run_case(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, nargs=2, default=[800, 1088])
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (>= 1) after the measured one")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        record = make_record(Path(tmp), tuple(args.size), args.cells)
        path = Path(tmp) / "record.pkl"
        path.write_bytes(pickle.dumps(record))
        h, w = args.size
        print(f"{len(record)} cells on one {h}x{w} image; {args.threads} thread(s), best of {args.repeats}")
        print(f"full-image uint8 stack: {len(record) * h * w / MB:.0f} MB ({h * w / MB:.2f} MB per cell)\n")
        results = {}
        for case, sides in (("target", ("before", "after")), ("paste", ("before", "after", "packed"))):
            for side in sides:
                spec = {"case": case, "side": side, "record": str(path), "repeats": args.repeats}
                results[case, side] = run_case({**spec, "threads": args.threads})
    print(f"{'case':8s} {'side':6s} {'time ms':>9s} {'peak MB':>9s} {'host reads':>10s}  details")
    for (case, side), r in results.items():
        if case == "target":
            extra = (
                f"sample {r['item_ms']:.0f} ms + heads {r['heads_ms']:.0f} ms; "
                f"masks {r['mask_mb']:.1f} MB for {r['cells']} cells"
            )
        else:
            extra = f"{r['pixels']} mask pixels"
        print(
            f"{case:8s} {side:6s} {r['ms']:9.1f} {r['peak_mb']:9.1f} {r['reads']:10d}  {extra}; {r['calls']}"
        )
    print()
    for case, side in (("target", "after"), ("paste", "after"), ("paste", "packed")):
        before, after = results[case, "before"], results[case, side]
        same = "identical" if before["digest"] == after["digest"] else "DIFFERENT"
        print(
            f"{case} {side}: time {before['ms'] / after['ms']:.2f}x of before's speed, peak "
            f"{before['peak_mb'] / max(after['peak_mb'], 0.1):.1f}x smaller, host reads {before['reads']} -> "
            f"{after['reads']}; results {same}"
        )
        if case == "target":
            print(f"  truth masks per sample {before['mask_mb']:.1f} MB -> {after['mask_mb']:.2f} MB")


if __name__ == "__main__":
    main()
