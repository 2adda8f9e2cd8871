"""The deploy files parse, agree with each other and with the app (probe paths, port, settings, key format)."""

from pathlib import Path

import yaml

from retro_peft.serving.app import create_app
from retro_peft.serving.auth import parse_key_list
from retro_peft.serving.settings import ServeSettings, load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def manifests() -> dict[str, dict]:
    docs = {}
    for file in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(file.read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], file
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_kubernetes_manifests_fit_together_and_the_app(tmp_path):
    docs = manifests()
    assert {"Deployment/retro-peft-serve", "Service/retro-peft-serve", "HorizontalPodAutoscaler/retro-peft-serve",
            "ConfigMap/retro-peft-serve", "Secret/retro-peft-serve", "Deployment/retro-peft-redis",
            "Service/retro-peft-redis", "PersistentVolumeClaim/retro-peft-data"} <= set(docs)
    deployment = docs["Deployment/retro-peft-serve"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    service = docs["Service/retro-peft-serve"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container["ports"]]

    # The app's paths: its routes are in included routers, which FastAPI lists in app.routes as routers.
    routes = set(create_app(ServeSettings(auth={"allow_unauthenticated": True})).openapi()["paths"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert {"/health/live", "/health/ready"} <= routes

    hpa = docs["HorizontalPodAutoscaler/retro-peft-serve"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    # The ConfigMap is a valid settings file, mounted where the container reads it.
    config = docs["ConfigMap/retro-peft-serve"]
    (tmp_path / "serve.yaml").write_text(config["data"]["serve.yaml"])
    settings = load_settings(tmp_path / "serve.yaml")
    assert settings.limits.storage_uri.startswith("redis://retro-peft-redis:")
    assert settings.cache.redis_url.startswith("redis://retro-peft-redis:")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"][container["args"].index("--config") + 1] == f"{mounts['config']}/serve.yaml"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]

    secret = docs["Secret/retro-peft-serve"]
    assert parse_key_list(secret["stringData"]["RETRO_PEFT_API_KEYS"])
    assert container["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(
        next(e["value"] for e in container["env"] if e["name"] == "RETRO_PEFT_GRACEFUL_SHUTDOWN_S"))


def test_dockerfile_serves_on_the_port_the_deployment_uses():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM python:3.")
    assert "EXPOSE 8000" in lines
    cmd = next(line for line in lines if line.startswith("CMD ["))
    assert '"serve"' in cmd and '"8000"' in cmd and "/etc/retro-peft/serve.yaml" in cmd
    container = manifests()["Deployment/retro-peft-serve"]["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8000
