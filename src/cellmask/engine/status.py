"""Whether a run finished, and whether a continuation may go on from it.

``status.json`` (written with every epoch's checkpoints): ``finished`` (every planned epoch
trained, none cut), ``epochs_done`` / ``epochs_planned``, ``iteration`` (iterations done of the
next epoch, when cut inside it), ``stopped`` (``max_hours`` for a cut), ``best_epoch``. A run
without one (older runs) has it derived from ``config.yaml`` and ``metrics.csv``
(:func:`read_status`). Only finished runs ship (``make weights``) or start a fine-tuning, unless
the user says so.

A continuation (``resume``) must train the run it continues: :func:`resume_problems` names
every difference between the config in ``last.pt`` and the one given, other than
:data:`RESUME_MAY_CHANGE` (the session's budget and where things are), and an ``epochs`` at or
below the epochs done (it would train nothing). A longer schedule is allowed only when asked
(``extend``); the cosine or step schedule is then recomputed over the new length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
RESUME_MAY_CHANGE = (
    "train.max_hours",
    "train.deadline",
    "train.reserve_minutes",
    "train.num_workers",
    "train.prefetch_factor",
    "train.progress",
    "data.root",
    "run",
)
"""Config keys (and sections) a continuation may change: the session's budget, loader workers
(batches depend only on seed and epoch), progress bars, and where the data and the run are."""


class ResumeError(ValueError):
    """A continuation that would not continue the same run (the message names each difference)."""


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands (see the module docstring)."""

    finished: bool
    epochs_done: int
    epochs_planned: int
    iteration: int = 0
    stopped: str | None = None
    best_epoch: int | None = None

    def describe(self) -> str:
        """``36/36 epochs, best epoch 31`` or ``12/36 epochs (cut: max_hours), best epoch 12``."""
        cut = f" (cut: {self.stopped})" if self.stopped else ("" if self.finished else " (unfinished)")
        best = f", best epoch {self.best_epoch}" if self.best_epoch is not None else ""
        return f"{self.epochs_done}/{self.epochs_planned} epochs{cut}{best}"


def run_status(
    history: list[Mapping[str, Any]],
    planned: int,
    best: Mapping[str, Any] | None,
    iters_per_epoch: int | None = None,
) -> RunStatus:
    """The status of a run from its epoch rows (``metrics.csv`` / ``Run.history``); a cut row's
    epoch counts as done only when its ``iters`` reached ``iters_per_epoch`` (when known)."""
    last = history[-1] if history else {}
    stopped = last.get("stopped") or None
    iters = int(last.get("iters") or 0) if stopped else 0
    inside = bool(stopped) and iters > 0 and (iters_per_epoch is None or iters < iters_per_epoch)
    done = int(last.get("epoch") or 0) - (1 if inside else 0)
    iteration = iters if inside else 0
    return RunStatus(
        finished=not stopped and done >= planned,
        epochs_done=max(done, 0),
        epochs_planned=int(planned),
        iteration=iteration,
        stopped=str(stopped) if stopped else None,
        best_epoch=int(best["epoch"]) if best else None,
    )


def write_status(out_dir: str | Path, status: RunStatus) -> Path:
    path = Path(out_dir) / STATUS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(status), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_status(run_dir: str | Path) -> RunStatus:
    """A run directory's :class:`RunStatus`: its ``status.json``, else derived from
    ``config.yaml`` (``train.epochs``) and ``metrics.csv`` (an older run).

    Raises:
        FileNotFoundError: neither ``status.json`` nor ``config.yaml`` + ``metrics.csv``.
    """
    import yaml

    from cellmask.engine.defaults import train_config
    from cellmask.engine.history import read_rows_csv

    run_dir = Path(run_dir)
    path = run_dir / STATUS_FILE
    if path.is_file():
        return RunStatus(**json.loads(path.read_text()))
    cfg_path, metrics = run_dir / "config.yaml", run_dir / "metrics.csv"
    if not (cfg_path.is_file() and metrics.is_file()):
        raise FileNotFoundError(
            f"{run_dir}: no {STATUS_FILE}, nor config.yaml + metrics.csv to tell whether it finished"
        )
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    rows = read_rows_csv(metrics)
    tcfg = train_config(cfg)
    monitor, mode = str(tcfg["monitor"]), str(tcfg["monitor_mode"])
    if not any(r.get(monitor) for r in rows):  # a run without validation follows its training loss
        monitor, mode = "train_loss", "min"
    scored = [r for r in rows if r.get(monitor)]
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda r: float(r[monitor])) if scored else None
    return run_status(rows, int(train_config(cfg)["epochs"]), {"epoch": best["epoch"]} if best else None)


