"""``cellmask demo``: the whole MDE-CellMask method on a CPU, on built-in synthetic data or on
the real competition images.

What ``make demo`` (synthetic) and ``make demo-real`` (a Kaggle-layout root) run::

    cellmask demo [--out runs/demo] [--data data/demo] [--profile demo|cpu|smoke] [--quick]
        [--branches NAME ...] [--workers N] [--reuse | --skip-train] [--real DIR] [--livecell]
        [--baseline | --no-baseline] [--set KEY=VALUE ...] [--report FILE]

    cellmask demo --data ../shared/sartorius --profile cpu --out runs/demo_real --report benchmarks/REAL.md

``--data`` is the data source (:mod:`cellmask.demo.source`): a folder holding the competition's
``train.csv`` and ``train/`` is read as it is (profile ``cpu`` by default: native scale, 256x256
training windows; the Cascade Mask R-CNN baseline is trained too; images are split into train /
val / held-out folds, thresholds are tuned on the val fold and every figure is measured on the
held-out one; ``--report`` writes ``benchmarks/REAL.md``); anything else gets a synthetic
dataset written there, and the steps below run on it. The steps are the same for both sources.

1. ``cellmask synth``: a synthetic dataset in the Kaggle layout under ``--data`` (256x352
   images, so cells keep their native pixel size while images stay small), with
   ``train_semi_supervised/`` images for Soft Teacher;
2. trains the four detector branches (Faster R-CNN Swin-T, Cascade R-CNN ResNeXt-101 and
   ResNeSt-101, Soft Teacher started from the Cascade ResNeXt run's weights) and the segmenter
   (UperNet Swin-T on truth boxes), each with the ``--profile``'s numbers, two at a time with
   one thread each (:mod:`cellmask.demo.training`);
3. the ensemble (:class:`~cellmask.predict.Predictor`: every branch with flip TTA -> WBF ->
   segmenter -> post-processing) on the held-out validation images, with every branch alone,
   the ensemble without and with TTA and the post-processing variants beside it
   (:func:`~cellmask.evaluate.evaluate_predictor`, ``ablation=True``);
4. the same models on the 6 real annotated images of ``tests/fixtures/sartorius_real`` at their
   native 520x704 (:mod:`cellmask.demo.real`): the sim-to-real figure;
5. predicts the synthetic ``test/`` images into ``submissions/submission.csv`` (checked with
   :func:`~cellmask.submission.check_submission`) with overlays, and prints the table (each row:
   synthetic validation score overall and per class, real score) and the time of every stage.

Files under ``--out``: one run directory per model, ``evaluate/`` (ablation.md/csv, plots,
``val_submission.csv``), ``real/`` (the same for the real images), ``overlays/``,
``overlay_val.png``, ``overlay_real.png``, ``summary.json``.

``--livecell`` (``make demo-livecell``) trains the paper's two stages: every model but Soft
Teacher first on synthetic LIVECell images, then fine-tuned from those weights (the segmenter
with its fine-tuning config); about 1.6x the time, and the score the paper's recipe gives.

``--quick`` shrinks the dataset and trains each model one epoch: it checks the plumbing
(tests), not the score. ``make ablation`` (:mod:`cellmask.demo.experiments.ablation`) adds the Cascade Mask
R-CNN baseline and LIVECell pretraining and writes ``benchmarks/ABLATION.md``.

Budget: see the measured figures in ``README``/``benchmarks/ABLATION.md``.
"""

from __future__ import annotations

from cellmask.demo.command import add_demo_arguments, cli_demo
from cellmask.demo.core import SUMMARY_KEYS, run_demo
from cellmask.demo.plan import BRANCHES, DATASETS, SEGMENTER, Stage, demo_stages
from cellmask.demo.reports.tables import box_ap_per_class, save_comparison, write_truth_csv

__all__ = [
    "BRANCHES",
    "DATASETS",
    "SEGMENTER",
    "SUMMARY_KEYS",
    "Stage",
    "add_demo_arguments",
    "box_ap_per_class",
    "cli_demo",
    "demo_stages",
    "run_demo",
    "save_comparison",
    "write_truth_csv",
]
