"""`mmfusion model summary`: parameter and FLOP counts checked against hand counts on tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmfusion.cli import main
from mmfusion.config import validate_config
from mmfusion.models.summary import count_parts, summarize


def parse_table(text: str) -> dict[str, tuple[int, int, int]]:
    """part -> (params, trainable, FLOPs/sample) from the printed table."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and (parts[0].startswith("encoders.") or parts[0] in ("fusion", "head", "total")):
            rows[parts[0]] = tuple(int(p.replace(",", "")) for p in parts[1:4])
    return rows


def tiny_config(tmp_path: Path, **sections) -> object:  # noqa: ANN003
    return validate_config({"data": {"path": str(tmp_path / "no-data"), **sections.pop("data")}, **sections})


def test_summary_matches_hand_count_cnn_lstm_concat(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        data={"modalities": ["image", "text"], "image": {"size": 8, "channels": 1},
              "text": {"max_length": 6}},
        model={"encoders": {"image": {"name": "cnn", "channels": [2, 3], "dim": 4},
                            "text": {"name": "lstm", "embed_dim": 3, "hidden": 4, "bidirectional": False,
                                     "dim": 5}},
               "fusion": {"name": "concat", "dim": 6, "hidden": 7}},
    )
    # image 1x8x8: conv 1->2 (3x3, pad 1, no bias) + BatchNorm (weight, bias) on 8x8, pool -> 4x4,
    # conv 2->3 + BatchNorm on 4x4, pool -> 2x2, Linear 12 -> 4
    image_params = (2 * 9 + 2 * 2) + (3 * 2 * 9 + 2 * 3) + (12 * 4 + 4)  # 134
    image_flops = 2 * (8 * 8 * 2 * 1 * 9) + 2 * (4 * 4 * 3 * 2 * 9) + 2 * 12 * 4  # 4128
    # text: embedding 259 x 3; LSTM(3 -> 4) = 4 gates x 4 x (3 + 4) weights + two biases; Linear 4 -> 5
    text_params = 259 * 3 + (16 * 3 + 16 * 4 + 16 + 16) + (4 * 5 + 5)  # 946
    text_flops = 6 * 2 * (3 * 16 + 4 * 16) + 2 * 4 * 5  # 6 tokens, one LSTM step each: 1384
    # concat: placeholders (4 + 5), Linear 9 -> 6; head: Linear 6 -> 7, Linear 7 -> 3
    fusion_params, fusion_flops = (4 + 5) + (9 * 6 + 6), 2 * 9 * 6
    head_params, head_flops = (6 * 7 + 7) + (7 * 3 + 3), 2 * 6 * 7 + 2 * 7 * 3
    expected = {
        "encoders.image": (image_params, image_params, image_flops),
        "encoders.text": (text_params, text_params, text_flops),
        "fusion": (fusion_params, fusion_params, fusion_flops),
        "head": (head_params, head_params, head_flops),
    }
    total_p = sum(v[0] for v in expected.values())
    expected["total"] = (total_p, total_p, sum(v[2] for v in expected.values()))
    assert expected["total"] == (1222, 1222, 5746)

    text = summarize(cfg, num_classes=3)
    assert parse_table(text) == expected
    assert "3 classes" in text and "image (1, 8, 8)" in text and "text 6 tokens (vocab 259)" in text


def test_summary_counts_attention_flops(tmp_path: Path) -> None:
    """A transformer text encoder: scaled-dot-product attention's FLOPs are counted on CPU too."""
    cfg = tiny_config(
        tmp_path,
        data={"modalities": ["text"], "text": {"max_length": 4}},
        model={"encoders": {"text": {"name": "transformer", "dim": 8, "layers": 1, "heads": 2,
                                     "ffn_mult": 2}},
               "fusion": {"name": "concat", "dim": 3, "hidden": 2}},
    )
    L, D, H = 4, 8, 2
    block_params = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * 2 * D + 2 * D) + (2 * D * D + D)
    text_params = 259 * D + L * D + block_params + 2 * D  # embeddings, positions, block, final LayerNorm
    attention = 2 * (2 * H * L * L * (D // H))  # QK^T and attention x V
    text_flops = 2 * L * D * 3 * D + attention + 2 * L * D * D + 2 * (2 * L * D * 2 * D)
    stats = parse_table(summarize(cfg, num_classes=2))
    assert stats["encoders.text"] == (text_params, text_params, text_flops) == (2720, 2720, 4608)
    assert stats["fusion"] == (8 * 3 + 3, 27, 2 * 8 * 3)  # one modality: no placeholders
    assert stats["head"] == (3 * 2 + 2 + 2 * 2 + 2, 14, 2 * 3 * 2 + 2 * 2 * 2)


def test_summary_frozen_backbone_is_not_trainable(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        data={"modalities": ["image"], "image": {"size": 32, "channels": 3, "mean": [0.5], "std": [0.5]}},
        model={"encoders": {"image": {"name": "resnet", "arch": "resnet18", "freeze": True, "dim": 4}}},
    )
    stats = parse_table(summarize(cfg, num_classes=2))
    # torchvision's documented 11.7M, less the classifier
    resnet18_without_fc = 11_689_512 - (512 * 1000 + 1000)
    assert stats["encoders.image"][:2] == (resnet18_without_fc + 512 * 4 + 4, 512 * 4 + 4)


def test_cli_model_summary_on_the_default_config(repo_root: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfusion.config import load_config
    from mmfusion.data.preprocessor import input_spec
    from mmfusion.models.model import build_model
    from mmfusion.models.summary import num_classes_of

    monkeypatch.chdir(repo_root)
    path = repo_root / "jobs" / "configs" / "avt_digits.yaml"
    assert main(["model", "summary", str(path)]) == 0
    out = capsys.readouterr().out
    stats = parse_table(out)
    assert set(stats) == {"encoders.image", "encoders.text", "encoders.audio", "fusion", "head", "total"}
    cfg = load_config(path)
    spec = input_spec(cfg.data)
    model = build_model(cfg.model, spec, num_classes_of(cfg)[0])
    assert stats["total"][0] == sum(p.numel() for p in model.parameters())
    counted = count_parts(model, spec)
    assert {k: (v.params, v.trainable, v.flops) for k, v in counted.items()} == stats
    assert sum(v[2] for k, v in stats.items() if k != "total") == stats["total"][2] > 0
    assert main(["model", "summary", str(path), "model.fusion.name=nope"]) == 2
    err = capsys.readouterr().err
    assert "model.fusion.name" in err and "'nope'" in err and "low_rank" in err
