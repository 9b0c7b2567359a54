"""``make ablation-real``'s plan (cellmask.demo.experiments.levers): each variant differs from the run it is
compared with in its one lever, the data root it trains from, the table, and the CLI's dispatch.
The levers' figures themselves are in benchmarks/REAL_LEVERS.md (too long for CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellmask.config import load_config
from cellmask.demo.core import load_stage_configs
from cellmask.demo.experiments.levers import LEVER_BASE, LEVERS, compose_root, lever_stages, paper_augment
from cellmask.demo.plan import Stage, check_stages, default_config_dir
from cellmask.demo.reports.levers import format_levers_table
from cellmask.paths import CompetitionLayout

CONFIGS = default_config_dir()


def _diff(a, b, prefix=""):
    """Dotted keys whose values differ between two nested mappings."""
    keys = set(a) | set(b)
    out = []
    for k in sorted(keys):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


def test_each_variant_differs_from_its_reference_run_in_its_lever_only():
    stages = lever_stages(CONFIGS)
    check_stages(stages, available={LEVER_BASE: None})  # branch 2 comes from the demo run
    configs = load_stage_configs(stages, "cpu", CONFIGS)
    reference = load_stage_configs([Stage(LEVER_BASE, LEVER_BASE)], "cpu", CONFIGS)[LEVER_BASE]
    twin_ref = load_stage_configs([Stage("st", "soft_teacher_resnext101")], "cpu", CONFIGS)["st"]

    augs = _diff(configs[f"paper_augs/{LEVER_BASE}"], reference)
    assert augs and all(k.startswith("augment.") for k in augs)
    assert _diff(configs[f"resize/{LEVER_BASE}"], reference) == ["augment.crop", "model.transform.scale"]
    assert _diff(configs[f"livecell_ft/{LEVER_BASE}"], reference) == []  # only its init differs
    assert _diff(configs["supervised_twin/soft_teacher_resnext101"], twin_ref) == ["semi.unsup_weight"]
    by_name = {s.name: s for s in stages}
    assert by_name[f"livecell_ft/{LEVER_BASE}"].init == f"livecell/{LEVER_BASE}"
    assert by_name[f"livecell/{LEVER_BASE}"].dataset == "livecell"
    assert by_name["supervised_twin/soft_teacher_resnext101"].init == LEVER_BASE  # as Soft Teacher's
    # every lever compares two runs that exist: a variant or the demo run's own
    names = set(by_name) | {LEVER_BASE, "soft_teacher_resnext101"}
    assert all(a in names and b in names and a != b for _, a, b in LEVERS)


def test_paper_augment_restores_the_base_augmentations_on_the_cpu_windows():
    base = load_config(CONFIGS / "base.yaml")["augment"]
    cfg = load_config(CONFIGS / f"{LEVER_BASE}.yaml", profile="cpu", overrides=list(paper_augment(CONFIGS)))
    assert cfg["augment"]["crop"] == [256, 256]  # the profile's windows stay
    for key in (
        "hflip",
        "vflip",
        "shift_scale_rotate",
        "brightness_contrast",
        "gaussian_blur",
        "median_blur",
    ):
        assert cfg["augment"][key] == base[key], key
    cpu = load_config(CONFIGS / f"{LEVER_BASE}.yaml", profile="cpu")["augment"]
    assert cpu["shift_scale_rotate"] is None  # so the lever does change something


def test_compose_root_links_the_real_files_and_adds_synthetic_livecell(real_root: Path, tmp_path: Path):
    root = compose_root(real_root, tmp_path / "levers", n_livecell=3)
    layout = CompetitionLayout(root)
    assert (
        layout.train_csv.is_symlink()
        and layout.train_csv.read_bytes() == (real_root / "train.csv").read_bytes()
    )
    assert layout.train_dir.is_symlink()
    lc = layout.livecell_root / "annotations" / "LIVECell"
    assert sorted(p.name for p in lc.iterdir())[0] == "livecell_coco_test.json"
    again = compose_root(real_root, tmp_path / "levers", n_livecell=3)  # idempotent
    assert again == root


def test_levers_table_gives_each_lever_its_gain():
    row = {"shsy5y": 0.1, "cort": 0.2, "astro": 0.0, "run": "r", "instances": 1}
    rows = [
        {**row, "lever": "L", "arm": "without", "score": 0.150},
        {**row, "lever": "L", "arm": "with", "score": 0.175},
        {**row, "lever": "M", "arm": "without", "score": 0.200},
        {**row, "lever": "M", "arm": "with", "score": 0.190},
    ]
    lines = format_levers_table(rows).splitlines()
    assert lines[3].endswith("| +0.025 |") and lines[5].endswith("| -0.010 |")
    assert lines[2].endswith("|  |")


def test_ablation_on_a_competition_root_runs_the_levers(real_root: Path, monkeypatch, tmp_path: Path):
    import cellmask.demo.experiments.levers as levers
    from cellmask.cli import main

    seen = {}
    monkeypatch.setattr(levers, "run_levers", lambda **kw: seen.update(kw))
    argv = ["demo", "--ablation", "--data", str(real_root), "--from-runs", str(tmp_path / "runs")]
    assert main(argv) == 0
    assert seen["data"] == str(real_root) and seen["demo_runs"] == str(tmp_path / "runs")
    assert seen["out"] == "runs/levers_real" and seen["md"] == "benchmarks/REAL_LEVERS.md"
    assert seen["profile"] == "cpu"


@pytest.mark.parametrize("missing", ["data", "runs"])
def test_make_ablation_real_names_what_it_looked_for(missing: str, tmp_path: Path):
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "nothing"
    if missing == "runs":  # a root that passes the data check
        (data / "train").mkdir(parents=True)
        (data / "train.csv").write_text("id,annotation\n")
    out = subprocess.run(
        ["make", "-s", "-C", str(repo), "ablation-real", f"DATA={data}", f"DEMO_REAL={tmp_path / 'no_run'}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    looked = "train.csv" if missing == "data" else "no_run/summary.json"
    assert looked in out.stdout + out.stderr
