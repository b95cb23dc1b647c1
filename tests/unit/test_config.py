"""Config: YAML + dotted overrides, strict keys with helpful errors, one parse point."""

from pathlib import Path

import pytest

from mmfusion.cli import main
from mmfusion.config import ExperimentConfig, apply_overrides, load_config
from mmfusion.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "jobs" / "configs" / "avt_digits.yaml"


def test_default_config_loads_with_typed_sections():
    cfg = load_config(DEFAULT)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.modalities == ["image", "text", "audio"]
    assert cfg.model.encoders.image.name == "cnn"
    assert cfg.data.audio.sample_rate == 8000


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_config(DEFAULT, ["model.fusion.name=gated", "optim.lr=3e-4", "data.modalities=[audio, image]",
                                "train.early_stopping_patience=null",
                                "model.encoders.text={name: transformer, dim: 64}"])
    assert cfg.model.fusion.name == "gated"
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.modalities == ["image", "audio"]  # canonical order
    assert cfg.train.early_stopping_patience is None
    assert cfg.model.encoders.text.name == "transformer"
    assert cfg.model.encoders.text.dim == 64


def test_switching_encoder_name_drops_the_old_types_keys_in_any_order():
    # the base's lstm has embed_dim/hidden; a transformer keeps only the keys it also has (dim, dropout)
    for overrides in (["model.encoders.text.name=transformer", "model.encoders.text.dim=64"],
                      ["model.encoders.text.dim=64", "model.encoders.text.name=transformer"]):
        text = load_config(DEFAULT, overrides).model.encoders.text
        assert text.name == "transformer" and text.dim == 64
    # a name that is no type still fails, listing the known ones
    with pytest.raises(ConfigError, match="'transformer'"):
        load_config(DEFAULT, ["model.encoders.text.name=gpt"])
    # sections with one type for all names merge: sgd keeps the base's lr
    cfg = load_config(DEFAULT, ["optim.name=sgd", "model.fusion.name=gated"])
    assert cfg.optim.lr == load_config(DEFAULT).optim.lr and cfg.model.fusion.dropout == 0.2


def test_base_file_switching_the_encoder_type_replaces_the_section(tmp_path):
    (tmp_path / "hf.yaml").write_text(
        f"base: {DEFAULT}\nmodel:\n  encoders:\n    text: {{name: hf, pretrained: /models/minilm}}\n"
        "    image: {dim: 32}\n")
    enc = load_config(tmp_path / "hf.yaml").model.encoders
    assert enc.text.model_dump() == {"name": "hf", "pretrained": "/models/minilm", "freeze": True,
                                     "dim": None}
    assert enc.image.channels == [32, 64] and enc.image.dim == 32  # same type: merged key by key
    (tmp_path / "lstm.yaml").write_text(
        f"base: {DEFAULT}\nmodel: {{encoders: {{text: {{name: lstm, hidden: 8}}}}}}\n")
    text = load_config(tmp_path / "lstm.yaml").model.encoders.text
    assert text.hidden == 8 and text.embed_dim == 64  # the base's other lstm keys stay


def test_imbalance_and_learning_rate_options_validate():
    cfg = load_config(DEFAULT, ["optim.class_weights=balanced", "optim.label_smoothing=0.1",
                                "optim.encoder_lr={image: 1.0e-4}"])
    assert cfg.optim.class_weights == "balanced" and cfg.optim.encoder_lr == {"image": 1e-4}
    assert load_config(DEFAULT, ["optim.encoder_lr=5e-4"]).optim.encoder_lr == 5e-4
    for bad in ("optim.label_smoothing=1.0", "optim.class_weights=inverse", "optim.encoder_lr=-1",
                "optim.encoder_lr={smell: 0.1}"):
        with pytest.raises(ConfigError):
            load_config(DEFAULT, [bad])


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["model.fusion.nme=gated"])
    msg = str(e.value)
    assert "model.fusion.nme: unknown key" in msg
    assert "name" in msg and "rank" in msg


def test_unknown_key_inside_encoder_union_hides_the_tag():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["model.encoders.image.widht=3"])
    msg = str(e.value)
    assert "model.encoders.image.widht: unknown key" in msg
    assert "channels" in msg


def test_unknown_encoder_name_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["model.encoders.audio={name: wavenet}"])
    assert "'cnn'" in str(e.value) and "'hf'" in str(e.value)


@pytest.mark.parametrize("bad", ["optim.lr=-1", "data.modalities=[]", "data.modalities=[smell]",
                                 "train.num_workers=0", "model.modality_dropout={video: 0.1}"])
def test_invalid_values_are_config_errors(bad):
    with pytest.raises(ConfigError):
        load_config(DEFAULT, [bad])


def test_single_modality_override_keeps_the_rest_valid():
    # the README's single-modality baselines are the default config plus one override
    cfg = load_config(DEFAULT, ["data.modalities=[image]"])
    assert cfg.data.modalities == ["image"]
    with pytest.raises(ConfigError, match="modality_dropout.image"):
        load_config(DEFAULT, ["model.modality_dropout.image=1.5"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEFAULT, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(REPO / "nope.yaml")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_non_mapping_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_cli_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(DEFAULT), "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "fusion:" in out


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", "show", str(DEFAULT), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "mmfusion: error:" in err and "optim.lrr" in err and "Traceback" not in err


def test_base_file_is_merged_under_the_including_file(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {DEFAULT}\noptim: {{lr: 0.5}}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.optim.lr == 0.5
    assert cfg.optim.weight_decay == load_config(DEFAULT).optim.weight_decay  # the rest comes from the base
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="nested"):
        load_config(tmp_path / "loop.yaml")
