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
    ev = evaluate_artifact(artifact, data=str(avt_tiny), split="test", modalities=["image", "text"])
    assert ev.plot.name == "confusion_matrix_test_image+text.png" and ev.plot.is_file()
    m = json.loads((artifact / "metrics.json").read_text())
    assert m["evaluation"]["test_image+text"]["num_samples"] == ev.report["num_samples"]
    assert "macro-F1" in ev.text


def test_evaluate_bad_inputs(artifact, avt_tiny, tmp_path):
    with pytest.raises(DataError, match="no 'nope' split"):
        evaluate_artifact(artifact, data=str(avt_tiny), split="nope")
    with pytest.raises(ArtifactError, match="missing"):
        evaluate_artifact(tmp_path, data=str(avt_tiny))
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
