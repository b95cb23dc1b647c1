"""Fusion operators and FusionModel: every encoder x fusion combination over every non-empty modality subset.

For each (encoder set, fusion, subset) the built model must give (B, num_classes) finite logits for any
presence pattern, send gradients to every trainable parameter, and ignore masked modalities exactly:
replacing a masked input by noise leaves the logits bit-for-bit unchanged (eval mode, and train mode under
the same seed).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfusion.batch import InputSpec
from mmfusion.config import ModelConfig
from mmfusion.errors import ConfigError
from mmfusion.models.fusion import (
    AttentionFusion,
    ConcatFusion,
    GatedFusion,
    LateFusion,
    LowRankFusion,
    TensorFusion,
)
from mmfusion.models.model import ENCODERS, FUSIONS, FusionModel, build_model

ALL = ("image", "text", "audio")
SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(ALL, r)]
FUSION_NAMES = ["concat", "attention", "gated", "tensor", "low_rank", "late"]
NUM_CLASSES = 5


def spec_for(mods: tuple[str, ...]) -> InputSpec:
    return InputSpec(modalities=mods, image_shape=(1, 8, 8), vocab_size=259, pad_id=0, max_text_len=12,
                     audio_shape=(1, 16, 24))  # 16 mel bins x 24 frames: the tiny AST's input


def presence_patterns(m: int, repeat: int = 1) -> torch.Tensor:
    """(repeat * (2^m - 1), m) bool: every non-empty presence pattern, so each modality is missing
    somewhere."""
    rows = [p for p in itertools.product([True, False], repeat=m) if any(p)]
    return torch.tensor(rows * repeat, dtype=torch.bool)


def make_batch(spec: InputSpec, present: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Collated batch per the contract: absent modalities have zeros, as the data pipeline sends them."""
    g = torch.Generator().manual_seed(seed)
    b = present.shape[0]
    batch: dict[str, torch.Tensor] = {"present": present.clone()}
    for i, m in enumerate(spec.modalities):
        col = present[:, i]
        if m == "image":
            batch["image"] = torch.randn(b, *spec.image_shape, generator=g) * col.view(b, 1, 1, 1)
        elif m == "audio":
            batch["audio"] = torch.randn(b, *spec.audio_shape, generator=g) * col.view(b, 1, 1, 1)
        else:
            lengths = torch.randint(3, spec.max_text_len + 1, (b,), generator=g) * col
            mask = (torch.arange(spec.max_text_len) < lengths[:, None]).long()
            batch["text"] = torch.randint(3, spec.vocab_size, (b, spec.max_text_len), generator=g) * mask
            batch["text_mask"] = mask
    return batch


def with_noise_in_masked(batch: dict[str, torch.Tensor], spec: InputSpec) -> dict[str, torch.Tensor]:
    """The same batch with random garbage wherever a modality is marked missing."""
    g = torch.Generator().manual_seed(123)
    out = dict(batch)
    for i, m in enumerate(spec.modalities):
        miss = ~batch["present"][:, i]
        keys = ("text", "text_mask") if m == "text" else (m,)
        for k in keys:
            x = batch[k]
            noise = (torch.randint(1, spec.vocab_size, x.shape, generator=g) if k == "text"
                     else torch.ones_like(x) if k == "text_mask" else torch.randn(x.shape, generator=g) * 5)
            out[k] = torch.where(miss.view(-1, *[1] * (x.dim() - 1)), noise, x)
    return out


# ------------------------------------------------------------------------------ fusion operators alone


def make_fusion(name: str, dims: dict[str, int]):  # noqa: ANN201
    return {
        "concat": lambda: ConcatFusion(dims, out_dim=8, dropout=0.0),
        "attention": lambda: AttentionFusion(dims, out_dim=8, heads=2, dropout=0.0),
        "gated": lambda: GatedFusion(dims, out_dim=8, dropout=0.0),
        "tensor": lambda: TensorFusion(dims, out_dim=8, tensor_dim=3, dropout=0.0),
        "low_rank": lambda: LowRankFusion(dims, out_dim=8, rank=3, dropout=0.0),
        "late": lambda: LateFusion(dims, num_classes=NUM_CLASSES, hidden=8, dropout=0.0),
    }[name]()


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_fusion_operator_masks_exactly(name: str) -> None:
    torch.manual_seed(0)
    dims = {"image": 6, "text": 4, "audio": 5}
    fusion = make_fusion(name, dims).eval()
    present = presence_patterns(3)
    feats = {m: torch.randn(len(present), d) for m, d in dims.items()}
    out = fusion(feats, present)
    assert out.shape == (len(present), fusion.out_dim) and torch.isfinite(out).all()
    noisy = {m: torch.where(present[:, i : i + 1], f, torch.randn_like(f) * 100) for i, (m, f) in
             enumerate(feats.items())}
    assert torch.equal(out, fusion(noisy, present))
    # a present modality does matter
    changed = dict(feats, text=feats["text"] + 1.0)
    assert not torch.allclose(out[present[:, 1]], fusion(changed, present)[present[:, 1]])
    # a row with nothing present is invalid input but still finite
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.isfinite(fusion({m: torch.randn(2, d) for m, d in dims.items()}, empty)).all()


