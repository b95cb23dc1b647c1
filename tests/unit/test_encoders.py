"""Encoders: shapes, finiteness on missing (all-zero) input, gradients, freezing, weight loading, errors.

Hugging Face encoders are tested offline: tiny models are created from a transformers config and saved to a
temporary folder, then loaded by path exactly as a user's local model would be.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmfusion.batch import InputSpec
from mmfusion.config import (
    CnnAudioEncoderConfig,
    CnnImageEncoderConfig,
    HfEncoderConfig,
    ResnetImageEncoderConfig,
    RnnTextEncoderConfig,
    TransformerTextEncoderConfig,
)
from mmfusion.errors import ConfigError
from mmfusion.models.encoders.image import ResnetImageEncoder, _torchvision_weights
from mmfusion.models.model import ENCODERS

SPEC = InputSpec(modalities=("image", "text", "audio"), image_shape=(1, 16, 16), vocab_size=259, pad_id=0,
                 max_text_len=12, audio_shape=(1, 16, 24))
B = 3


def save_tiny_hf_models(root: Path) -> dict[str, str]:
    """Tiny random HF models (vision, text, audio) saved with save_pretrained; returns name -> folder."""
    from transformers import (
        ASTConfig,
        ASTModel,
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTModel,
    )

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    models = {
        "vit": ViTModel(ViTConfig(**small, intermediate_size=32, image_size=16, patch_size=8)),
        "dinov2": Dinov2Model(Dinov2Config(**small, mlp_ratio=2, image_size=16, patch_size=8)),
        "clip": CLIPModel(CLIPConfig(
            text_config=dict(**small, vocab_size=300, intermediate_size=32,
                             max_position_embeddings=16),
            vision_config=dict(**small, intermediate_size=32, image_size=16, patch_size=8),
            projection_dim=8)),
        "bert": BertModel(BertConfig(**small, vocab_size=300, intermediate_size=32,
                                     max_position_embeddings=16)),
        "bert_small_vocab": BertModel(BertConfig(**small, vocab_size=100, intermediate_size=32,
                                                 max_position_embeddings=16)),
        # 16 mel bins x 24 frames: patches of 16 with stride 8 -> 1 x 2 patches
        "ast": ASTModel(ASTConfig(**small, intermediate_size=32, num_mel_bins=16, max_length=24,
                                  patch_size=16, frequency_stride=8, time_stride=8)),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_tiny_hf_models(tmp_path_factory.mktemp("hf"))


def inputs(modality: str, zeros: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        x = torch.randn(B, *SPEC.image_shape, generator=g)
        return (torch.zeros_like(x) if zeros else x,)
    if modality == "audio":
        x = torch.randn(B, *SPEC.audio_shape, generator=g)
        return (torch.zeros_like(x) if zeros else x,)
    ids = torch.randint(3, SPEC.vocab_size, (B, SPEC.max_text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a shorter text
    ids = ids * mask
    if zeros:
        return torch.zeros_like(ids), torch.zeros_like(mask)
    return ids, mask


def build(modality: str, cfg) -> nn.Module:  # noqa: ANN001
    return ENCODERS[modality][cfg.name](cfg, SPEC, True)


def encoder_cases(hf: dict[str, str]) -> list[tuple[str, object]]:
    return [
        ("image", CnnImageEncoderConfig(channels=[4, 8], dim=12)),
        ("image", ResnetImageEncoderConfig(arch="resnet18", dim=12)),
        ("image", HfEncoderConfig(pretrained=hf["vit"], freeze=False, dim=12)),
        ("image", HfEncoderConfig(pretrained=hf["dinov2"], freeze=False)),
        ("image", HfEncoderConfig(pretrained=hf["clip"], freeze=False)),
        ("text", RnnTextEncoderConfig(cell="lstm", embed_dim=8, hidden=8, dim=12)),
        ("text", RnnTextEncoderConfig(cell="gru", embed_dim=8, hidden=8, layers=2, bidirectional=False,
                                      dim=12)),
        ("text", TransformerTextEncoderConfig(dim=16, layers=2, heads=2)),
        ("text", HfEncoderConfig(pretrained=hf["bert"], freeze=False, dim=12)),
        ("text", HfEncoderConfig(pretrained=hf["clip"], freeze=False)),
        ("audio", CnnAudioEncoderConfig(channels=[4, 8], dim=12)),
        ("audio", HfEncoderConfig(pretrained=hf["ast"], freeze=False, dim=12)),
    ]


CASE_IDS = ["image-cnn", "image-resnet", "image-hf-vit", "image-hf-dinov2", "image-hf-clip", "text-lstm",
            "text-gru", "text-transformer", "text-hf-bert", "text-hf-clip", "audio-cnn", "audio-hf-ast"]


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_encoder_shape_finite_gradients(hf: dict[str, str], case: int) -> None:
    modality, cfg = encoder_cases(hf)[case]
    torch.manual_seed(0)
    enc = build(modality, cfg)
    x = inputs(modality)
    enc.train()
    out = enc(*x)
    assert out.shape == (B, enc.out_dim)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable
    assert not [n for n, p in trainable if p.grad is None], "some parameters are outside the autograd graph"
    # Our own layers must get a non-zero gradient; inside a pretrained transformer some legitimately get
    # exactly zero (an attention key bias cannot change a softmax), so there the whole backbone is checked.
    ours = [n for n, p in trainable if not n.startswith("backbone.") and not p.grad.abs().sum() > 0]
    assert not ours, f"zero gradient for {ours}"
    assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0

    enc.eval()
    with torch.no_grad():
        zero = enc(*inputs(modality, zeros=True))  # a batch that lacks the modality entirely
        other = enc(*inputs(modality, seed=1))
        again = enc(*x)
    assert zero.shape == (B, enc.out_dim) and torch.isfinite(zero).all()
    assert not torch.allclose(again, other), "the embedding does not depend on the input"


@pytest.mark.parametrize("case", [5, 6, 7, 8], ids=[CASE_IDS[i] for i in (5, 6, 7, 8)])
def test_text_padding_is_ignored(hf: dict[str, str], case: int) -> None:
    modality, cfg = encoder_cases(hf)[case]
    enc = build(modality, cfg).eval()
    ids, mask = inputs("text")
    noisy = ids.clone()
    noisy[mask == 0] = 7  # garbage where the mask says padding
    with torch.no_grad():
        assert torch.allclose(enc(ids, mask), enc(noisy, mask), atol=1e-6)


def test_hf_frozen_encoder_keeps_eval_mode_and_trains_only_projection(hf: dict[str, str]) -> None:
    for modality, name in (("image", "vit"), ("text", "bert"), ("audio", "ast")):
        enc = build(modality, HfEncoderConfig(pretrained=hf[name], freeze=True, dim=12))
        enc.train()
        assert enc.training and not enc.backbone.training
        assert not any(p.requires_grad for p in enc.backbone.parameters())
        enc(*inputs(modality)).sum().backward()
        assert all(p.grad is not None for p in enc.proj.parameters())
        assert all(p.grad is None for p in enc.backbone.parameters())


def test_hf_unused_parameters_are_frozen(hf: dict[str, str]) -> None:
    enc = build("image", HfEncoderConfig(pretrained=hf["dinov2"], freeze=False))
    assert not enc.backbone.embeddings.mask_token.requires_grad  # only used by masked-image pretraining
    assert enc.backbone.embeddings.cls_token.requires_grad
    text = build("text", HfEncoderConfig(pretrained=hf["bert"], freeze=False))
    assert not any(p.requires_grad for p in text.backbone.pooler.parameters())  # we mean-pool


def test_hf_tower_of_dual_model(hf: dict[str, str]) -> None:
    img = build("image", HfEncoderConfig(pretrained=hf["clip"]))
    txt = build("text", HfEncoderConfig(pretrained=hf["clip"]))
    assert type(img.backbone).__name__.startswith("CLIPVision")
    assert type(txt.backbone).__name__.startswith("CLIPText")


def test_hf_architecture_only_then_state_dict_matches(hf: dict[str, str]) -> None:
    """load_weights=False (artifact loading) builds the same modules; the saved state dict restores them."""
    for modality, name in (("image", "vit"), ("text", "bert"), ("audio", "ast")):
        cfg = HfEncoderConfig(pretrained=hf[name], freeze=False, dim=12)
        a = build(modality, cfg).eval()
        b = ENCODERS[modality]["hf"](cfg, SPEC, False).eval()
        x = inputs(modality)
        with torch.no_grad():
            assert not torch.allclose(a(*x), b(*x))
            b.load_state_dict(a.state_dict(), strict=True)
            assert torch.allclose(a(*x), b(*x))


def test_hf_errors(hf: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        build("image", HfEncoderConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="raw-waveform"):
        build("audio", HfEncoderConfig(pretrained=hf["bert"]))
    spec = InputSpec(modalities=("audio",), audio_shape=(1, 40, 24))
    with pytest.raises(ConfigError, match="num_mel_bins=16"):
        ENCODERS["audio"]["hf"](HfEncoderConfig(pretrained=hf["ast"]), spec, True)
    with pytest.raises(ConfigError, match="tokenizer"):
        build("text", HfEncoderConfig(pretrained=hf["bert_small_vocab"]))


def test_resnet_weights_from_local_files(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = torchvision.models.resnet18()
    torch.save(src.state_dict(), tmp_path / "r18.pt")  # torchvision layout, fc included
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    for name in ("r18.pt", "r18.safetensors"):
        enc = ResnetImageEncoder("resnet18", in_channels=1, weights=str(tmp_path / name))
        for k, v in enc.backbone.state_dict().items():
            assert torch.equal(v, src.state_dict()[k]), k
    skipped = ResnetImageEncoder("resnet18", weights=str(tmp_path / "r18.pt"), load_weights=False)
    assert not torch.equal(skipped.backbone.conv1.weight, src.conv1.weight)

    with pytest.raises(ConfigError, match="do not fit|do not match"):
        ResnetImageEncoder("resnet34", weights=str(tmp_path / "r18.pt"))
    with pytest.raises(ConfigError, match="not found"):
        ResnetImageEncoder("resnet18", weights=str(tmp_path / "missing.pt"))


def test_resnet_frozen_and_named_weights() -> None:
    enc = ResnetImageEncoder("resnet18", in_channels=3, freeze=True, dim=8)
    enc.train()
    assert not enc.backbone.training and enc.backbone.bn1.training is False
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]
    before = enc.backbone.bn1.running_mean.clone()
    enc(torch.randn(4, 3, 16, 16))
    assert torch.equal(before, enc.backbone.bn1.running_mean)  # frozen BatchNorm statistics stay put
    # torchvision's named weights resolve without a download (the download happens only at build time)
    assert _torchvision_weights("resnet18", "IMAGENET1K_V1").name == "IMAGENET1K_V1"
    assert _torchvision_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2").name == "IMAGENET1K_V2"
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        _torchvision_weights("resnet18", "IMAGENET_V9")


def test_cnn_rejects_empty_channel_list() -> None:
    with pytest.raises(ConfigError, match="conv stage"):
        build("image", CnnImageEncoderConfig(channels=[], dim=8))


def test_cnn_stacks_normalize_whatever_the_input_scale() -> None:
    """BatchNorm after every conv: activations keep unit scale on badly scaled inputs (RGB with a rough
    mean/std, log-mel in dB), and eval mode (running statistics) serves a batch of one."""
    from mmfusion.models.encoders import ConvStack

    torch.manual_seed(0)
    stack = ConvStack(3, (64, 64), [8, 16, 32], dim=16, dropout=0.0)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stack.features) == 3
    x = torch.rand(8, 3, 64, 64) * 40.0 + 100.0  # far from zero-mean, unit-variance
    stack.train()
    for scale in (1.0, 1e3):
        out = stack(x * scale)
        assert torch.isfinite(out).all() and 0.01 < float(out.detach().std()) < 10.0
    stack.eval()
    assert stack(x[:1]).shape == (1, 16)
