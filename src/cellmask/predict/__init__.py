"""Inference: the MDE-CellMask ensemble, from run directories to ``submission.csv``.

The pipeline (paper, section 4)::

    image uint8 [H, W]
      -> every branch, with horizontal-flip TTA        tta.run_detector        (per branch, in turn)
      -> Weighted Boxes Fusion, weights from the runs  fusion.fuse_branches    (boxes in [0, 1] only there;
                                                       predict.tta_fusion: views, or per model first)
      -> class vote, per-class score thresholds        pipeline.finish_detections
      -> the segmenter on every kept box               pipeline.segmenter_masks (crop, segment, paste)
      -> re-scoring (option), overlap removal, min area
      -> one RLE row per instance                      pipeline.Instances.rles

Modules: :mod:`~cellmask.predict.options` (the ``predict`` config section),
:mod:`~cellmask.predict.runs` (run directories -> models), :mod:`~cellmask.predict.tta`,
:mod:`~cellmask.predict.fusion`, :mod:`~cellmask.predict.pipeline`,
:mod:`~cellmask.predict.cache` (``--cache``), :mod:`~cellmask.predict.images` (input checks),
:mod:`~cellmask.predict.predictor` (:class:`Predictor`), :mod:`~cellmask.predict.folder`
(:func:`predict_folder`, ``cellmask predict``) and :mod:`~cellmask.predict.single` (the one-detector
functions of the first pipeline, now thin wrappers).
"""

from __future__ import annotations

from cellmask.predict.cache import DetectionCache, ImageKey
from cellmask.predict.folder import PredictResult, cli_predict, predict_folder
from cellmask.predict.fusion import fuse_branches, fuse_detections
from cellmask.predict.options import (
    PAPER_EXACT,
    PREDICT_DEFAULTS,
    config_path_for,
    load_predict_config,
    predict_config,
    save_predict_config,
)
from cellmask.predict.pipeline import Instances, ProbabilityStore, finish_detections, image_class
from cellmask.predict.predictor import Branch, Predictor
from cellmask.predict.runs import (
    RunSpec,
    load_detector,
    load_run_model,
    load_segmenter,
    model_name,
    resolve_run,
)
from cellmask.predict.single import detect, predict_image, predict_records, segment, segment_detections
from cellmask.predict.tta import Detections, flip_boxes, run_detector

__all__ = [
    "PAPER_EXACT",
    "PREDICT_DEFAULTS",
    "Branch",
    "DetectionCache",
    "Detections",
    "ImageKey",
    "Instances",
    "PredictResult",
    "Predictor",
    "ProbabilityStore",
    "RunSpec",
    "cli_predict",
    "config_path_for",
    "detect",
    "finish_detections",
    "flip_boxes",
    "fuse_branches",
    "fuse_detections",
    "image_class",
    "load_detector",
    "load_predict_config",
    "load_run_model",
    "load_segmenter",
    "model_name",
    "predict_config",
    "predict_folder",
    "predict_image",
    "predict_records",
    "resolve_run",
    "run_detector",
    "save_predict_config",
    "segment",
    "segment_detections",
]