def test_late_fusion_averages_present_logits() -> None:
    torch.manual_seed(0)
    dims = {"image": 3, "audio": 2}
    fusion = LateFusion(dims, num_classes=4, hidden=5, dropout=0.0).eval()
    feats = {m: torch.randn(3, d) for m, d in dims.items()}
    present = torch.tensor([[True, True], [True, False], [False, True]])
    li, la = fusion.heads["image"](feats["image"]), fusion.heads["audio"](feats["audio"])
    expected = torch.stack([(li[0] + la[0]) / 2, li[1], la[2]])
    assert torch.allclose(fusion(feats, present), expected)


def test_gated_fusion_two_modalities_is_a_convex_mix() -> None:
    torch.manual_seed(0)
    fusion = GatedFusion({"image": 3, "text": 3}, out_dim=4, dropout=0.0).eval()
    feats = {"image": torch.randn(2, 3), "text": torch.randn(2, 3)}
    out = fusion(feats, torch.ones(2, 2, dtype=torch.bool))
    hi, ht = (torch.tanh(fusion.hidden["image"](feats["image"])),
              torch.tanh(fusion.hidden["text"](feats["text"])))
    z = (out - ht) / (hi - ht)  # per feature, the gate weight on the image
    assert ((z > 0) & (z < 1)).all()
    only_image = fusion(feats, torch.tensor([[True, False], [True, False]]))
    assert torch.allclose(only_image, hi)  # missing text: all weight on the image


# ----------------------------------------------------------------- encoder x fusion x subset matrix


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from test_encoders import save_tiny_hf_models

    return save_tiny_hf_models(tmp_path_factory.mktemp("hf"))


def encoder_sets(hf: dict[str, str]) -> dict[str, dict]:
    """Three encoder sets that together cover every registered encoder."""
    return {
        "small": {"image": {"name": "cnn", "channels": [4, 8], "dim": 12},
                  "text": {"name": "lstm", "embed_dim": 8, "hidden": 8, "dim": 12},
                  "audio": {"name": "cnn", "channels": [4, 8], "dim": 12}},
        "mixed": {"image": {"name": "resnet", "arch": "resnet18", "dim": 12},
                  "text": {"name": "transformer", "dim": 16, "layers": 1, "heads": 2},
                  "audio": {"name": "hf", "pretrained": hf["ast"], "freeze": False, "dim": 12}},
        "hf": {"image": {"name": "hf", "pretrained": hf["vit"], "freeze": False, "dim": 12},
               "text": {"name": "hf", "pretrained": hf["bert"], "freeze": False},
               "audio": {"name": "cnn", "channels": [4], "dim": 8}},
    }


def test_encoder_sets_cover_the_registry(hf: dict[str, str]) -> None:
    used = {(m, enc[m]["name"]) for enc in encoder_sets(hf).values() for m in ALL}
    assert used == {(m, n) for m, names in ENCODERS.items() for n in names}


@pytest.mark.parametrize("encoders", ["small", "mixed", "hf"])
@pytest.mark.parametrize("fusion", FUSION_NAMES)
@pytest.mark.parametrize("mods", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_model_matrix(hf: dict[str, str], encoders: str, fusion: str, mods: tuple[str, ...]) -> None:
    spec = spec_for(mods)
    enc_cfg = encoder_sets(hf)[encoders]
    cfg = ModelConfig.model_validate({
        "encoders": {m: enc_cfg[m] for m in mods},
        # hidden 16: with 8 head units, an init whose 8 biases are all negative (1 in 256) leaves every
        # ReLU off on the small fused values of low_rank fusion, and no gradient flows
        "fusion": {"name": fusion, "dim": 8, "hidden": 16, "heads": 2, "rank": 2, "tensor_dim": 3,
                   "dropout": 0.1},
    })
    torch.manual_seed(0)
    model = build_model(cfg, spec, NUM_CLASSES)
    assert model.modalities == mods
    present = presence_patterns(len(mods), repeat=2 if len(mods) == 1 else 1)  # >= 2 rows per modality
    batch = make_batch(spec, present)
    b = present.shape[0]

    # train mode: gradients reach every trainable parameter
    model.train()
    logits = model(batch)
    assert logits.shape == (b, NUM_CLASSES) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n, p in trainable if p.grad is None]
    dead = [n for n, p in trainable if ".backbone." not in n and not p.grad.abs().sum() > 0]
    assert not dead, f"zero gradient for {dead}"

    # masked modalities have no influence, in eval mode and in train mode (same seed)
    noisy = with_noise_in_masked(batch, spec)
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            torch.manual_seed(1)
            a = model(batch)
            torch.manual_seed(1)
            c = model(noisy)
        assert torch.equal(a, c), f"a masked modality changed the logits (train={train})"

    # the last modality missing from the whole batch (zeros, present=False): still finite. In train mode its
    # encoder runs on the zeros (kept in the graph for DDP); in eval mode it is skipped.
    if len(mods) > 1:
        p = torch.ones(3, len(mods), dtype=torch.bool)
        p[:, -1] = False
        for train in (True, False):
            with torch.no_grad():
                assert torch.isfinite(model.train(train)(make_batch(spec, p, seed=2))).all()
    assert torch.equal(batch["present"], present)  # the caller's batch is untouched


