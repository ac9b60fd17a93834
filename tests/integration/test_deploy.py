"""What can be checked of the deployment without Docker or Kubernetes, checked for real:
Prometheus's own promtool on the alert rules, the Kubernetes schemas on the rendered
manifests, docker-compose's own validation of the compose file, and millstream's settings
parser on every setting the manifests and the compose file pass to a worker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import metrics as millstream_metrics
from app.settings import ApiSettings
from tests.support.helpers import ROOT, run_cli
from tests.support.kustomize import render

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
NOT_MILLSTREAM = {"up"}  # Prometheus's own series, allowed in alert expressions


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed (.ci/run installs it)")
        pytest.skip(f"{binary} is not installed")
    return path


def exported_metric_names() -> set[str]:
    """Every series name millstream's metrics module can produce."""
    names: set[str] = set()
    for value in vars(millstream_metrics).values():
        name = getattr(value, "_name", None)
        kind = getattr(value, "_type", None)
        if not isinstance(name, str) or not name.startswith("millstream_"):
            continue
        if kind == "counter":
            names.add(name + "_total")
        elif kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
        else:
            names.add(name)
    return names


def metric_names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    return set(re.findall(r"\bmillstream_[a-z0-9_]+", without_labels)) | (
        set(re.findall(r"\b[a-z_]+\b(?=\s*\{)", without_strings)) & NOT_MILLSTREAM
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.mark.prometheus
def test_alert_rules_pass_promtool() -> None:
    promtool = _require("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  # Every worker down while the bridge and the lookup API still answer: the workers' alert fires.
  - interval: 1m
    input_series:
      - series: 'up{{job="millstream"}}'
        values: '0x10'
      - series: 'up{{job="millstream-api"}}'
        values: '1x10'
      - series: 'up{{job="millstream-bridge"}}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 8m
        alertname: MillstreamWorkerDown
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations: {{summary: "No millstream worker is being scraped"}}
  # One lookup in ten a 503 for a quarter of an hour: the API's alert fires.
  - interval: 1m
    input_series:
      - series: 'millstream_api_requests_total{{endpoint="latest",status="200"}}'
        values: '0+540x20'
      - series: 'millstream_api_requests_total{{endpoint="latest",status="503"}}'
        values: '0+60x20'
      - series: 'millstream_api_requests_total{{endpoint="windows",status="200"}}'
        values: '0+600x20'
      - series: 'millstream_api_requests_total{{endpoint="windows",status="503"}}'
        values: '0+6x20'
    alert_rule_test:
      - eval_time: 18m
        alertname: MillstreamLookupApiErrors
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "More than 5 % of lookup API answers are errors"
              description: "Mostly ScyllaDB not answering the reads (docs/api.md); ingestion is unaffected."
"""


@pytest.mark.prometheus
def test_the_worker_and_lookup_api_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule tests: the workers' down alert is not kept quiet by the API or bridge
    pods being up (their jobs are named millstream-*), and the API error alert fires at 5 %."""
    promtool = _require("promtool")
    tests = tmp_path / "rule-tests.yaml"
    tests.write_text(RULE_TESTS.format(rules=DEPLOY / "prometheus" / "alerts.yaml"))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_and_panel_uses_metrics_millstream_exports() -> None:
    exported = exported_metric_names()
    assert "millstream_consumer_lag_messages" in exported and "millstream_dlq_messages_total" in exported
    alerts = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    # The alerts the operations issue asks for.
    for wanted in (
        "ConsumerLagGrowing",
        "DeadLetterRate",
        "SinkErrors",
        "FlushStale",
        "NoDataFromFactory",
        "MessagesIsolated",
        "ScyllaWritesShadowed",
    ):
        assert f"Millstream{wanted}" in alerts
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "millstream.json").read_text())
    panels = {f"panel {p['title']}": t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    for where, expr in {**alerts, **panels}.items():
        used = metric_names_in(expr)
        assert used, f"{where}: no metric in {expr}"
        unknown = used - exported - NOT_MILLSTREAM
        assert not unknown, f"{where} uses metrics millstream does not export: {sorted(unknown)}"


def test_metric_name_check_catches_a_misspelt_metric() -> None:
    assert metric_names_in('rate(millstream_dlq_mesages_total{reason="x"}[5m])') - exported_metric_names() == {
        "millstream_dlq_mesages_total"
    }


def test_prometheus_rule_carries_the_alert_file() -> None:
    (rule,) = [d for d in render(DEPLOY / "base") if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())


def _base_with(tmp_path: Path, component: str) -> Path:
    """A kustomization of the base plus one of deploy/components, as a user's overlay would be."""
    directory = tmp_path / component
    directory.mkdir()
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
             "resources": [os.path.relpath(DEPLOY / "base", directory)],
             "components": [os.path.relpath(DEPLOY / "components" / component, directory)]}
        )
    )  # fmt: skip
    return directory


