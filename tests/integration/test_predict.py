"""`mmfusion predict` and `mmfusion evaluate` on the Ray Data actor pool: unlabelled data, rejects with
reasons, counts, the pool sized to the machine, and the same predictions as the in-process path."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from tests.eval_helpers import BAD_ROWS, EMPTY_ROW_ID, with_bad_rows
from tests.unit.test_serving_engine import make_artifact

from mmfusion.artifact import load_artifact
from mmfusion.data.rejects import read_rejects
from mmfusion.evaluate.predict import PROB_PREFIX, predict_to_parquet
from mmfusion.evaluate.report import evaluate_artifact, predict_split

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def artifact(avt_tiny, tmp_path_factory):
    return make_artifact(avt_tiny, tmp_path_factory.mktemp("predict") / "art")


@pytest.fixture(scope="module")
def predicted(ray_local, artifact, avt_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_out")
    data = with_bad_rows(avt_tiny, root / "unlabelled", labelled=False)
    return data, predict_to_parquet(artifact, str(data), root / "out" / "preds.parquet", split="test")


def test_predict_on_unlabelled_data_writes_every_row_or_its_reason(predicted, artifact, ray_local):
    data, run = predicted
    rows_in = pq.read_metadata(data / "test.parquet").num_rows
    table = pq.read_table(run.out)
    labels = load_artifact(artifact).labels
    assert table.column_names == ["id", "split", "label", *(PROB_PREFIX + c for c in labels), "modalities"]
    assert table.num_rows == run.rows == rows_in - len(BAD_ROWS) - 1
    assert (run.rejected, run.skipped) == (len(BAD_ROWS), 1)  # nothing dropped silently
    ids = set(table["id"].to_pylist())
    assert not ids & {*BAD_ROWS, EMPTY_ROW_ID}
    rejects = {r["id"]: r for r in read_rejects(run.rejects_path)}
    assert run.rejects_path == run.out.with_name("preds.rejects.jsonl") and set(rejects) == set(BAD_ROWS)
    for rid, (modality, _) in BAD_ROWS.items():
        assert rejects[rid]["modality"] == modality and rejects[rid]["reason"], rejects[rid]
    probs = np.stack([table[PROB_PREFIX + c].to_numpy() for c in labels], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert table["label"].to_pylist() == [labels[k] for k in probs.argmax(axis=1)]
    source = pq.read_table(data / "test.parquet").to_pylist()
    has = {r["id"]: [m for m in ("image", "text", "audio") if r[m] is not None] for r in source}
    assert all(has[i] == m for i, m in zip(table["id"].to_pylist(), table["modalities"].to_pylist(),
                                           strict=True))
    assert any(len(m) < 3 for m in table["modalities"].to_pylist())  # the rows that miss a modality
    # one actor per core of this machine (an embedded cluster declares more logical CPUs), all of them used
    cpus = int(ray_local.cluster_resources()["CPU"])
    assert run.pool.size == min(cpus, os.cpu_count()) and run.actors == run.pool.size


def test_evaluate_counts_rejects_and_agrees_with_predict(predicted, artifact, avt_tiny, tmp_path):
    _, run = predicted
    data = with_bad_rows(avt_tiny, tmp_path / "labelled", labelled=True)
    ev = evaluate_artifact(artifact, data=str(data), split="test")  # the Ray Data path
    assert ev.report["rejected_rows"] == len(BAD_ROWS) and ev.report["skipped_rows"] == 1
    assert {r["id"] for r in read_rejects(ev.rejects_path)} == set(BAD_ROWS)
    preds = ev.predictions
    assert preds is not None and preds.pool is not None and preds.actors == preds.pool.size
    labels = load_artifact(artifact).labels
    predicted_labels = dict(zip(pq.read_table(run.out, columns=["id"])["id"].to_pylist(),
                                pq.read_table(run.out, columns=["label"])["label"].to_pylist(), strict=True))
    assert sorted(preds.ids) == sorted(predicted_labels)
    assert [labels[k] for k in preds.probs.argmax(axis=1)] == [predicted_labels[i] for i in preds.ids]
    assert ev.report["num_samples"] == len(preds.ids)
    assert ev.report["accuracy"] == pytest.approx(float(np.mean(preds.probs.argmax(axis=1) == preds.labels)))
    # the actor pool computes what the in-process path computes
    local = predict_split(load_artifact(artifact), str(data), "test")
    order = {i: k for k, i in enumerate(local.ids)}
    np.testing.assert_allclose(preds.probs, local.probs[[order[i] for i in preds.ids]], atol=1e-5, rtol=0)
