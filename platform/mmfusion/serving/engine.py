"""Serving compute without Ray: raw request values -> preprocessed batch -> encoder -> fusion ->
probabilities.

    EncoderRunner(model, data_cfg, "image")([png, png, ...])     -> [Encoded(embedding (D,)) | Encoded(error)]
    FusionRunner(model)([{"image": (D,), "text": (D,)}, ...])    -> [(K,) probabilities]
    ModelRunner(model, data_cfg)([{"image": png, "text": "7"}])  -> [Predicted]   (the `single` topology)

Preprocessing runs here, in the encoder's replica, through the same batch kernels Ray Data uses
(`image_batch`, `text_batch`, `audio_batch` of mmfusion.data.image/text/audio: one code path). A value
that cannot be decoded comes back as an error for its own row only, so one bad request never fails a batch.
The numbers equal the offline `mmfusion evaluate` path: the same preprocessing, `FusionModel.encode` per
modality, and `FusionModel.fuse` with zeros and a False mask bit for a missing modality, as `forward` does.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
import torch

from mmfusion.batch import INPUT_KEYS
from mmfusion.config import DataConfig
from mmfusion.data.audio import audio_batch, decode_audio
from mmfusion.data.image import image_batch
from mmfusion.data.text import load_tokenizer, text_batch
from mmfusion.errors import ConfigError, DecodeError
from mmfusion.models.model import FusionModel
from mmfusion.serving.messages import Encoded, Predicted

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """The torch device for "auto" (cuda when this process sees a GPU, else cpu), "cpu" or "cuda"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this replica sees no GPU: give it ray_actor_options.num_gpus")
    return torch.device(device)


def keep_encoder(model: FusionModel, modality: str) -> FusionModel:
    """Drop every part but one encoder (in place): an encoder replica holds only what it runs."""
    if modality not in model.encoders:
        raise ConfigError(f"the model has no {modality!r} encoder; it has {', '.join(model.modalities)}")
    for m in list(model.encoders):
        if m != modality:
            del model.encoders[m]
    model.fusion = None  # type: ignore[assignment]
    model.head = None  # type: ignore[assignment]
    return model


def keep_fusion(model: FusionModel) -> FusionModel:
    """Drop the encoders (in place): the fusion replica only fuses embeddings."""
    for m in list(model.encoders):
        del model.encoders[m]
    return model


class EncoderRunner:
    """One modality: a batch of raw values (encoded bytes, or str for text) -> one `Encoded` per value."""

    def __init__(self, model: FusionModel, data_cfg: DataConfig, modality: str, device: torch.device) -> None:
        if modality not in model.encoders:
            raise ConfigError(f"the model has no {modality!r} encoder; it has {', '.join(model.modalities)}")
        self.modality = modality
        self.cfg = data_cfg
        self.device = device
        self.model = model.to(device).eval()
        self.tokenizer = load_tokenizer(data_cfg.text) if modality == "text" else None

    def preprocess(self, values: Sequence[bytes | str]) -> tuple[dict[str, np.ndarray], list[Encoded | None]]:
        """-> model inputs for all rows (bad rows zero-filled), and a pre-filled Encoded for each bad/cut
        row."""
        n = len(values)
        notes: list[Encoded | None] = [None] * n
        m = self.modality
        if m == "image":
            arr, errors = image_batch(list(values), self.cfg.image)  # (N, C, H, W)
            tensors = {"image": arr}
        elif m == "text":
            assert self.tokenizer is not None
            # (N, L) x2
            ids, mask, truncated, errors = text_batch(list(values), self.cfg.text, self.tokenizer)
            tensors = {"text": ids, "text_mask": mask}
            for i in np.flatnonzero(truncated):
                notes[i] = Encoded(warning=f"text: truncated to {self.cfg.text.max_length} tokens "
                                           "(data.text.max_length of the model)")
        elif m == "audio":
            checked = [self._check_audio(v) for v in values]
            keep = [None if c is not None and c.error else v for v, c in zip(values, checked, strict=True)]
            arr, errors = audio_batch(keep, self.cfg.audio)  # (N, 1, F, T)
            tensors = {"audio": arr}
            notes = checked
        else:
            raise ConfigError(f"unknown modality {m!r}")
        for i, e in enumerate(errors):
            if e is not None and not (notes[i] is not None and notes[i].error):
                notes[i] = Encoded(error=e)
        return tensors, notes

    def _check_audio(self, data: bytes | str) -> Encoded | None:
        """Reject a silent clip (every sample zero: nothing to classify) and say when a clip is cut."""
        import soundfile as sf

        try:
            wav, _ = decode_audio(data, self.cfg.audio.max_seconds)
        except DecodeError:
            return None  # audio_batch reports the same decode error
        if not np.any(wav):
            return Encoded(error="silent clip (every sample is zero): nothing to classify", status=422)
        try:
            with sf.SoundFile(io.BytesIO(bytes(data))) as f:  # type: ignore[arg-type]
                seconds = f.frames / f.samplerate
        except (sf.LibsndfileError, RuntimeError, ValueError):
            return None
        if seconds > self.cfg.audio.max_seconds + 1e-6:
            return Encoded(warning=f"audio: {seconds:.2f} s clip cut to its first "
                                   f"{self.cfg.audio.max_seconds:g} s (data.audio.max_seconds of the model)")
        return None

    @torch.inference_mode()
    def __call__(self, values: Sequence[bytes | str]) -> list[Encoded]:
        """One Encoded per value. An unexpected failure (not a decode error) of a batch retries its rows one
        by one, so only the row that fails gets an error (503: the encoder failed, not the input)."""
        try:
            return self._run(values)
        except Exception as e:
            if len(values) == 1:
                log.warning("%s encoder failed on one row: %s: %s", self.modality, type(e).__name__, e)
                return [Encoded(error=f"the {self.modality} encoder failed ({type(e).__name__}); retry later",
                                status=503)]
            log.warning("%s encoder failed on a batch of %d (%s): retrying row by row", self.modality,
                        len(values), type(e).__name__)
            return [self([v])[0] for v in values]

    def _run(self, values: Sequence[bytes | str]) -> list[Encoded]:
        tensors, notes = self.preprocess(values)
        ok = [i for i, note in enumerate(notes) if note is None or note.error is None]
        out = [note if note is not None else Encoded() for note in notes]
        if ok:
            batch = {k: torch.from_numpy(v[ok]).to(self.device) for k, v in tensors.items()}
            emb = self.model.encode(self.modality, batch).float().cpu().numpy()  # (n, D)
            for j, i in enumerate(ok):
                out[i].embedding = emb[j]
        return out

    @torch.inference_mode()
    def probe(self) -> None:
        """Health check: one zero-input row through the encoder must give a finite embedding."""
        if self.modality == "text":
            assert self.tokenizer is not None
            ids, mask, _, _ = text_batch(["0"], self.cfg.text, self.tokenizer)
            batch = {"text": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask)}
        else:
            shape = {"image": (self.cfg.image.channels, self.cfg.image.size,
                               self.cfg.image.size)}.get(self.modality)
            key = INPUT_KEYS[self.modality][0]
            if shape is None:  # audio: the preprocessed shape of a silent clip
                arr, _ = audio_batch([None], self.cfg.audio)
                shape = arr.shape[1:]
            batch = {key: torch.zeros((1, *shape))}
        emb = self.model.encode(self.modality, {k: v.to(self.device) for k, v in batch.items()})
        if not bool(torch.isfinite(emb).all()):
            raise RuntimeError(f"the {self.modality} encoder gives non-finite outputs")