def _layouts(tmp_path: Path) -> dict[str, Path]:
    return {
        "base": DEPLOY / "base", "msk": DEPLOY / "overlays" / "msk", "msk-iam": DEPLOY / "overlays" / "msk-iam",
        "base+hpa": _base_with(tmp_path, "hpa"),
        "base+mqtt-bridge": _base_with(tmp_path, "mqtt-bridge"),
        "base+lookup-api": _base_with(tmp_path, "lookup-api"),
    }  # fmt: skip


def test_rendered_manifests_validate_against_the_kubernetes_schemas(tmp_path: Path) -> None:
    import kubernetes_validate

    for layout, directory in _layouts(tmp_path).items():
        docs = render(directory)
        kinds = {d["kind"] for d in docs}
        assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"} <= kinds, layout
        for doc in docs:
            if doc["kind"] in CUSTOM_KINDS:
                assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]], doc["kind"]
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{layout}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_schema_validation_catches_a_broken_manifest() -> None:
    import kubernetes_validate

    (statefulset,) = [d for d in render(DEPLOY / "base") if d["kind"] == "StatefulSet"]
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = {"name": "web"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The workers' objects by kind (not those of the bridge or the lookup API components)."""
    apart = ("millstream-api", "millstream-bridge")
    return {d["kind"]: d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") not in apart}


def test_manifests_hang_together() -> None:
    docs = _by_kind(render(DEPLOY / "overlays" / "msk"))
    config = docs["ConfigMap"]["data"]
    statefulset = docs["StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/millstream/millstream:0.1.0"
    # A stopping worker finishes or gives up its batch before Kubernetes kills it.
    assert pod["terminationGracePeriodSeconds"] > float(config["MILLSTREAM_PIPELINE__RETRY_BUDGET_S"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config["MILLSTREAM_DATA_DIR"] in mounts and "/tmp" in mounts  # the only writable places
    assert {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]} == {"data"}
    env = {e["name"]: e for e in container["env"]}
    assert env["MILLSTREAM_KAFKA__GROUP_INSTANCE_ID"]["value"] == "$(POD_NAME)"
    selector = statefulset["spec"]["selector"]["matchLabels"]
    for kind in ("Service", "PodDisruptionBudget"):
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        wanted = docs[kind]["spec"]["selector"]
        wanted = wanted.get("matchLabels", wanted)
        assert wanted.items() <= labels.items(), kind
    assert selector.items() <= docs["Service"]["metadata"]["labels"].items()  # the ServiceMonitor finds it
    # Lag autoscaling never goes past the partitions: an extra worker would sit idle.
    assert docs["ScaledObject"]["spec"]["maxReplicaCount"] == int(config["MILLSTREAM_KAFKA__PARTITIONS"])
    assert docs["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == statefulset["metadata"]["name"]
    for doc in docs.values():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "millstream", doc["kind"]


def _settings_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli("settings", **env)


def test_every_setting_the_manifests_pass_is_valid(tmp_path: Path) -> None:
    secret = yaml.safe_load((DEPLOY / "base" / "secret.example.yaml").read_text())["stringData"]
    for layout, directory in _layouts(tmp_path).items():
        config = _by_kind(render(directory))["ConfigMap"]["data"]
        result = _settings_check({**config, **secret, "MILLSTREAM_KAFKA__GROUP_INSTANCE_ID": "millstream-0"})
        assert result.returncode == 0, f"{layout}: {result.stderr}"
        effective = json.loads(result.stdout)
        assert "replace-me" not in result.stdout  # secrets stay masked
        assert effective["kafka"]["partitions"] == int(config["MILLSTREAM_KAFKA__PARTITIONS"])
    msk = _by_kind(render(DEPLOY / "overlays" / "msk"))["ConfigMap"]["data"]
    assert msk["MILLSTREAM_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert all(server.endswith(":9096") for server in msk["MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS"].split(","))
    iam = _by_kind(render(DEPLOY / "overlays" / "msk-iam"))
    config = iam["ConfigMap"]["data"]
    assert (config["MILLSTREAM_KAFKA__SECURITY_PROTOCOL"], config["MILLSTREAM_KAFKA__SASL_MECHANISM"]) == (
        "SASL_SSL", "AWS_MSK_IAM",
    )  # fmt: skip
    assert all(server.endswith(":9098") for server in config["MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS"].split(","))
    pod = iam["StatefulSet"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == iam["ServiceAccount"]["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in iam["ServiceAccount"]["metadata"]["annotations"]
    for layout in (msk, config):  # the stores over TLS where production runs
        assert layout["MILLSTREAM_CLICKHOUSE__URL"].startswith("clickhouses://")
        assert layout["MILLSTREAM_SCYLLA__TLS"] == "true"


def test_the_bridge_component_hangs_together(tmp_path: Path) -> None:
    docs = render(_layouts(tmp_path)["base+mqtt-bridge"])
    bridge = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "millstream-bridge")
    worker = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "millstream")
    pod = bridge["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == worker["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["args"] == ["bridge"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MILLSTREAM_BRIDGE__CLIENT_ID"] == "$(POD_NAME)"  # a restarted pod resumes its own session
    # The workers' Service, PodDisruptionBudget and ServiceMonitor must not select bridge pods.
    labels = pod["metadata"]["labels"]
    for doc in docs:
        if (
            doc["kind"] in ("Service", "PodDisruptionBudget", "ServiceMonitor")
            and doc["metadata"]["name"] == "millstream"
        ):
            wanted = doc["spec"]["selector"]
            wanted = wanted.get("matchLabels", wanted)
            assert not wanted.items() <= labels.items(), doc["kind"]
    config = _by_kind(docs)["ConfigMap"]["data"]
    secret = yaml.safe_load((DEPLOY / "base" / "secret.example.yaml").read_text())["stringData"]
    bridge_env = {k: v for k, v in env.items() if k.startswith("MILLSTREAM_")} | {"MILLSTREAM_BRIDGE__CLIENT_ID": "b-0"}
    result = _settings_check({**config, **secret, **bridge_env})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bridge"]["client_id"] == "b-0"


def test_the_lookup_api_component_hangs_together() -> None:
    """What the production overlays run: millstream api pods apart from the workers."""
    for overlay in ("msk", "msk-iam"):
        docs = render(DEPLOY / "overlays" / overlay)
        api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "millstream-api")
        worker = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "millstream")
        container = api["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == worker["spec"]["template"]["spec"]["containers"][0]["image"]
        assert container["args"] == ["api"]
        config = _by_kind(docs)["ConfigMap"]["data"]
        port = int(config.get("MILLSTREAM_API__WEB_PORT", ApiSettings().web_port))
        assert [p["containerPort"] for p in container["ports"]] == [port]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert config.get("MILLSTREAM_SCYLLA__ENABLED", "true") == "true"  # millstream api refuses to start without
        # The API's Service and ServiceMonitor find its pods and only them; the workers' find none of them.
        api_labels, worker_labels = (
            api["spec"]["template"]["metadata"]["labels"],
            worker["spec"]["template"]["metadata"]["labels"],
        )
        for doc in docs:
            if doc["kind"] not in ("Service", "PodDisruptionBudget", "ServiceMonitor"):
                continue
            wanted = doc["spec"]["selector"]
            wanted = wanted.get("matchLabels", wanted)
            ours = doc["metadata"]["name"] == "millstream-api"
            assert (wanted.items() <= api_labels.items()) == ours, (overlay, doc["kind"], doc["metadata"]["name"])
            assert not (ours and wanted.items() <= worker_labels.items())
        assert api["metadata"]["namespace"] == "millstream"


def test_settings_check_catches_a_misspelt_variable() -> None:
    result = _settings_check({"MILLSTREAM_KAFKA__PARTITONS": "12"})
    assert result.returncode == 2 and "MILLSTREAM_KAFKA__PARTITONS" in result.stderr


def test_kubectl_kustomize_renders_the_same(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the built-in renderer is not cross-checked on this machine")
    for layout, directory in _layouts(tmp_path).items():
        result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        theirs = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(result.stdout) if d)
        ours = sorted(json.dumps(d, sort_keys=True) for d in render(directory))
        assert ours == theirs, layout


def test_compose_file_validates_and_passes_valid_settings() -> None:
    compose = _require("docker-compose")
    result = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"kafka", "scylla", "clickhouse", "prometheus", "grafana", "mosquitto", "bridge", "simulator"} <= set(
        services
    )
    workers = [name for name, s in services.items() if s.get("command") == ["worker"]]
    assert len(workers) == 2
    # devices -> MQTT -> bridge -> Kafka: the simulator publishes to the Mosquitto the bridge reads
    simulator, bridge = services["simulator"], services["bridge"]
    assert (
        simulator["command"][simulator["command"].index("--mqtt") + 1]
        == bridge["environment"]["MILLSTREAM_BRIDGE__MQTT_URL"]
    )
    assert bridge["command"] == ["bridge"] and "mosquitto" in bridge["depends_on"]
    for name in [*workers, "simulator", "bridge"]:
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        result = _settings_check(env)
        assert result.returncode == 0, f"{name}: {result.stderr}"
    for name in workers:
        depends = services[name]["depends_on"]
        assert all(depends[s]["condition"] == "service_healthy" for s in ("kafka", "scylla", "clickhouse"))
    for name in ("kafka", "scylla", "clickhouse", "mosquitto"):
        assert "healthcheck" in services[name], name


def test_dockerfile_runs_as_non_root_from_a_slim_multi_stage_build() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) >= 2 and all("slim" in image for image in stages)
    assert re.search(r"^USER 10001", text, re.MULTILINE)
    # Everything the worker imports is copied into the image.
    for package in ("app", "agents", "models", "sinks"):
        assert f"COPY {package} ./{package}" in text
