"""The Kubernetes manifests and Ray Serve configs, checked statically (no cluster runs here):
every object against the Kubernetes API's schema (the kubernetes Python client's models: a
field it does not know is dropped on the round trip, a required one missing raises), the
RayService's Serve config against Ray Serve's own schema, and all of them against the app: its
routes, its port and user, its settings."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml
from kubernetes.client import ApiClient

from ivonserve.config import Settings, repo_root
from ivonserve.ray_serve import PROXY_CALLBACK, PROXY_CALLBACK_ENV, REPLICA_KEYS

DEPLOY = repo_root() / "deploy"
MODELS = {
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "PersistentVolumeClaim": "V1PersistentVolumeClaim",
}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _round_trip(obj: dict, model: str) -> dict:
    client = ApiClient()
    parsed = client.deserialize(json.dumps(obj), model, "application/json")
    return client.sanitize_for_serialization(parsed)


def _dropped(original, back, where: str = "") -> list[str]:
    """Paths present in the manifest but lost on the round trip: fields the schema lacks."""
    if isinstance(original, dict):
        lost = []
        for key, value in original.items():
            if not isinstance(back, dict) or key not in back:
                lost.append(f"{where}.{key}")
            else:
                lost += _dropped(value, back[key], f"{where}.{key}")
        return lost
    if isinstance(original, list):
        return [p for i, (a, b) in enumerate(zip(original, back, strict=False))
                for p in _dropped(a, b, f"{where}[{i}]")]  # fmt: skip
    return []


def _manifests() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
            if p.name != "kustomization.yaml" for doc in _documents(p)]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "doc"), _manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"]
)
def test_every_manifest_fits_the_kubernetes_schema(name, doc):
    assert doc["kind"] in MODELS, f"{name}: no schema model for kind {doc['kind']}"
    back = _round_trip(doc, MODELS[doc["kind"]])
    assert _dropped(doc, back) == [], f"{name}: fields the Kubernetes schema does not know"


def test_a_wrong_field_is_caught():
    (deployment,) = _documents(DEPLOY / "k8s" / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = container["readinessProbe"]
    assert _dropped(bad, _round_trip(bad, "V1Deployment")) != []
    nameless = json.loads(json.dumps(deployment))
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError):
        _round_trip(nameless, "V1Deployment")


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_the_deployment_fits_the_app_and_the_image():
    from ivonserve.server import create_app

    docs = {doc["kind"]: doc for _, doc in _manifests()}
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    dockerfile = (repo_root() / "Dockerfile").read_text()
    assert f"EXPOSE {container['ports'][0]['containerPort']}" in dockerfile
    user = pod["spec"]["securityContext"]["runAsUser"]
    assert f"USER {user}:{user}" in dockerfile
    routes = {r.path for r in create_app(Settings()).routes}
    probes = [container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe",
                                                          "readinessProbe")]  # fmt: skip
    assert set(probes) <= routes and container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for var in container["env"]:
        assert var["name"].removeprefix("IVONSERVE_").lower() in Settings.model_fields, var
    mounts = {m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts == set(volumes)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values()
              if "persistentVolumeClaim" in v}  # fmt: skip
    declared = {doc["metadata"]["name"] for doc in _documents(DEPLOY / "k8s" / "volumes.yaml")}
    assert claims <= declared
    labels = pod["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    drain = next(v["value"] for v in container["env"] if v["name"] == "IVONSERVE_DRAIN_TIMEOUT_S")
    assert grace > float(drain)  # the drain finishes before Kubernetes kills the pod


def _check_serve_config(config: dict) -> None:
    """Ray Serve's own schema, then each application against ivonserve."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    for application in config["applications"]:
        module, _, name = application["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), name))
        args = dict(application["args"])
        for key in REPLICA_KEYS:
            args.pop(key, None)
        Settings.build(**args)  # every other key is a valid setting


def test_the_serve_config_fits_ray_serve_and_ivonserve():
    _check_serve_config(yaml.safe_load((DEPLOY / "ray" / "serve-config.yaml").read_text()))


def test_the_rayservice_fits_kuberay_kubernetes_and_ivonserve():
    import ray

    (service,) = _documents(DEPLOY / "ray" / "rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the image's pinned Ray
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        template = group["template"]
        assert _dropped(template, _round_trip(template, "V1PodTemplateSpec")) == []
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for worker in cluster["workerGroupSpecs"]:
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    # every node runs a Serve proxy: each needs ivonserve's proxy middleware (a lost replica
    # answers an OpenAI-shaped 503, not Ray's bare 500)
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get(PROXY_CALLBACK_ENV) == PROXY_CALLBACK, container["name"]
    _check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert re.fullmatch(r"[a-z0-9-]+", service["metadata"]["name"])
