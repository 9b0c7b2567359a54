"""Training the demo's runs: one after another, or two at a time with one thread each.

:func:`train_stages` runs ``cellmask train``'s :func:`~cellmask.training.command.run_training` for every
:class:`~cellmask.demo.plan.Stage` whose initialisation is ready. With ``workers`` > 1 each run
is a spawned process with ``cpu_count // workers`` torch threads (its log in the run directory's
``train.log``) and a progress bar counts the epochs every run has finished; with one worker the
runs share this process and its threads. Two small models with one thread each train faster
than the same two one after another with two threads (``cellmask.demo``'s docstring has the
measurement), so the demo defaults to two workers on a machine with at least two cores.

A run is reused instead of trained (``reuse=True``) when its directory already holds a
``best.pt`` and a ``config.yaml`` equal to the config it would be trained with.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellmask.demo.plan import Stage, check_stages

__all__ = [
    "StageResult",
    "cascade_stage1_as_faster_rcnn",
    "default_workers",
    "train_stages",
]

log = logging.getLogger("cellmask.demo")


@dataclass
class StageResult:
    """A trained (or reused) run.

    Attributes:
        stage: what was trained.
        out_dir: the run directory.
        seconds: wall time of the training (0 when reused).
        best: ``{"epoch", "metric", "value"}`` of ``best.pt`` (``None`` if the run never validated).
        epochs: epochs trained.
        reused: the run was already there (:func:`train_stages` ``reuse``).
    """

    stage: Stage
    out_dir: Path
    seconds: float
    best: dict[str, Any] | None
    epochs: int
    reused: bool = False


def default_workers() -> int:
    """Two parallel runs on a machine with at least two cores, else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def cascade_stage1_as_faster_rcnn(state: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """A Cascade R-CNN ``state_dict`` as a Faster R-CNN one: backbone, FPN and RPN as they are,
    the first cascade stage's box head and predictor as the Faster R-CNN box head.

    Stage 1 of the cascade is a Faster R-CNN head (trained on proposals at IoU 0.5, box-delta
    weights 10, 10, 5, 5 as Faster R-CNN's), but its box regression is class-agnostic
    (``bbox_pred`` ``[4, C]``): it is tiled to ``[4 * num_classes, C]``, the same deltas for every
    class, so the converted model predicts what stage 1 predicts. Stages 2 and 3 are dropped.
    """
    out = {}
    for key, value in state.items():
        if not key.startswith("roi_heads."):
            out[key] = value
        elif key.startswith("roi_heads.box_heads.0."):
            out["roi_heads.box_head." + key.removeprefix("roi_heads.box_heads.0.")] = value
        elif key.startswith("roi_heads.box_predictors.0."):
            name = key.removeprefix("roi_heads.box_predictors.0.")
            if name.startswith("bbox_pred") and value.shape[0] == 4:
                value = value.repeat(num_classes, *([1] * (value.dim() - 1)))
            out["roi_heads.box_predictor." + name] = value
    return out


def _stage_init(
    stage: Stage, cfg: Mapping[str, Any], results: Mapping[str, StageResult], out: Path
) -> Path | None:
    """The ``--init`` checkpoint of a stage: the init stage's ``best.pt`` (a cascade run that
    starts a Faster R-CNN-based model goes through :func:`cascade_stage1_as_faster_rcnn` first)."""
    if stage.init is None:
        return None
    source = results[stage.init].out_dir
    ckpt = source / "best.pt" if (source / "best.pt").is_file() else source / "last.pt"
    from cellmask.predict.runs import resolve_run

    spec = resolve_run(ckpt)
    if spec.kind != "cascade_rcnn" or cfg["model"]["type"] not in ("faster_rcnn", "soft_teacher"):
        return ckpt
    import torch

    from cellmask.engine import checkpoint_state_dict, load_checkpoint, save_checkpoint

    state = checkpoint_state_dict(load_checkpoint(ckpt), ckpt)
    num_classes = int((spec.config.get("data") or {}).get("num_classes", 4))
    converted = cascade_stage1_as_faster_rcnn(state, num_classes)
    path = out / stage.name / "init_from_cascade_stage1.pt"
    save_checkpoint({"model": {k: torch.as_tensor(v) for k, v in converted.items()}}, path)
    return path


def _same_config(
    run_dir: Path,
    cfg: Mapping[str, Any],
    data: Path,
    dataset: str,
    epochs: int | None,
    initialised: bool = False,
) -> bool:
    """The run in ``run_dir`` is finished and was trained with ``cfg`` (``epochs`` applied) on
    ``dataset`` under ``data``, from an ``--init`` checkpoint exactly when ``initialised``: its
    saved ``config.yaml`` says so (``run.init``; a config saved without it counts as a run from
    scratch). The last condition keeps a fine-tuned run (``cellmask demo --livecell``) from
    standing in for a run from scratch of the same config, and the reverse."""
    import yaml

    from cellmask.config import to_plain

    path = run_dir / "config.yaml"
    if not (run_dir / "best.pt").is_file() or not path.is_file():
        return False
    saved = yaml.safe_load(path.read_text()) or {}
    plain = to_plain(dict(cfg))
    if epochs is not None:
        plain["train"] = {**plain["train"], "epochs": int(epochs)}
    where = saved.get("data") or {}
    if where.get("dataset") != dataset or Path(str(where.get("root"))).resolve() != Path(data).resolve():
        return False
    if bool((saved.get("run") or {}).get("init")) != initialised:
        return False
    return {k: v for k, v in saved.items() if k not in ("data", "run")} == {
        k: v for k, v in plain.items() if k not in ("data", "run")
    }


def _best_of(run_dir: Path) -> tuple[dict[str, Any] | None, int]:
    from cellmask.engine import load_checkpoint
    from cellmask.engine.history import read_rows_csv

    epochs = len(read_rows_csv(run_dir / "metrics.csv"))
    last = run_dir / "last.pt"
    if not last.is_file():
        return None, epochs
    ckpt = load_checkpoint(last)
    return (dict(ckpt["best"]) if ckpt.get("best") else None), epochs


def _train_job(
    cfg: dict[str, Any],
    data: str,
    dataset: str,
    out_dir: str,
    init: str | None,
    epochs: int | None,
    device: str,
    threads: int | None,
    log_file: str | None,
) -> tuple[float, dict[str, Any] | None, int]:
    """One run (in this process or a spawned one): ``(seconds, best, epochs trained)``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if log_file is not None:  # a worker process: its output goes to the run's log
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_file, "a", buffering=1)  # open for the process's life
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        sys.stdout = sys.stderr = stream
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=stream,
            force=True,
        )
    from cellmask.training.command import run_training

    start = time.perf_counter()
    result = run_training(cfg, data, dataset, out_dir, init=init, epochs=epochs, device=device)
    return time.perf_counter() - start, result.get("best"), len(result.get("history") or [])


def _worker_init(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _epochs_done(run_dirs: Sequence[Path]) -> int:
    from cellmask.engine.history import read_rows_csv

    return sum(len(read_rows_csv(d / "metrics.csv")) for d in run_dirs)


def train_stages(
    stages: Sequence[Stage],
    configs: Mapping[str, dict[str, Any]],
    data: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    epochs: int | None = None,
    device: str = "cpu",
    reuse: bool = False,
    available: Mapping[str, StageResult] | None = None,
    progress: bool = True,
    echo: Any = print,
) -> dict[str, StageResult]:
    """Train every stage (each in ``out/<stage.name>``), a stage only once the stages it
    ``needs`` are done; the longest-waiting ready stage starts first (list order).

    Args:
        stages: what to train.
        configs: ``{stage name: resolved config}`` (profile and overrides applied).
        data: the data root (``--data``).
        workers: runs at a time; > 1: each in a spawned process with
            ``cpu_count // workers`` threads, its output in ``<run>/train.log``.
        epochs: overrides every config's ``train.epochs`` (``--quick``).
        reuse: keep a run whose ``best.pt`` exists and whose ``config.yaml`` equals its config.
        available: runs already trained elsewhere (``needs`` may name them).
        echo: prints one line per start and finish.

    Returns:
        ``{stage name: StageResult}`` (``available`` included).
    """
    check_stages(stages, available)
    out = Path(out)
    results: dict[str, StageResult] = dict(available or {})
    pending = list(stages)
    for stage in list(pending):
        run_dir = out / stage.name
        same = _same_config(
            run_dir, configs[stage.name], Path(data), stage.dataset, epochs, stage.init is not None
        )
        if reuse and same:
            best, n = _best_of(run_dir)
            results[stage.name] = StageResult(stage, run_dir, 0.0, best, n, reused=True)
            pending.remove(stage)
            echo(f"   {stage.name}: reusing {run_dir / 'best.pt'}")
    if not pending:
        return results
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    total_epochs = sum(int(epochs or configs[s.name]["train"]["epochs"]) for s in pending)
    t0 = time.perf_counter()

    def args_of(stage: Stage) -> tuple:
        run_dir = out / stage.name
        init = _stage_init(stage, configs[stage.name], results, out)
        log_file = str(run_dir / "train.log") if workers > 1 else None
        return (
            configs[stage.name],
            str(data),
            stage.dataset,
            str(run_dir),
            str(init) if init else None,
            epochs,
            device,
            threads,
            log_file,
        )

    def finished(stage: Stage, value: tuple[float, dict | None, int]) -> None:
        seconds, best, n = value
        results[stage.name] = StageResult(stage, out / stage.name, seconds, best, n)
        metric = (
            f"best {best['metric']} {best['value']:.3f} (epoch {best['epoch']})" if best else "no validation"
        )
        echo(f"   [{time.perf_counter() - t0:5.0f} s] {stage.name}: {n} epochs in {seconds:.0f} s, {metric}")

    def ready() -> list[Stage]:
        return [s for s in pending if all(n in results for n in s.needs)]

    if workers <= 1:
        while pending:
            stage = ready()[0]
            pending.remove(stage)
            echo(f"   [{time.perf_counter() - t0:5.0f} s] {stage.name}: training ({stage.dataset})")
            finished(stage, _train_job(*args_of(stage)))
        return results

    from tqdm.auto import tqdm

    ctx = multiprocessing.get_context("spawn")
    running: dict[cf.Future, Stage] = {}
    bar = tqdm(total=total_epochs, desc="training", unit="epoch", disable=None if progress else True)
    try:
        with cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
        ) as pool:
            while pending or running:
                for stage in ready()[: workers - len(running)]:
                    pending.remove(stage)
                    echo(
                        f"   [{time.perf_counter() - t0:5.0f} s] {stage.name}: training "
                        f"({stage.dataset}, {threads} thread(s); log {out / stage.name / 'train.log'})"
                    )
                    running[pool.submit(_train_job, *args_of(stage))] = stage
                if not running:
                    raise RuntimeError(f"stages {[s.name for s in pending]} wait for stages that never ran")
                done, _ = cf.wait(running, timeout=2.0, return_when=cf.FIRST_COMPLETED)
                bar.n = min(
                    total_epochs,
                    _epochs_done([out / s.name for s in running.values()])
                    + sum(
                        results[s.name].epochs
                        for s in stages
                        if s.name in results and not results[s.name].reused
                    ),
                )
                bar.refresh()
                for fut in done:
                    stage = running.pop(fut)
                    try:
                        finished(stage, fut.result())
                    except Exception as exc:
                        raise RuntimeError(
                            f"training {stage.name} failed: {exc} (log: {out / stage.name / 'train.log'})"
                        ) from exc
    finally:
        bar.close()
    return results
