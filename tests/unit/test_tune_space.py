"""The search space is checked before any trial (or Ray) starts, naming the key."""

import pytest
from tests.helpers import DEFAULT_CONFIG, REPO

from mmfusion.config import read_yaml
from mmfusion.errors import ConfigError
from mmfusion.tune.space import check_space, trial_config, validate_space

BASE = read_yaml(DEFAULT_CONFIG)


def test_shipped_tune_config_validates():
    raw = read_yaml(REPO / "jobs" / "configs" / "tune_avt_digits.yaml")
    parsed = validate_space(raw, raw["tune"]["space"], raw["tune"]["search"])
    assert parsed["model.fusion.name"][0] == "choice"
    assert parsed["optim.lr"] == ("loguniform", [3e-4, 5e-3])


@pytest.mark.parametrize("space, needle", [
    ({"optim.lrr": {"choice": [0.1]}}, "tune.space.optim.lrr"),
    ({"model.fusion.nam": {"choice": ["gated"]}}, "model.fusion.nam: unknown key"),
    ({"optim.lr": {"logunifrom": [1e-4, 1e-2]}}, "unknown distribution 'logunifrom'"),
    ({"optim.lr": {"loguniform": [0, 1e-2]}}, "loguniform needs low > 0"),
    ({"optim.lr": {"uniform": [0.1, 0.01]}}, "low < high"),
    ({"optim.lr": {"uniform": 0.1}}, "takes [low, high]"),
    ({"train.epochs": {"randint": [1.5, 3]}}, "integers"),
    ({"model.fusion.name": {"choice": []}}, "non-empty list"),
    ({"model.fusion.name": {"choice": ["concat", "nope"]}}, "nope"),
    ({"optim.lr": {"choice": [1e-3], "uniform": [0, 1]}}, "expected one of"),
    ({"data.image.size": {"choice": [28, 32]}}, "shared by all trials"),
])
def test_bad_spaces_name_the_key(space, needle):
    with pytest.raises(ConfigError) as e:
        validate_space(BASE, space, "random")
    assert needle in str(e.value)


def test_grid_is_refused_with_optuna():
    with pytest.raises(ConfigError, match="grid is not supported"):
        check_space({"optim.lr": {"grid": [1e-3, 1e-2]}}, "optuna")


def test_trial_config_applies_values_and_drops_the_tune_section():
    raw = {**BASE, "tune": {"space": {"optim.lr": {"choice": [0.1]}}}}
    cfg = trial_config(raw, {"optim.lr": 0.1, "model.fusion.name": "gated", "model.encoders.image":
                             {"name": "cnn", "channels": [8], "dim": 16}})
    assert cfg.optim.lr == 0.1 and cfg.model.fusion.name == "gated" and cfg.tune is None
    assert cfg.model.encoders.image.channels == [8]
