"""Configs: nested dicts read from YAML, with inheritance (``_base_``) and profiles.

A config file states only what differs from its base::

    _base_: base.yaml            # relative to this file
    model: {type: cascade_rcnn}
    profiles:                    # deep overrides, one mapping per profile
      demo: {model: {backbone: {kwargs: {layers: [1, 1, 1, 1]}}}}
      smoke: {...}

:func:`load_config` resolves a file for one profile: the base (recursively, with *its* profile
section applied), then the file's own keys, then the file's profile section, then the caller's
``overrides``. ``paper`` is the implicit profile: it applies no section unless a file defines
one. The result has no ``_base_``/``profiles`` keys and records ``profile: <name>``.

Merging is recursive for mappings; any other value (lists included) replaces the old one, and
``null`` is a value like any other.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

PROFILES: tuple[str, ...] = ("paper", "demo", "cpu", "smoke")
"""The profiles every shipped config knows (see DESIGN.md): ``paper`` applies no section; ``cpu``
is real competition images at native scale on a CPU (``make demo-real``)."""

BASE_KEY = "_base_"
PROFILES_KEY = "profiles"

Config = dict[str, Any]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Config:
    """A new dict: ``base`` with ``override`` merged in (mappings recursively, the rest replaced).

    Neither argument is modified; the result shares no mutable value with them.
    """
    out: Config = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(
    path: str | Path,
    profile: str = "paper",
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Config:
    """Read a YAML config, resolving ``_base_`` files and the ``profile``'s sections.

    Args:
        path: the YAML file.
        profile: ``paper`` (no section unless a file has one), ``demo``, ``smoke``, or any name
            some file of the chain defines under ``profiles:``.
        overrides: applied last: a nested mapping, or ``KEY.PATH=VALUE`` strings whose value is
            parsed as YAML (``train.epochs=3``, ``model.backbone.pretrained=false``).

    Returns:
        the resolved config, with ``profile`` set and no ``_base_``/``profiles`` keys.

    Raises:
        FileNotFoundError: ``path`` or a base file is missing (the message names it).
        ValueError: an unknown profile (naming the file and the known profiles), a base cycle,
            a top level that is not a mapping, or a malformed override string.
    """
    path = Path(path)
    cfg, known = _resolve(path, profile, chain=())
    if profile not in known:
        raise ValueError(f"{path}: unknown profile {profile!r}; known profiles: {', '.join(sorted(known))}")
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(overrides)
        cfg = deep_merge(cfg, overrides)
    cfg["profile"] = profile
    return cfg


def _resolve(path: Path, profile: str, chain: tuple[Path, ...]) -> tuple[Config, set[str]]:
    """``(config of path for profile, profiles known along its base chain)`` (internal)."""
    if not path.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"{path}: no such config file{where}")
    resolved = path.resolve()
    if resolved in chain:
        raise ValueError(f"{path}: _base_ cycle: {' -> '.join(str(p) for p in (*chain, resolved))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")

    known = {"paper"}
    cfg: Config = {}
    base = raw.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise ValueError(f"{path}: {BASE_KEY} must be one relative path, got {base!r}")
        cfg, known = _resolve(path.parent / base, profile, (*chain, resolved))
    sections = raw.pop(PROFILES_KEY, None) or {}
    if not isinstance(sections, dict) or any(not isinstance(v, dict | None) for v in sections.values()):
        raise ValueError(f"{path}: {PROFILES_KEY} must map profile names to mappings")
    known |= set(sections)
    cfg = deep_merge(cfg, raw)
    cfg = deep_merge(cfg, sections.get(profile) or {})
    return cfg, known


def add_override_argument(parser: Any, help: str, metavar: str = "KEY=VALUE") -> None:
    """The ``--set KEY.PATH=VALUE`` option (repeatable, into ``overrides``) of the commands that
    take config overrides (:func:`parse_overrides` reads them)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(items: Iterable[str]) -> Config:
    """``["train.epochs=3", "model.mask.enabled=true"]`` -> a nested mapping (values parsed as
    YAML, except that a number in exponent form without a dot, ``1e-4``, is a float, not YAML
    1.1's string)."""
    out: Config = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ValueError(f"override {item!r} is not KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: value is not valid YAML ({exc})") from None
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; a user means 0.0001
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[leaf] = value
    return out


def save_config(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``cfg`` as YAML (keys in insertion order); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False, default_flow_style=None))
    return path


def to_plain(value: Any) -> Any:
    """Mappings -> dict, tuples/lists -> list, Paths -> str, recursively (YAML/pickle-safe)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``get(cfg, "train.lr")``: a nested value, or ``default`` where a level is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node