class FusionRunner:
    """Per-modality embeddings of a batch of requests (any subset each) -> class probabilities."""

    def __init__(self, model: FusionModel, device: torch.device) -> None:
        self.device = device
        self.model = model.to(device).eval()
        self.modalities = model.modalities
        self.dims = {m: int(model.fusion.in_dims[m]) for m in self.modalities}

    @torch.inference_mode()
    def __call__(self, items: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray | None]:
        """(K,) probabilities per item; None for an item the fusion failed on alone (the batch is retried row
        by row after a failure, so one bad row never fails its batch-mates)."""
        try:
            return list(self._run(items))
        except Exception as e:
            log.warning("fusion failed on a batch of %d: %s: %s", len(items), type(e).__name__, e)
            if len(items) == 1:
                return [None]
            return [self([it])[0] for it in items]

    def _run(self, items: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        b = len(items)
        if b == 0:
            return []
        present = torch.zeros((b, len(self.modalities)), dtype=torch.bool)  # (B, M)
        feats: dict[str, torch.Tensor] = {}
        for j, m in enumerate(self.modalities):
            rows = [i for i, it in enumerate(items) if m in it]
            if not rows:
                continue
            # (B, D_m): zeros where absent, as forward() does
            x = np.zeros((b, self.dims[m]), dtype=np.float32)
            x[rows] = np.stack([np.asarray(items[i][m], dtype=np.float32) for i in rows])
            feats[m] = torch.from_numpy(x).to(self.device)
            present[rows, j] = True
        unknown = {k for it in items for k in it} - set(self.modalities)
        if unknown:
            raise ValueError(f"embeddings for unknown modalities {sorted(unknown)}; "
                             f"the model has {self.modalities}")
        logits = self.model.fuse(feats, present.to(self.device)).float()  # (B, K)
        probs = torch.softmax(logits, dim=-1).cpu().numpy()  # (B, K)
        return list(probs)

    @torch.inference_mode()
    def probe(self) -> None:
        feats = {m: torch.zeros((1, d), device=self.device) for m, d in self.dims.items()}
        present = torch.ones((1, len(self.modalities)), dtype=torch.bool, device=self.device)
        if not bool(torch.isfinite(self.model.fuse(feats, present)).all()):
            raise RuntimeError("the fusion head gives non-finite outputs")


class ModelRunner:
    """The whole model in one place (the `single` topology): raw inputs per request -> Predicted."""

    def __init__(self, model: FusionModel, data_cfg: DataConfig, device: torch.device) -> None:
        self.encoders = {m: EncoderRunner(model, data_cfg, m, device) for m in model.modalities}
        self.fusion = FusionRunner(model, device)

    def __call__(self, items: Sequence[dict[str, bytes | str]]) -> list[Predicted]:
        out = [Predicted() for _ in items]
        feats: list[dict[str, np.ndarray]] = [{} for _ in items]
        for m, runner in self.encoders.items():
            rows = [i for i, it in enumerate(items) if m in it]
            if not rows:
                continue
            for i, enc in zip(rows, runner([items[i][m] for i in rows]), strict=True):
                if enc.error is not None:
                    if out[i].error is None:
                        out[i].error, out[i].modality, out[i].status = enc.error, m, enc.status
                    continue
                feats[i][m] = enc.embedding  # type: ignore[assignment]
                if enc.warning:
                    out[i].truncated.append(m)
                    out[i].warnings.append(enc.warning)
        good = [i for i, p in enumerate(out) if p.error is None]
        for i, probs in zip(good, self.fusion([feats[i] for i in good]), strict=True):
            if probs is None:
                out[i].error, out[i].modality, out[i].status = "the fusion failed; retry later", "server", 503
            out[i].probabilities = probs
        return out

    def probe(self) -> None:
        for runner in self.encoders.values():
            runner.probe()
        self.fusion.probe()
