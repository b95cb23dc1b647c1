"""The search space: dotted config keys -> distributions, validated before any trial starts.

    space:
      model.fusion.name: {choice: [concat, attention, gated, low_rank]}
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.fusion.dim: {choice: [64, 128]}

Every key is checked against the config models by validating the base config with a sample value from its
distribution, so a typo names the key (and the allowed ones) before Ray is even started.
"""

from __future__ import annotations

import math
from typing import Any

from mmfusion.config import ExperimentConfig, apply_overrides, validate_config
from mmfusion.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
FIXED_SECTIONS = ("data.", "tune.", "seed")  # one dataset is preprocessed once and shared by every trial


def _numbers(key: str, kind: str, arg: Any, integer: bool = False) -> tuple[float, float]:
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(x, int | float) for x in arg)):
        raise ConfigError(f"tune.space.{key}: {kind} takes [low, high], got {arg!r}")
    lo, hi = arg
    if integer and not all(isinstance(x, int) for x in arg):
        raise ConfigError(f"tune.space.{key}: randint bounds must be integers, got {arg!r}")
    if not lo < hi:
        raise ConfigError(f"tune.space.{key}: {kind} needs low < high, got {arg!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"tune.space.{key}: loguniform needs low > 0, got {arg!r}")
    return lo, hi


def check_space(space: dict[str, dict[str, Any]], search: str = "random") -> dict[str, tuple[str, Any]]:
    """Validate each entry's form; returns {key: (kind, argument)}."""
    if not space:
        raise ConfigError("tune.space is empty: give at least one dotted key with a distribution")
    parsed: dict[str, tuple[str, Any]] = {}
    for key, spec in space.items():
        if any(key == s or key.startswith(s) for s in FIXED_SECTIONS):
            raise ConfigError(f"tune.space.{key}: data, seed and tune settings are shared by all trials and "
                              "cannot be searched")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"tune.space.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                              f"got {spec!r}")
        (kind, arg), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"tune.space.{key}: unknown distribution {kind!r}; "
                              f"known: {', '.join(DISTRIBUTIONS)}")
        if kind in ("choice", "grid"):
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"tune.space.{key}: {kind} takes a non-empty list, got {arg!r}")
        else:
            _numbers(key, kind, arg, integer=kind == "randint")
        if kind == "grid" and search == "optuna":
            raise ConfigError(f"tune.space.{key}: grid is not supported with tune.search=optuna; use choice")
        parsed[key] = (kind, arg)
    return parsed


def samples(kind: str, arg: Any) -> list[Any]:
    """Representative values of a distribution, to validate the key and the value type up front."""
    if kind in ("choice", "grid"):
        return list(arg)
    lo, hi = arg
    if kind == "randint":
        return [lo, hi - 1]
    if kind == "loguniform":
        return [lo, math.sqrt(lo * hi), hi]
    return [lo, (lo + hi) / 2, hi]


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> ExperimentConfig:
    """The base config with a trial's sampled values applied (as dotted overrides) and validated."""
    overrides = [f"{k}={_yaml_value(v)}" for k, v in values.items()]
    raw = apply_overrides(base, overrides)
    raw.pop("tune", None)
    return validate_config(raw, source="trial config")


def validate_space(base: dict[str, Any], space: dict[str, dict[str, Any]],
                   search: str) -> dict[str, tuple[str, Any]]:
    """Check forms, then every key and each representative value against the config models."""
    parsed = check_space(space, search)
    for key, (kind, arg) in parsed.items():
        for value in samples(kind, arg):
            try:
                trial_config(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key} (value {value!r}) does not fit the config:\n"
                                  + str(e).split("\n", 1)[-1]) from None
    return parsed


def to_ray(parsed: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](arg) for key, (kind, arg) in parsed.items()}


def _yaml_value(v: Any) -> str:
    import json

    return json.dumps(v)  # JSON is YAML: lists, dicts, numbers and strings survive the round trip
