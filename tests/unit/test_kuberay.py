"""deploy/kuberay: the manifests parse, agree with the pinned versions, run with token auth, and the
RayService's serveConfigV2 is exactly what `python -m mmfusion.cluster` generates from
serve/production.yaml."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from mmfusion.cluster import embedded_serve_config, main, render_rayservice, serve_config_v2, sync_rayservice
from mmfusion.config import load_config
from mmfusion.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
IMAGE_DIR = "/home/ray/mmfusion"  # the Dockerfile's WORKDIR: jobs/ and serve/ are copied there

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PINS = {m.group(1): m.group(3) for d in PROJECT["dependencies"]
        if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", d.strip()))}
VERSION, RAY = PROJECT["version"], PINS["ray"]
IMAGE_TAG = f"mmfusion:{VERSION}-ray{RAY}-gpu"

SMALL_SERVE = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "127.0.0.1", "port": 8123},
    "applications": [{
        "name": "mmfusion", "route_prefix": "/", "import_path": "mmfusion.serving.app:build_app",
        "args": {"artifact": "s3://bucket/artifact", "api_key_env": "MMFUSION_API_KEY"},
        "deployments": [{"name": "Ingress", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}],
    }],
}


def load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name, kind", [("rayjob-train.yaml", "RayJob"), ("rayservice.yaml", "RayService")])
def test_manifest_pins_auth_and_shape(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == RAY
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no work on the head
    for c in containers(spec):
        assert c["image"].split("/")[-1] == IMAGE_TAG, c["image"]
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu[0]["minReplicas"] <= gpu[0]["maxReplicas"]


def test_dockerfile_matches_the_pins():
    text = (KUBERAY / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-py311-gpu$", text, re.M)
    for name in ("torch", "torchvision", "torchaudio"):
        assert f'"{name}=={PINS[name]}"' in text
    assert f"mmfusion-{VERSION}-py3-none-any.whl" in text and f"ray[data,train,tune,serve]=={RAY}" in text
    assert f"WORKDIR {IMAGE_DIR}" in text


def test_rayjob_entrypoint_is_a_valid_training_command_on_shared_storage():
    from mmfusion.cli import build_parser

    argv = shlex.split(load("rayjob-train.yaml")["spec"]["entrypoint"])
    assert argv[0] == "mmfusion"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.config.startswith(f"{IMAGE_DIR}/jobs/configs/")
    local_config = REPO / Path(args.config).relative_to(IMAGE_DIR)  # the file the image carries
    cfg = load_config(local_config, args.overrides)  # every override is a real, valid key
    assert cfg.train.storage_path.startswith("s3://") and cfg.data.path.startswith("s3://")
    assert cfg.train.use_gpu and cfg.train.num_workers >= 2


def test_rayservice_serve_config_is_generated_from_serve_production():
    serve_file = REPO / "serve" / "production.yaml"
    manifest = (KUBERAY / "rayservice.yaml").read_text()
    expected = render_rayservice(manifest, serve_config_v2(yaml.safe_load(serve_file.read_text())),
                                 "serve/production.yaml")
    assert manifest == expected, \
        "run `python -m mmfusion.cluster` to regenerate deploy/kuberay/rayservice.yaml"
    embedded = embedded_serve_config(manifest)
    assert embedded["applications"] == yaml.safe_load(serve_file.read_text())["applications"]


def test_rayservice_puts_the_api_key_on_every_worker():
    doc = load("rayservice.yaml")
    apps = embedded_serve_config((KUBERAY / "rayservice.yaml").read_text())["applications"]
    key_envs = {a["args"]["api_key_env"] for a in apps if (a.get("args") or {}).get("api_key_env")}
    assert key_envs, "serve/production.yaml should protect the HTTP endpoint with an API key"
    workers = [c for g in cluster_spec(doc)["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    for c in workers:  # replicas (the ingress that checks the key included) run on any worker
        env = {e["name"]: e for e in c.get("env", [])}
        for name in key_envs:
            assert env[name]["valueFrom"]["secretKeyRef"]["name"], (c["name"], name)


# ------------------------------------------------------------------------ the generator on its own


def test_generator_rewrites_only_the_block_and_is_idempotent(tmp_path):
    serve, manifest = tmp_path / "serve.yaml", tmp_path / "deploy" / "kuberay" / "rayservice.yaml"
    manifest.parent.mkdir(parents=True)
    serve.write_text(yaml.safe_dump(SMALL_SERVE))
    original = (KUBERAY / "rayservice.yaml").read_text()
    manifest.write_text(original)

    cli = ["--serve-config", str(serve), "--rayservice", str(manifest),
           "--cluster", str(REPO / "cluster.yaml")]
    assert main([*cli, "--check"]) == 1  # out of date, and --check does not write
    assert sync_rayservice(manifest, serve) is False  # rewrote it
    assert sync_rayservice(manifest, serve, check=True) is True  # and now it is up to date
    out = manifest.read_text()
    embedded = embedded_serve_config(out)
    assert embedded["applications"] == SMALL_SERVE["applications"]
    # where KubeRay's serve Service points
    assert embedded["http_options"] == {"host": "0.0.0.0", "port": 8000}
    # everything outside the block is untouched, comments included
    head, tail = original.split("  serveConfigV2: |\n")[0], original.split("\n  rayClusterConfig:")[1]
    assert out.startswith(head + "  serveConfigV2: |\n") and out.endswith("\n  rayClusterConfig:" + tail)
    assert main([*cli, "--check"]) == 0
    assert "# generated by `python -m mmfusion.cluster` from serve.yaml" in out


@pytest.mark.parametrize("bad, needle", [
    ({"applications": []}, "applications"),
    ({**SMALL_SERVE, "http_option": {}}, "unknown key http_option"),
    ({"applications": [{**SMALL_SERVE["applications"][0], "runtime_env": {"working_dir": "."}}]},
     "remote URIs"),
])
def test_generator_rejects_bad_serve_configs(bad, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        serve_config_v2(bad, "serve.yaml")


def test_generator_needs_exactly_one_block():
    with pytest.raises(ConfigError, match="exactly one `serveConfigV2: |` block, found 0"):
        render_rayservice("kind: RayService\nspec: {}\n", "applications: []\n")