def _flat(cfg: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flat(value, name + ".")
        else:
            yield name, value


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = RESUME_MAY_CHANGE
) -> list[str]:
    """``["train.lr: 0.0001 -> 0.0002", ...]``: every flattened key whose value differs between
    two configs, except those equal to or under an ``ignore`` entry."""
    a, b = dict(_flat(old)), dict(_flat(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {a.get(key, '<unset>')} -> {b.get(key, '<unset>')}")
    return out


def resume_problems(
    saved: Mapping[str, Any], given: Mapping[str, Any], epochs_done: int, extend: bool = False
) -> list[str]:
    """What makes a continuation of a run saved with config ``saved`` (after ``epochs_done``
    complete epochs) with config ``given`` not the same run: an ``epochs`` at or below the epochs
    done, a changed ``train.epochs`` unless ``extend`` lengthens it, any other difference
    (:func:`config_differences`). Empty: it may go on."""
    from cellmask.engine.defaults import train_config

    planned, wanted = int(train_config(saved)["epochs"]), int(train_config(given)["epochs"])
    problems = []
    if wanted <= epochs_done:
        problems.append(
            f"epochs {wanted} but last.pt has {epochs_done} of {planned} epochs done: a continuation "
            f"with epochs <= {epochs_done} trains nothing (leave EPOCHS unset to finish the {planned})"
        )
    elif wanted < planned:
        problems.append(f"train.epochs: {planned} -> {wanted} (a shorter schedule than the run's)")
    elif wanted > planned and not extend:
        problems.append(
            f"train.epochs: {planned} -> {wanted} (a longer schedule: allowed with EXTEND / --extend, "
            "which recomputes the learning-rate schedule over the new length)"
        )
    problems += [d for d in config_differences(saved, given) if not d.startswith("train.epochs:")]
    return problems


def saved_epochs(run_dir: str | Path) -> int | None:
    """``train.epochs`` of the run in ``run_dir`` (its ``config.yaml``), or ``None`` without one."""
    import yaml

    from cellmask.engine.defaults import train_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    return int(train_config(yaml.safe_load(path.read_text()) or {})["epochs"])


def check_continuation(
    run_dir: str | Path, cfg: Mapping[str, Any], epochs: int | None = None, extend: bool = False
) -> None:
    """Before any data is read: whether ``cfg`` (with ``epochs``) continues the run in
    ``run_dir``, from its ``config.yaml`` and :func:`read_status` (the sections a run fills in
    itself, ``data`` and ``run``, are compared later against ``last.pt``). Nothing to check when
    the run has no ``config.yaml``.

    Raises:
        ResumeError: see :func:`resume_problems`.
    """
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    given = {k: v for k, v in cfg.items() if k not in ("data", "run")}
    if epochs is not None:
        given["train"] = {**(given.get("train") or {}), "epochs": int(epochs)}
    saved = {k: v for k, v in saved.items() if k not in ("data", "run")}
    problems = resume_problems(saved, given, read_status(run_dir).epochs_done, extend=extend)
    if problems:
        raise ResumeError(
            f"{run_dir}: this continuation would not continue that run: " + "; ".join(problems)
            + ". Continue it with the config it was started with (the session's max_hours may change)"
        )  # fmt: skip
