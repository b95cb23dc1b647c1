"""The embedding cache: frozen encoders run once per split, as Ray Data batch inference, and the fusion head
trains on their embeddings for every epoch, run and Tune trial that shares them.

    enabled(cfg)                        train.embedding_cache=auto and every configured encoder is frozen
    cached = embed_splits(cfg, {"train": ds, "val": ds}, info, storage)   # reuse, or build, the cache
    cached.datasets                     per split: "<modality>_emb" float32 (N, hidden), "present", "label"
    CachedFusionModel(model)            the same FusionModel (same modules, same state dict) fed embeddings

A split is embedded by `map_batches(EmbedBatch, compute=ActorPoolStrategy)`: each actor builds the model once
(the backbones exactly as the workers build them: same config, same seed) and returns the backbones'
`features()`, on a GPU per actor when train.use_gpu. Only the trainable parts after the frozen backbones
(projections, fusion, head) see gradients, so training on cached features is the same computation; the
artifact still holds the whole model and serves from raw media.

The key (a hash, the cache's folder name) covers:
  - each frozen backbone's weights (sha256 over its state dict),
  - the preprocessing: data.image/text/audio of the configured modalities, label column, class names, and the
    val carve-out (data.val_fraction, seed),
  - the data files' fingerprints (location, size, modification time), and those of the media files their
    records name by path (manifests' image/audio paths, Parquet path columns): a hash over all of them.
Any change is a new key, hence a new folder, built afresh. Old folders are pruned: per encoder (the same
backbone weights), only the train.embedding_cache_keep most recently used stay (use = key.json rewritten).

    <train.storage_path>/embedding_cache/<key>/
        key.json            the parts the key was made of; its modification time is the folder's last use
        <split>.json        written last: rows, dims, build seconds, and the folder holding the split
        <split>-<uuid>/     Parquet; a build that stopped before its <split>.json is not used (and concurrent
                            builders, e.g. Tune trials, never write into each other's folders)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmfusion.batch import INPUT_KEYS, InputSpec, input_keys
from mmfusion.config import ExperimentConfig, validate_config
from mmfusion.errors import ConfigError
from mmfusion.models.model import FusionModel, build_model

log = logging.getLogger(__name__)

CACHE_DIR = "embedding_cache"
FORMAT = 1  # bump when what `features()` computes changes: old caches are then never reused
EMBED_BATCH = 256  # rows per EmbedBatch call
ROWS_PER_ACTOR = 1000  # a CPU actor loads the whole model: not worth it for fewer rows


def emb_key(modality: str) -> str:
    """The batch key of a modality's cached embedding: "text" -> "text_emb"."""
    return f"{modality}_emb"


def enabled(cfg: ExperimentConfig) -> bool:
    """auto: on when every configured encoder is a frozen backbone (hf, or resnet with freeze: true), so every
    trainable part (projections, fusion, head) sits after frozen encoders."""
    if cfg.train.embedding_cache == "off":
        return False
    return all(getattr(getattr(cfg.model.encoders, m), "freeze", False) for m in cfg.data.modalities)


def spec_from_info(info: dict[str, Any]) -> InputSpec:
    return InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["spec"].items()})


