"""Per-modality preprocessing: shapes, dtypes, values, determinism, and DecodeError on bad input."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmfusion.config import (
    AudioPreprocessConfig,
    AudioStats,
    DataConfig,
    ImagePreprocessConfig,
    TextPreprocessConfig,
)
from mmfusion.data.audio import STD_FLOOR, audio_batch, fit_stats, preprocess_audio
from mmfusion.data.image import preprocess_image
from mmfusion.data.preprocessor import Preprocessor, input_spec
from mmfusion.data.text import ByteTokenizer, load_tokenizer, preprocess_text
from mmfusion.errors import ConfigError, DataError, DecodeError


def png(value: int = 128, size: tuple[int, int] = (20, 20), mode: str = "L", fmt: str = "PNG") -> bytes:
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def noise_png(seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def wav(samples: np.ndarray, sr: int = 8000, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def tone(seconds: float = 0.5, sr: int = 8000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- image


def test_image_shape_dtype_and_normalization():
    cfg = ImagePreprocessConfig(size=28, channels=1, mean=[0.5], std=[0.5])
    x = preprocess_image(png(255, (28, 28)), cfg)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0, atol=1e-6)  # (1.0 - 0.5) / 0.5
    y = preprocess_image(png(0, (20, 33)), cfg)  # resized to the square size
    assert y.shape == (1, 28, 28)
    np.testing.assert_allclose(y, -1.0, atol=1e-6)


def test_image_rgb_per_channel_stats_and_jpeg():
    cfg = ImagePreprocessConfig(size=16, channels=3, mean=[0.0, 0.5, 1.0], std=[1.0, 1.0, 1.0])
    x = preprocess_image(png(255, (10, 10), mode="RGB", fmt="JPEG"), cfg)
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), [1.0, 0.5, 0.0], atol=0.02)
    gray_as_rgb = preprocess_image(png(255, (10, 10)), cfg)  # grayscale input converted to 3 channels
    assert gray_as_rgb.shape == (3, 16, 16)


def rgba_png(stored: tuple[int, int, int] = (255, 0, 0), mode: str = "RGBA") -> bytes:
    """A real 8x8 PNG: the left half an opaque mid-gray (128), the right half fully transparent pixels that
    still store the colour `stored` (as an editor that erased them leaves it)."""
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[:, :4] = (128, 128, 128, 255)
    arr[:, 4:] = (*stored, 0)
    im = Image.fromarray(arr, mode="RGBA")
    if mode == "LA":
        im = im.convert("LA")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_show_the_background_not_their_stored_colour(mode: str):
    data = rgba_png((255, 0, 0), mode)
    with Image.open(io.BytesIO(data)) as im:  # the file really keeps the hidden colour under alpha 0
        hidden = im.getpixel((6, 6))  # red, or its luma 76 in LA
        assert im.mode == mode and hidden[-1] == 0 and hidden[0] == (255 if mode == "RGBA" else 76)
    cfg = ImagePreprocessConfig(size=8, channels=3, mean=[0.0], std=[1.0])  # default background: white
    x = preprocess_image(data, cfg)  # (3, 8, 8) in [0, 1]
    np.testing.assert_allclose(x[:, :, :4], 128 / 255, atol=1e-6)  # opaque pixels unchanged
    np.testing.assert_allclose(x[:, :, 4:], 1.0, atol=1e-6)  # transparent: white, not red (or black)
    gray = preprocess_image(data, cfg.model_copy(update={"background": [0, 64, 255]}))
    np.testing.assert_allclose(gray[:, :, 6], np.array([[0.0], [64 / 255], [1.0]]).repeat(8, 1), atol=1e-6)
    black = ImagePreprocessConfig(size=8, channels=1, mean=[0.0], std=[1.0], background=[0])
    one = preprocess_image(data, black)
    np.testing.assert_allclose(one[:, :, 4:], 0.0, atol=1e-6)  # a gray background on a grayscale model


def test_palette_transparency_is_composited():
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)  # index 0 green, index 1 red (transparent)
    im.putpixel((0, 0), 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=1)
    x = preprocess_image(buf.getvalue(), ImagePreprocessConfig(size=8, channels=3, mean=[0.0], std=[1.0]))
    np.testing.assert_allclose(x[:, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)  # opaque green stays green
    np.testing.assert_allclose(x[:, 7, 7], [1.0, 1.0, 1.0], atol=1e-6)  # the transparent index is white


def test_background_with_two_values_is_a_config_error():
    with pytest.raises(ConfigError, match="background"):
        input_spec(DataConfig(path="x", modalities=["image"], image={"channels": 3, "background": [1, 2]}))


def test_image_is_deterministic():
    cfg = ImagePreprocessConfig(size=32)
    a, b = preprocess_image(noise_png(), cfg), preprocess_image(noise_png(), cfg)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, preprocess_image(noise_png(seed=1), cfg))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image format"),
        (noise_png()[: len(noise_png()) // 2], "truncated"),
    ],
)
def test_bad_image_bytes_raise_decode_error(data, reason):
    with pytest.raises(DecodeError) as e:
        preprocess_image(data, ImagePreprocessConfig())
    assert e.value.modality == "image"
    assert reason in e.value.reason
    assert isinstance(e.value, DataError) and str(e.value).startswith("image: ")


def test_image_mean_std_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="data.image.mean has 2 values"):
        preprocess_image(png(), ImagePreprocessConfig(channels=3, mean=[0.1, 0.2]))


# ----------------------------------------------------------------------------------------------- text


def test_builtin_tokenizer_bytes_bos_pad_and_truncation():
    cfg = TextPreprocessConfig(tokenizer="builtin", max_length=8, lowercase=True)
    tok = load_tokenizer(cfg)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259 and tok.pad_id == 0
    ids, mask, truncated = preprocess_text("Two", cfg, tok)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (8,)
    assert ids.tolist() == [1, ord("t") + 3, ord("w") + 3, ord("o") + 3, 0, 0, 0, 0]
    assert mask.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert truncated is False
    ids, mask, truncated = preprocess_text("seventeen hundred", cfg, tok)
    assert truncated is True and mask.sum() == 8 and ids[1] == ord("s") + 3
    ids, _, _ = preprocess_text("é", cfg, tok)  # multi-byte UTF-8
    assert ids[:3].tolist() == [1, 0xC3 + 3, 0xA9 + 3]


def test_text_non_utf8_bytes_raise_decode_error():
    cfg = TextPreprocessConfig()
    with pytest.raises(DecodeError) as e:
        preprocess_text(b"caf\xe9", cfg, load_tokenizer(cfg))  # type: ignore[arg-type]  (Latin-1 bytes)
    assert e.value.modality == "text" and "not valid UTF-8" in e.value.reason and "0xe9" in e.value.reason


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny word-level Hugging Face tokenizer trained locally and saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]"])
    tok.train_from_iterator(["one two three", "four five six", "seven eight nine zero"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]")
    out = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(out)
    return out


def test_hf_tokenizer_from_local_folder(hf_tokenizer_dir: Path):
    cfg = TextPreprocessConfig(tokenizer=str(hf_tokenizer_dir), max_length=4)
    tok = load_tokenizer(cfg)
    assert tok.pad_id == 0 and tok.vocab_size == 13  # 3 special tokens + 10 words
    ids, mask, truncated = preprocess_text("two nine", cfg, tok)
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert ids.tolist() == [2, ref.convert_tokens_to_ids("two"), ref.convert_tokens_to_ids("nine"), 0]
    assert mask.tolist() == [1, 1, 1, 0] and truncated is False
    ids, mask, truncated = preprocess_text("one two three four five", cfg, tok)
    assert truncated is True and mask.tolist() == [1, 1, 1, 1]
    assert preprocess_text("banana", cfg, tok)[0][1] == ref.unk_token_id
    spec = input_spec(DataConfig(path="x", modalities=["text"], text=cfg))
    assert (spec.vocab_size, spec.pad_id, spec.max_text_len) == (13, 0, 4)


def test_hf_tokenizer_missing_folder_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(TextPreprocessConfig(tokenizer=str(tmp_path / "nope")))


# ---------------------------------------------------------------------------------------------- audio


def test_audio_logmel_shape_dtype_and_resampling():
    cfg = AudioPreprocessConfig()  # 8 kHz, 40 mels, hop 80, 1 s -> (1, 40, 101)
    x = preprocess_audio(wav(tone(0.5)), cfg)
    assert x.shape == (1, 40, 101) and x.dtype == np.float32 and np.isfinite(x).all()
    y = preprocess_audio(wav(tone(0.5, sr=16000), sr=16000), cfg)  # resampled to 8 kHz first
    assert y.shape == (1, 40, 101)
    # same tone, same features (away from edges)
    np.testing.assert_allclose(x[..., 5:45], y[..., 5:45], atol=0.3)
    assert x[0, :, 70:].max() < x[0, :, :40].max() - 5  # padded tail is silence


def test_audio_mfcc_and_crop_and_stereo():
    cfg = AudioPreprocessConfig(features="mfcc", n_mfcc=13, max_seconds=0.5)
    long = tone(2.0)
    x = preprocess_audio(wav(long), cfg)
    assert x.shape == (1, 13, 51)
    np.testing.assert_array_equal(x, preprocess_audio(wav(long[:4000]), cfg))  # cropped to max_seconds
    stereo = np.stack([long, long], axis=1)
    np.testing.assert_allclose(preprocess_audio(wav(stereo), cfg), x, atol=1e-3)  # mono = channel mean


def test_silence_is_finite():
    x = preprocess_audio(wav(np.zeros(4000, np.float32)), AudioPreprocessConfig())
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x, np.log(1e-6), rtol=1e-5)


def test_audio_standardized_with_stats_and_missing_is_the_mean():
    raw_cfg = AudioPreprocessConfig(max_seconds=0.5)
    clips = [wav(tone(0.5, hz=300)), None, wav(tone(0.5, hz=900))]
    raw, _ = audio_batch(clips, raw_cfg)  # (3, 1, F, T): no stats, features as computed
    f = raw.shape[2]
    mean = np.linspace(-8, 2, f)
    std = np.linspace(0.5, 3, f)
    cfg = raw_cfg.model_copy(update={"stats": AudioStats(mean=list(mean), std=list(std))})
    x, errors = audio_batch(clips, cfg)
    assert errors == [None, None, None] and x.dtype == np.float32
    expected = ((raw - mean.astype(np.float32)[None, None, :, None])
                / std.astype(np.float32)[None, None, :, None])
    np.testing.assert_allclose(x[[0, 2]], expected[[0, 2]], rtol=1e-6, atol=1e-6)
    assert (x[1] == 0).all()  # a missing clip is the standardized mean, not a block of raw zeros
    one = preprocess_audio(clips[0], cfg.model_copy(update={"stats": AudioStats(mean=[-5.0], std=[2.0])}))
    np.testing.assert_allclose(one, (raw[0] + 5.0) / 2.0, rtol=1e-6, atol=1e-6)  # global: one pair


def test_fit_stats_per_bin_and_global():
    rng = np.random.default_rng(0)
    x = rng.normal([[-3.0], [1.0], [4.0]], [[1.0], [0.5], [0.01]], size=(3, 500))  # (F, frames)
    per_bin = fit_stats(500, x.sum(axis=1), np.square(x).sum(axis=1), "per_bin")
    np.testing.assert_allclose(per_bin.mean, x.mean(axis=1))
    np.testing.assert_allclose(per_bin.std[:2], x.std(axis=1)[:2])
    assert per_bin.std[2] == STD_FLOOR  # a bin that hardly varies is not blown up
    glob = fit_stats(500, x.sum(axis=1), np.square(x).sum(axis=1), "global")
    np.testing.assert_allclose([glob.mean[0], glob.std[0]], [x.mean(), x.std()])


def test_audio_stats_of_the_wrong_size_are_a_config_error():
    bad = AudioPreprocessConfig(stats=AudioStats(mean=[0.0, 1.0], std=[1.0, 1.0]))
    with pytest.raises(ConfigError, match="data.audio.stats"):
        input_spec(DataConfig(path="x", modalities=["audio"], audio=bad))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (wav(np.zeros(0, np.float32)), "zero-length"),  # a valid WAV header with no samples
        (b"RIFF\x00\x00\x00\x00WAVEjunkjunk", "undecodable"),
        (wav(np.array([0.1, np.nan, 0.2] * 100, np.float32), subtype="FLOAT"), "non-finite"),
    ],
)
def test_bad_audio_raises_decode_error(data, reason):
    with pytest.raises(DecodeError) as e:
        preprocess_audio(data, AudioPreprocessConfig())
    assert e.value.modality == "audio" and reason in e.value.reason


def test_decode_error_pickles():
    e = pickle.loads(pickle.dumps(DecodeError("audio", "empty (0 bytes)")))
    assert (e.modality, e.reason, str(e)) == ("audio", "empty (0 bytes)", "audio: empty (0 bytes)")


# ---------------------------------------------------------------------------------------- spec, batches


def test_input_spec_follows_config():
    cfg = DataConfig(path="x", modalities=["audio", "image"], image={"size": 32, "channels": 3},
                     audio={"features": "mfcc", "n_mfcc": 13, "hop_length": 160, "max_seconds": 2.0})
    spec = input_spec(cfg)
    assert spec.modalities == ("image", "audio")
    assert spec.image_shape == (3, 32, 32) and spec.audio_shape == (1, 13, 101)


def test_preprocessor_batch_contract():
    cfg = DataConfig(path="x", text={"max_length": 6})
    pre = Preprocessor(cfg, labels=["1", "2", "3"])
    batch = {
        "id": np.array(["a", "b", "c", "d", "e", "f"], dtype=object),
        "image": np.array([png(), None, b"junk", png(), None, None], dtype=object),
        "text": np.array(["one", "two", "three", None, "", None], dtype=object),
        "audio": np.array([wav(tone()), wav(tone()), None, None, None, wav(tone())], dtype=object),
        "label": np.array(["1", "2", "3", "7", "1", None], dtype=object),
        "error": np.array(["", "", "", "", "", "audio: file not found: x.wav"], dtype=object),
        "split": np.array(["train"] * 6, dtype=object),
    }
    out = pre(batch)
    assert out["image"].shape == (6, 1, 28, 28) and out["image"].dtype == np.float32
    assert out["text"].shape == out["text_mask"].shape == (6, 6) and out["text"].dtype == np.int64
    assert out["audio"].shape == (6, 1, 40, 101) and out["audio"].dtype == np.float32
    assert out["present"].dtype == bool and out["present"].shape == (6, 3)
    assert out["error"].tolist() == [
        "",
        "",  # image missing: fine
        "image: not a recognised image format",
        "label: unknown label '7' (not among the 3 training labels)",
        "record: none of the configured modalities (image, text, audio) is present",  # "" text = missing
        "audio: file not found: x.wav",  # the reader's verdict is kept
    ]
    assert out["present"][:2].tolist() == [[True, True, True], [False, True, True]]
    assert not out["present"][2:].any()  # rejected rows carry nothing
    assert out["label"].tolist() == [0, 1, -1, -1, -1, -1]
    assert out["id"].tolist() == list("abcdef") and out["split"].tolist() == ["train"] * 6
    assert (out["image"][1] == 0).all() and (out["text"][0, :4]
                                             == [1, ord("o") + 3, ord("n") + 3, ord("e") + 3]).all()
    np.testing.assert_array_equal(out["image"][0], preprocess_image(png(), cfg.image))  # one code path


def test_preprocessor_only_configured_modalities_and_no_labels():
    pre = Preprocessor(DataConfig(path="x", modalities=["text"]), labels=None)
    out = pre({"text": np.array(["hi", "there"], dtype=object),
               "image": np.array([b"junk", b"junk"], dtype=object)})
    assert set(out) == {"text", "text_mask", "present", "label", "id", "error"}
    assert out["error"].tolist() == ["", ""]  # the unconfigured (and bad) image is never decoded
    assert out["label"].tolist() == [-1, -1] and out["present"].tolist() == [[True], [True]]


def test_collate_to_the_torch_batch_contract():
    import torch

    from mmfusion.data.pipeline import MMCollate

    cfg = DataConfig(path="x", modalities=["image", "text"])
    pre = Preprocessor(cfg, labels=["1", "2"], uint8_images=True)  # as the Ray Data pipeline stores rows
    out = pre({"image": np.array([png(), None], dtype=object), "text": np.array(["a", "b"], dtype=object),
               "label": np.array(["2", "1"], dtype=object)})
    batch = {k: v for k, v in out.items() if k not in ("id", "error")}
    for v in batch.values():
        v.setflags(write=False)  # Ray hands out read-only arrays
    collate = MMCollate(input_spec(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable NumPy array" warning
        t = collate(batch)
    assert set(t) == {"image", "text", "text_mask", "present", "label"}
    assert t["image"].dtype == torch.float32 and t["image"].shape == (2, 1, 28, 28)
    assert t["text"].dtype == t["text_mask"].dtype == torch.int64 and t["present"].dtype == torch.bool
    assert t["label"].tolist() == [1, 0] and t["present"].tolist() == [[True, True], [False, True]]
    with pytest.raises(DataError, match=r"batch lacks \['text_mask'\]"):
        collate({k: v for k, v in batch.items() if k != "text_mask"})
    with pytest.raises(DataError, match="uint8 images need the InputSpec"):
        MMCollate()(batch)


def test_uint8_images_normalized_in_collate_as_serving_normalizes_them():
    """The object store holds uint8 pixels (1 byte each, not 4); the collate step and serving's image_batch
    produce the same float32 model input from them."""
    import torch

    from mmfusion.data.image import image_batch, image_pixels
    from mmfusion.data.pipeline import MMCollate

    def rgb_noise(seed: int, size: tuple[int, int]) -> bytes:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
        return buf.getvalue()

    cfg = DataConfig(path="x", modalities=["image"],
                     image={"size": 12, "channels": 3, "mean": [0.2, 0.4, 0.6], "std": [0.3, 0.2, 0.1]})
    values = [rgb_noise(0, (20, 16)), None, b"junk", rgb_noise(1, (12, 12))]
    pixels, errors = image_pixels(values, cfg.image)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 3, 12, 12) and pixels.nbytes == 4 * 3 * 12 * 12
    served, served_errors = image_batch(values, cfg.image)
    assert served_errors == errors and errors[2] is not None
    out = Preprocessor(cfg, uint8_images=True)({"image": np.array(values, dtype=object)})
    np.testing.assert_array_equal(out["image"], pixels)  # what the Ray Data pipeline stores
    np.testing.assert_array_equal(Preprocessor(cfg)({"image": np.array(values, dtype=object)})["image"],
                                  served)  # in-process users (evaluation) get normalized float32
    offline = MMCollate(input_spec(cfg))({"image": out["image"], "present": out["present"]})["image"]
    assert offline.dtype == torch.float32 and offline.shape == (4, 3, 12, 12)
    np.testing.assert_array_equal(offline.numpy(), served)  # bit for bit: one normalization
    mean = np.array([0.2, 0.4, 0.6], np.float32)[:, None, None]
    std = np.array([0.3, 0.2, 0.1], np.float32)[:, None, None]
    np.testing.assert_allclose(served[0], (pixels[0].astype(np.float32) / 255 - mean) / std, atol=1e-5)
    assert not served[1].any() and not served[2].any()  # missing and undecodable rows: zeros
