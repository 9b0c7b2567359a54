"""Evaluation: the ensemble's rows scored with the competition metric on a split
(:mod:`~cellmask.evaluate.run`: ``cellmask evaluate``; :mod:`~cellmask.evaluate.rows`: paper
Table 1's rows), precision/recall counts (:mod:`~cellmask.evaluate.counts`), the threshold search
(:mod:`~cellmask.evaluate.tune`: ``cellmask tune``) and their reports
(:mod:`~cellmask.evaluate.report`)."""

from cellmask.evaluate.rows import Row, RowResult, ablation_rows, run_rows
from cellmask.evaluate.run import (
    EvaluateResult,
    add_evaluate_arguments,
    cli_evaluate,
    evaluate,
    evaluate_predictor,
    load_eval_records,
    predictor_and_records,
)
from cellmask.evaluate.tune import TuneResult, tune, tune_predictor

__all__ = [
    "EvaluateResult",
    "Row",
    "RowResult",
    "TuneResult",
    "ablation_rows",
    "add_evaluate_arguments",
    "cli_evaluate",
    "evaluate",
    "evaluate_predictor",
    "load_eval_records",
    "predictor_and_records",
    "run_rows",
    "tune",
    "tune_predictor",
]