def weights_hash(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_hashes(model: FusionModel) -> dict[str, str]:
    return {m: weights_hash(model.encoders[m].backbone) for m in model.modalities}


def data_fingerprints(path: str) -> list[list[Any]]:
    """[location, size, mtime_ns] of each data file of the dataset at `path`, sorted."""
    from mmfusion.data.readers import discover
    from mmfusion.storage import filesystem

    out = []
    for f in discover(path):
        fs, inner = filesystem(f.location)
        st = fs.get_file_info(inner)
        out.append([f.location, st.size, st.mtime_ns])
    return sorted(out)


def media_fingerprint(path: str, modalities: list[str], label_column: str = "label") -> dict[str, Any]:
    """{"files": n, "sha256": 16 hex} over [location, size, mtime_ns] of every media file of `modalities`
    that the dataset's records name by path (JSONL/CSV manifests; Parquet string columns, and the `path` of
    Hugging Face {bytes, path} structs); a missing file counts with size and mtime None. Inline bytes are
    covered by their data file's own fingerprint. Costs one read of the manifests and one stat per file."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from mmfusion.batch import MEDIA
    from mmfusion.data.parsers import open_parquet, parse_manifest
    from mmfusion.data.readers import discover, resolve_ref
    from mmfusion.storage import filesystem

    media = [m for m in MEDIA if m in modalities]
    refs: set[str] = set()
    for f in discover(path) if media else []:
        if f.format != "parquet":
            tb = parse_manifest(f, label_column, set(media))
            refs.update(resolve_ref(r, f.location) for m in media for r in tb[f"{m}_ref"].to_pylist() if r)
            continue
        pf = open_parquet(f.location)
        for m in media:
            if m not in pf.schema_arrow.names:
                continue
            t = pf.schema_arrow.field(m).type
            if pa.types.is_struct(t) and t.get_field_index("path") >= 0:
                values = pf.read(columns=[f"{m}.path"]).column(m).combine_chunks().field("path").to_pylist()
            elif pa.types.is_string(t) or pa.types.is_large_string(t):
                values = pf.read(columns=[m]).column(m).to_pylist()
            else:  # binary: the bytes are in the file
                continue
            refs.update(resolve_ref(r, f.location) for r in values if r)
    by_fs: dict[str, tuple[Any, list[tuple[str, str]]]] = {}  # scheme://host -> (fs, [(location, inner)])
    for location in refs:
        scheme, uri, rest = location.partition("://")
        fs, inner = filesystem(location)
        group = f"{scheme}://{rest.split('/')[0]}" if uri else ""
        by_fs.setdefault(group, (fs, []))[1].append((location, inner))
    stats = []
    for fs, items in by_fs.values():  # one get_file_info call per filesystem
        for (location, _), st in zip(items, fs.get_file_info([inner for _, inner in items]), strict=True):
            found = st.type == pafs.FileType.File
            stats.append([location, st.size if found else None, st.mtime_ns if found else None])
    h = hashlib.sha256(json.dumps(sorted(stats), default=str).encode())
    return {"files": len(stats), "sha256": h.hexdigest()[:16]}


def key_parts(cfg: ExperimentConfig, labels: list[str], weights: dict[str, str],
              files: list[list[Any]], media: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the cached embeddings depend on (the key is its hash); `media`: media_fingerprint's."""
    d = cfg.data
    preprocessing = {"modalities": list(d.modalities), "label_column": d.label_column,
                     "val_fraction": d.val_fraction, "seed": cfg.seed,
                     **{m: getattr(d, m).model_dump(mode="json") for m in d.modalities}}
    return {"format": FORMAT, "weights": weights, "preprocessing": preprocessing, "labels": list(labels),
            "data_files": files, "media_files": media or {"files": 0}}


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_frozen_model(cfg: ExperimentConfig, spec: InputSpec, num_classes: int) -> FusionModel:
    """The model exactly as every Train worker builds it (worker.py seeds torch with cfg.seed first), so a
    randomly initialised frozen backbone is the same one too."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, spec, num_classes=num_classes)


# ------------------------------------------------------------------------------------------ Ray Data


class EmbedBatch:
    """Ray Data callable class (one per actor: the model is built once): model-ready numpy batches ->
    {"<modality>_emb": float32 (B, hidden), "present": (B, M), "label": (B,)}. Rows without a modality get
    zeros (the model never reads them: CachedFusionModel masks them like FusionModel does)."""

    def __init__(self, experiment: dict[str, Any], info: dict[str, Any], weights: dict[str, str], device: str,
                 num_threads: int | None = None) -> None:
        from mmfusion.data.pipeline import MMCollate

        if num_threads:
            torch.set_num_threads(num_threads)
        cfg = validate_config(experiment, source="embedding cache")
        self.spec = spec_from_info(info)
        model = build_frozen_model(cfg, self.spec, len(info["labels"]))
        if backbone_hashes(model) != weights:  # another node may hold another copy of a pretrained folder
            raise ConfigError(f"encoder weights on this node ({backbone_hashes(model)}) differ from the "
                              f"driver's ({weights}): every node needs the same pretrained files")
        self.device = torch.device(device)
        self.encoders = {m: model.encoders[m].to(self.device).eval() for m in self.spec.modalities}
        self.collate = MMCollate(self.spec)  # the workers' collate: dtypes, uint8 images normalized

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tb = self.collate(batch)
        present = np.asarray(batch["present"], dtype=bool)  # (B, M)
        out: dict[str, np.ndarray] = {"present": present, "label": np.asarray(batch["label"])}
        with torch.inference_mode():
            for j, m in enumerate(self.spec.modalities):
                inputs = [tb[k].to(self.device) for k in INPUT_KEYS[m]]
                emb = self.encoders[m].features(*inputs).float().cpu().numpy()  # (B, hidden)
                emb[~present[:, j]] = 0.0
                out[emb_key(m)] = emb
        return out


@dataclass
class CachedSplits:
    datasets: dict[str, Any]  # split -> ray.data.Dataset of embeddings (materialized)
    key: str
    root: str  # <storage>/embedding_cache/<key>
    weights: dict[str, str]  # modality -> backbone weights hash
    reused: dict[str, bool] = field(default_factory=dict)  # split -> found in the cache
    build_s: dict[str, float] = field(default_factory=dict)  # split -> seconds spent embedding it now

    def worker_info(self) -> dict[str, Any]:
        """What train_loop_config carries: the workers check their backbones against `weights`."""
        return {"key": self.key, "weights": self.weights}

    def summary(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.root, "reused": self.reused, "build_s": self.build_s}


def embed_splits(cfg: ExperimentConfig, datasets: dict[str, Any], info: dict[str, Any],
                 storage: str) -> CachedSplits:
    """The cached embeddings of each split in `datasets` (preprocessed, from build_datasets): read from
    <storage>/embedding_cache/<key>/ when there, else computed by Ray Data batch inference and stored."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from mmfusion.storage import filesystem

    spec = spec_from_info(info)
    model = build_frozen_model(cfg, spec, len(info["labels"]))
    weights = backbone_hashes(model)
    del model
    media = media_fingerprint(cfg.data.path, list(cfg.data.modalities), cfg.data.label_column)
    parts = key_parts(cfg, info["labels"], weights, data_fingerprints(cfg.data.path), media)
    key = cache_key(parts)
    root = f"{storage.rstrip('/')}/{CACHE_DIR}/{key}"
    fs, inner = filesystem(root)
    fs.create_dir(inner, recursive=True)
    _write_json(fs, f"{inner}/key.json", parts)
    out = CachedSplits({}, key, root, weights)
    resources = ray.cluster_resources()
    for split, ds in datasets.items():
        manifest = _read_json(fs, f"{inner}/{split}.json")
        if manifest is None:
            rows = int(ds.count())
            if cfg.train.use_gpu:
                size, device, gpus = max(1, int(resources.get("GPU", 1))), "cuda", 1.0
            else:
                cpus = max(1, int(resources.get("CPU", 1)))
                size, device, gpus = max(1, min(cpus, math.ceil(rows / ROWS_PER_ACTOR))), "cpu", 0.0
            folder = f"{split}-{uuid.uuid4().hex[:8]}"
            log.info("embedding cache %s: embedding %d %s rows with %d actor(s) on %s", key, rows, split,
                     size, device.upper())
            t0 = time.perf_counter()
            embedded = ds.select_columns([*input_keys(spec.modalities), "label"]).map_batches(
                EmbedBatch, batch_size=EMBED_BATCH, batch_format="numpy", num_gpus=gpus,
                fn_constructor_kwargs={"experiment": cfg.model_dump(mode="json"), "info": info,
                                       "weights": weights, "device": device,
                                       "num_threads": None if gpus else 1},
                compute=ActorPoolStrategy(min_size=1, max_size=size))
            embedded.write_parquet(f"{root}/{folder}")
            seconds = time.perf_counter() - t0
            manifest = {"folder": folder, "rows": rows, "seconds": round(seconds, 3), "key": key}
            _write_json(fs, f"{inner}/{split}.json", manifest)  # last: the split now counts as cached
            out.reused[split], out.build_s[split] = False, seconds
            log.info("embedding cache %s: %s embedded in %.1f s", key, split, seconds)
        else:
            out.reused[split] = True
            log.info("embedding cache %s: reusing %s (%d rows)", key, split, manifest["rows"])
        out.datasets[split] = ray.data.read_parquet(f"{root}/{manifest['folder']}").materialize()
    if cfg.train.embedding_cache_keep is not None:
        prune(f"{storage.rstrip('/')}/{CACHE_DIR}", cfg.train.embedding_cache_keep, keep_key=key)
    return out


IN_USE_S = 600  # a folder used this recently may be in use by a concurrent run or Tune trial: never pruned


def prune(cache_root: str, keep: int, keep_key: str | None = None, now_s: float | None = None) -> list[str]:
    """Delete cache folders beyond the `keep` most recently used per encoder (same backbone weights), except
    `keep_key` and those used in the last IN_USE_S seconds. Last use = key.json's modification time (written
    by every run that uses the folder). Folders without a readable key.json are left alone.
    Returns the deleted keys."""
    import pyarrow.fs as pafs

    from mmfusion.storage import filesystem

    fs, inner = filesystem(cache_root)
    groups: dict[str, list[tuple[int, str, str]]] = {}  # weights -> [(last use ns, key, folder)]
    for d in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
        st = fs.get_file_info(f"{d.path}/key.json") if d.type == pafs.FileType.Directory else None
        if st is None or st.type != pafs.FileType.File:
            continue
        try:
            weights = (_read_json(fs, f"{d.path}/key.json") or {})["weights"]
        except (KeyError, TypeError, ValueError, OSError):
            continue
        groups.setdefault(json.dumps(weights, sort_keys=True), []).append((st.mtime_ns, d.base_name, d.path))
    recent = ((time.time() if now_s is None else now_s) - IN_USE_S) * 1e9
    deleted = []
    for folders in groups.values():
        for mtime, key, folder in sorted(folders, reverse=True)[keep:]:
            if key != keep_key and mtime < recent:
                fs.delete_dir(folder)
                deleted.append(key)
    if deleted:
        log.info("embedding cache: pruned %d folder(s) beyond the %d most recently used per encoder: %s",
                 len(deleted), keep, ", ".join(deleted))
    return deleted


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _write_json(fs: Any, path: str, obj: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------- model


class CachedFusionModel(FusionModel):
    """A FusionModel fed its frozen encoders' cached embeddings ("<modality>_emb", (B, hidden)) instead of
    their inputs. It holds the very same modules (state dict and checkpoints are the whole model's); only
    the trainable parts after the backbones run: each encoder's projection, the fusion and the head."""

    def __init__(self, model: FusionModel) -> None:
        nn.Module.__init__(self)
        self.modalities = model.modalities
        self.encoders = model.encoders
        self.fusion = model.fusion
        self.head = model.head
        self.register_buffer("drop_p", model.drop_p.clone(), persistent=False)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # -> (B, num_classes)
        present = batch["present"].bool()  # (B, M)
        if self.training and bool((self.drop_p > 0).any()):
            present = self.drop_modalities(present)
        feats = {}
        for i, m in enumerate(self.modalities):
            z = self.encoders[m].proj(batch[emb_key(m)])  # (B, hidden) -> (B, D)
            feats[m] = torch.where(present[:, i:i + 1], z, torch.zeros_like(z))  # absent rows: zeros
        return self.fuse(feats, present)


def cached_model(model: FusionModel, cache: dict[str, Any]) -> CachedFusionModel:
    """The worker's side: check that this worker's backbones are those the cache was computed with."""
    mine = backbone_hashes(model)
    if mine != cache["weights"]:
        raise ConfigError(f"the embedding cache {cache['key']} was computed with other encoder weights "
                          f"({cache['weights']}) than this worker's ({mine}); set train.embedding_cache=off")
    return CachedFusionModel(model)