# ------------------------------------------------------------------------------------- FusionModel


def small_model(dropout: dict[str, float] | None = None, fusion: str = "concat",
                ) -> tuple[FusionModel, InputSpec]:
    spec = spec_for(ALL)
    cfg = ModelConfig.model_validate({
        "encoders": {"image": {"name": "cnn", "channels": [4], "dim": 8},
                     "text": {"name": "lstm", "embed_dim": 4, "hidden": 4, "dim": 8},
                     "audio": {"name": "cnn", "channels": [4], "dim": 8}},
        "fusion": {"name": fusion, "dim": 8, "hidden": 8},
        "modality_dropout": dropout or {},
    })
    return build_model(cfg, spec, NUM_CLASSES), spec


def test_modality_dropout_train_only_never_empties_a_row() -> None:
    torch.manual_seed(0)
    model, spec = small_model({"image": 0.5, "text": 0.5, "audio": 0.5})
    present = torch.ones(4000, 3, dtype=torch.bool)
    present[::3, 1] = False
    model.train()
    dropped = model.drop_modalities(present)
    assert dropped.any(dim=1).all()  # never all of a row's bits
    assert not (dropped & ~present).any()  # only clears bits
    rate = 1 - dropped[:, 0].float().mean().item()
    assert 0.3 < rate < 0.5  # ~0.5, less the rows that would have lost everything
    assert torch.equal(present[::3, 1], torch.zeros(len(present[::3]), dtype=torch.bool))

    batch = make_batch(spec, presence_patterns(3))
    before = {k: v.clone() for k, v in batch.items()}
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), model(batch))  # eval: no dropout, deterministic
    model.train()
    model(batch)
    assert all(torch.equal(before[k], batch[k]) for k in batch)  # the caller's batch is never mutated


def test_modality_dropout_per_modality() -> None:
    torch.manual_seed(0)
    model, _ = small_model({"audio": 0.4})
    dropped = model.drop_modalities(torch.ones(5000, 3, dtype=torch.bool))
    assert dropped[:, :2].all()
    assert 0.35 < 1 - dropped[:, 2].float().mean().item() < 0.45


def test_encode_and_fuse_match_forward() -> None:
    """Serve's split topology (encoder deployments -> fusion deployment) gives the same logits."""
    torch.manual_seed(0)
    model, spec = small_model(fusion="gated")
    model.eval()
    batch = make_batch(spec, presence_patterns(3))
    with torch.no_grad():
        full = model(batch)
        feats = {m: model.encode(m, batch) for m in model.modalities}
        assert all(f.shape == (7, 8) for f in feats.values())
        assert torch.allclose(model.fuse(feats, batch["present"]), full, atol=1e-6)
        # a request with only image and text: audio may be left out of feats when no row has it
        p = torch.tensor([[True, True, False]])
        one = {m: model.encode(m, {k: v[:1] for k, v in batch.items()}) for m in ("image", "text")}
        sub = {k: v[:1] for k, v in batch.items() if not k.startswith("audio")} | {"present": p}
        assert torch.allclose(model.fuse(one, p), model(sub), atol=1e-6)
        with pytest.raises(ValueError, match="marked present"):
            model.fuse(one, torch.ones(1, 3, dtype=torch.bool))


def test_forward_without_present_key_infers_it() -> None:
    model, spec = small_model()
    model.eval()
    batch = make_batch(spec, torch.ones(2, 3, dtype=torch.bool))
    del batch["present"]
    with torch.no_grad():
        full = model(batch)
        no_audio = model({k: v for k, v in batch.items() if k != "audio"})
    assert full.shape == no_audio.shape == (2, NUM_CLASSES)
    assert not torch.allclose(full, no_audio)
    with pytest.raises(ValueError, match="present"):
        model({**batch, "present": torch.ones(2, 2, dtype=torch.bool)})


def test_unknown_names_list_the_known_ones() -> None:
    spec = spec_for(ALL)
    cfg = ModelConfig()
    # past the config's own check, as a plugin might
    cfg.fusion = cfg.fusion.model_copy(update={"name": "sum"})
    with pytest.raises(ConfigError, match="known: concat, attention, gated, tensor, low_rank, late"):
        build_model(cfg, spec, NUM_CLASSES)
    assert list(FUSIONS) == FUSION_NAMES
    with pytest.raises(ConfigError, match="divisible"):
        build_model(ModelConfig.model_validate({"fusion": {"name": "attention", "dim": 10, "heads": 4}}),
                    spec, 3)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_model(ModelConfig(), spec, 1)


def test_registries_are_plain_dicts() -> None:
    assert type(FUSIONS) is dict and type(ENCODERS) is dict
    assert set(ENCODERS) == set(ALL) and all(type(v) is dict for v in ENCODERS.values())
