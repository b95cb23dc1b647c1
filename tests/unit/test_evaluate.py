"""Offline evaluation (no Ray): predictions line up with ids, hidden modalities, reports next to the
artifact."""

import json

import numpy as np
import pytest
from tests.unit.test_serving_engine import make_artifact

from mmfusion.artifact import load_artifact
from mmfusion.errors import ArtifactError, DataError
from mmfusion.evaluate.report import evaluate_artifact, predict_split


@pytest.fixture(scope="module")
def artifact(avt_tiny, tmp_path_factory):
    return make_artifact(avt_tiny, tmp_path_factory.mktemp("eval") / "art")


def test_predictions_align_with_ids_when_modalities_are_hidden(artifact, avt_tiny):
    art = load_artifact(artifact)
    full = predict_split(art, str(avt_tiny), "test")
    audio = predict_split(art, str(avt_tiny), "test", modalities=["audio"])
    assert len(full.ids) == len(full.probs) == len(full.labels)
    assert len(audio.ids) == len(audio.probs) < len(full.probs)  # rows without audio have nothing left
    assert np.allclose(audio.probs.sum(1), 1, atol=1e-5)
    # hiding changes the answer for rows that had other modalities too
    common = [full.ids.index(i) for i in audio.ids]
    assert not np.allclose(full.probs[common], audio.probs)


def test_evaluate_writes_report_plot_and_metrics(artifact, avt_tiny):
    ev = evaluate_artifact(artifact, data=str(avt_tiny), split="test", modalities=["image", "text"],
                           local=True)
    assert ev.plot.name == "confusion_matrix_test_image+text.png" and ev.plot.is_file()
    m = json.loads((artifact / "metrics.json").read_text())
    assert m["evaluation"]["test_image+text"]["num_samples"] == ev.report["num_samples"]
    assert "macro-F1" in ev.text


def test_evaluate_bad_inputs(artifact, avt_tiny, tmp_path):
    with pytest.raises(DataError, match="no 'nope' split"):
        evaluate_artifact(artifact, data=str(avt_tiny), split="nope", local=True)
    with pytest.raises(DataError, match="the model was trained on"):
        evaluate_artifact(artifact, data=str(avt_tiny), modalities=["video"], local=True)
    with pytest.raises(ArtifactError, match="missing"):
        evaluate_artifact(tmp_path, data=str(avt_tiny), local=True)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    for f in ("config.yaml", "labels.json"):
        (tmp_path / f).write_text((artifact / f).read_text())
    with pytest.raises(ArtifactError, match="cannot be read"):
        load_artifact(tmp_path)


def test_remote_artifact_locations_are_staged_then_published(tmp_path, monkeypatch, artifact):
    import pyarrow.fs as pafs

    from mmfusion import storage
    from mmfusion.storage import is_remote, publish, staging_dir

    assert is_remote("s3://b/run/artifact") and not is_remote("file:///x") and not is_remote("runs/a")
    assert staging_dir("runs/a") == (tmp_path.cwd() / "runs" / "a")
    bucket = tmp_path / "bucket"
    monkeypatch.setattr(storage, "filesystem", lambda loc: (pafs.LocalFileSystem(),
                                                            str(bucket / loc.split("://", 1)[1])))
    assert publish(artifact, "s3://b/run/artifact") == "s3://b/run/artifact"
    assert ((bucket / "b/run/artifact/model.safetensors").read_bytes()
            == (artifact / "model.safetensors").read_bytes())


def test_evaluate_counts_every_rejected_and_skipped_row(artifact, avt_tiny, tmp_path):
    from tests.eval_helpers import BAD_ROWS, with_bad_rows

    from mmfusion.data.rejects import read_rejects

    data = with_bad_rows(avt_tiny, tmp_path / "bad")
    ev = evaluate_artifact(artifact, data=str(data), split="test", local=True)
    assert ev.report["rejected_rows"] == len(BAD_ROWS) == 2  # one per bad row, not one for all of them
    assert ev.report["skipped_rows"] == 1  # the row without any modality
    rejects = {r["id"]: r for r in read_rejects(ev.rejects_path)}
    assert ev.rejects_path == artifact / "rejects_test.jsonl"
    assert set(rejects) == set(BAD_ROWS)
    for rid, (modality, _) in BAD_ROWS.items():
        assert rejects[rid]["modality"] == modality and rejects[rid]["reason"], rejects[rid]
    assert "2 rows could not be decoded" in ev.text and "1 rows have none of the modalities" in ev.text
    clean = evaluate_artifact(artifact, data=str(avt_tiny), split="test", local=True)
    assert clean.report["num_samples"] == ev.report["num_samples"]
    assert clean.rejects_path is None and not (artifact / "rejects_test.jsonl").exists()  # stale file gone


def test_actor_pool_uses_every_cpu_and_shares_gpus():
    from mmfusion.errors import ConfigError
    from mmfusion.evaluate.inference import batch_rows, plan_pool

    two = plan_pool(2, 0)
    assert (two.size, two.device, two.gpus) == (2, "cpu", 0.0)
    assert two.size * two.cpus + 1 <= 2  # a repartition task (1 CPU) still fits beside the pool
    sixteen = plan_pool(16, 0)
    assert sixteen.size == 16 and sixteen.size * sixteen.cpus + 1 <= 16
    assert plan_pool(4, 0, real_cores=2).size == 2  # an embedded cluster declares more CPUs than cores
    gpu = plan_pool(16, 1)
    assert (gpu.size, gpu.device) == (16, "cuda") and gpu.gpus * gpu.size == pytest.approx(1, abs=1e-3)
    assert plan_pool(16, 1, device="cpu").device == "cpu"
    with pytest.raises(ConfigError, match="no GPU"):
        plan_pool(2, 0, device="cuda")
    assert batch_rows(60, 2) == 15 and batch_rows(10**6, 2) == 256  # every actor gets blocks
