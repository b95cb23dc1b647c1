"""serve/*.yaml are valid Serve config files whose every key is known (Serve ignores misspelled keys), and
`mmfusion serve` prepares them for any artifact. No Ray cluster here."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from mmfusion.config import unknown_keys
from mmfusion.errors import ArtifactError, ConfigError
from mmfusion.serving.app import deployment_names
from mmfusion.serving.batching import BatchConfig
from mmfusion.serving.config import APP_IMPORT_PATH, check_serve_config, prepare_config
from mmfusion.serving.schemas import ServeArgs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {name: REPO / "serve" / f"{name}.yaml" for name in ("local", "production")}
ALL_SPLIT = deployment_names(["image", "text", "audio"], "split")


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_for_serve_and_every_key_is_known(name):
    raw = load(name)
    ServeDeploySchema.model_validate(raw)  # what `serve deploy` runs first
    assert unknown_keys(raw, ServeDeploySchema) == []
    check_serve_config(raw, name)
    (app,) = raw["applications"]
    assert app["import_path"] == APP_IMPORT_PATH
    assert "working_dir" not in (app.get("runtime_env") or {})  # Serve config files need a remote URI there
    ServeArgs.model_validate(app["args"])
    names = {d["name"] for d in app["deployments"]}  # what build_app creates (+ --topology single, monolith)
    assert set(ALL_SPLIT) <= names <= {*ALL_SPLIT, "Model", "Monolith"}


@pytest.mark.parametrize("name", CONFIGS)
def test_batch_sizes_fit_max_ongoing_requests(name):
    for d in load(name)["applications"][0]["deployments"]:
        if d["name"] == "Ingress":
            assert "user_config" not in d
            continue
        batch = BatchConfig.model_validate(d.get("user_config") or {})  # none: the defaults
        assert d["max_ongoing_requests"] >= batch.max_batch_size, d["name"]
        assert d["max_queued_requests"] > 0, d["name"]  # a bounded queue: overload becomes 503s, not latency


def test_local_fits_two_cores_without_gpu():
    raw = load("local")
    assert raw["http_options"]["host"] == "127.0.0.1"
    all_deps = raw["applications"][0]["deployments"]
    assert all("num_gpus" not in d["ray_actor_options"] for d in all_deps)
    for topology in ("split", "single", "monolith"):  # one app at a time: each topology's entries fit
        names = deployment_names(["image", "text", "audio"], topology)
        deps = [d for d in all_deps if d["name"] in names]
        assert sorted(d["name"] for d in deps) == sorted(names), topology
        replicas = [d.get("num_replicas", d.get("autoscaling_config", {}).get("max_replicas", 1))
                    for d in deps]
        assert sum(r * d["ray_actor_options"]["num_cpus"] for r, d in zip(replicas, deps, strict=True)) <= 2.0
    assert raw["applications"][0]["args"]["device"] == "cpu"


def test_production_autoscales_every_deployment_and_puts_encoders_on_gpus():
    raw = load("production")
    app = raw["applications"][0]
    deps = {d["name"]: d for d in app["deployments"]}
    for name, d in deps.items():
        a = d["autoscaling_config"]
        assert "num_replicas" not in d, name  # num_replicas with autoscaling_config is an error in Serve
        assert 1 <= a["min_replicas"] <= a["max_replicas"] and a["target_ongoing_requests"] > 0, name
        assert a["target_ongoing_requests"] <= d["max_ongoing_requests"], name
    assert deps["ImageEncoder"]["ray_actor_options"]["num_gpus"] >= 1
    assert deps["AudioEncoder"]["ray_actor_options"]["num_gpus"] > 0
    assert "num_gpus" not in deps["Ingress"]["ray_actor_options"]
    assert deps["Ingress"]["backpressure_config"]["retry_after_s"] > 0  # 503s carry Retry-After
    assert app["args"].get("api_key_env") and "api_key" not in app["args"]  # no secret in the file
    assert raw["http_options"]["request_timeout_s"] > 0


def test_unknown_keys_catch_what_serve_silently_ignores():
    raw = load("production")
    bad = copy.deepcopy(raw)
    auto = bad["applications"][0]["deployments"][1]["autoscaling_config"]
    auto["target_num_ongoing_requests_per_replica"] = auto.pop("target_ongoing_requests")  # the pre-2.x name
    bad["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpu"] = 1
    bad["http_options"]["request_timeout"] = 5
    ServeDeploySchema.model_validate(bad)  # Serve accepts all three typos ...
    found = unknown_keys(bad, ServeDeploySchema)  # ... this does not
    assert [k.split(" ")[0] for k in found] == [
        "http_options.request_timeout",
        "applications[0].deployments[0].ray_actor_options.num_gpu",
        "applications[0].deployments[1].autoscaling_config.target_num_ongoing_requests_per_replica",
    ]
    assert "target_ongoing_requests" in found[2]  # the message lists the allowed keys
    with pytest.raises(ConfigError, match="target_num_ongoing_requests_per_replica"):
        check_serve_config(bad, "bad.yaml")


@pytest.mark.parametrize("edit, needle", [
    (lambda a: a["args"].update(topolgy="single"), "args: topolgy"),
    (lambda a: a["args"].update(max_request_bytes=10), "max_request_bytes"),
    (lambda a: a["deployments"][1].update(max_ongoing_requests=4), "max_ongoing_requests=4 < user_config"),
    (lambda a: a["deployments"][1].setdefault("user_config", {}).update(max_batch=8),
     "user_config: max_batch"),
])
def test_check_serve_config_rejects_bad_args_and_batches(edit, needle):
    raw = load("local")
    edit(raw["applications"][0])
    with pytest.raises(ConfigError, match=needle):
        check_serve_config(raw, "local.yaml")


@pytest.fixture(scope="module")
def two_modality_artifact(tmp_path_factory):
    import torch
    from tests.helpers import tiny_config

    from mmfusion.artifact import save_artifact
    from mmfusion.data.preprocessor import input_spec
    from mmfusion.models.model import build_model

    root = tmp_path_factory.mktemp("serving_config")
    cfg = tiny_config(root / "data", root / "runs", "data.modalities=[image,text]")
    torch.manual_seed(0)
    model = build_model(cfg.model, input_spec(cfg.data), 3)
    return save_artifact(root / "artifact", model.state_dict(), cfg, ["a", "b", "c"], {})


def test_prepare_config_fits_the_config_to_the_artifact(two_modality_artifact, monkeypatch):
    monkeypatch.chdir(two_modality_artifact.parent)
    raw = prepare_config(load("local"), "artifact", host="0.0.0.0", port=8123)
    app = raw["applications"][0]
    assert app["args"]["artifact"] == str(two_modality_artifact)  # absolute: replicas have another cwd
    assert [d["name"] for d in app["deployments"]] == ["Ingress", "ImageEncoder", "TextEncoder", "Fusion"]
    assert raw["http_options"]["host"] == "0.0.0.0" and raw["http_options"]["port"] == 8123
    single = prepare_config(load("local"), str(two_modality_artifact), topology="single",
                            api_key_env="MY_KEY")
    assert [d["name"] for d in single["applications"][0]["deployments"]] == ["Ingress", "Model"]
    assert single["applications"][0]["args"]["topology"] == "single"
    assert single["applications"][0]["args"]["api_key_env"] == "MY_KEY"
    mono = prepare_config(load("local"), str(two_modality_artifact), topology="monolith")["applications"][0]
    assert [d["name"] for d in mono["deployments"]] == ["Monolith"]  # the model lives in the ingress replica
    assert BatchConfig.model_validate(mono["deployments"][0]["user_config"]).max_batch_size >= 1
    assert load("local") == yaml.safe_load(CONFIGS["local"].read_text())  # the input is not modified


def test_prepare_config_errors(two_modality_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="not an mmfusion artifact"):
        prepare_config(load("local"), str(tmp_path))
    two = load("local")
    two["applications"].append(copy.deepcopy(two["applications"][0]) | {"name": "b", "route_prefix": "/b"})
    with pytest.raises(ConfigError, match="exactly one application"):
        prepare_config(two, str(two_modality_artifact))
