"""Structural checks of deploy/: the image, the Kubernetes manifests, alerts, dashboard, collector.

deploy/validate.sh runs the real validators (kubernetes-validate against the Kubernetes
schemas, promtool on the rules); these tests pin what a schema cannot: one replica, the probes'
paths, non-root, the alerts' runbooks, and that every metric the alerts and the dashboard query
is one the service exports (by its Prometheus name).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mission_runner.metrics import Metrics
from mission_runner.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"

# Every metric deploy/ may query, by its Prometheus name (counters end in _total), with its type.
# The service's metrics and the predecessor's names it keeps (shared/spec/domain.md §8).
METRICS: dict[str, str] = {
    "mana_ai_replication_lag_bytes": "gauge",
    "mana_ai_replication_retained_wal_bytes": "gauge",
    "mana_ai_replication_safe_wal_bytes": "gauge",
    "mana_ai_replication_wal_status": "gauge",
    "mana_ai_replication_lag_seconds": "gauge",
    "mana_ai_replication_spill_bytes": "gauge",
    "mana_ai_replication_stream_bytes": "gauge",
    "mana_ai_stream_transactions_total": "counter",
    "mana_ai_stream_rows_total": "counter",
    "mana_ai_stream_dead_letters_total": "counter",
    "mana_ai_checkpoint_lsn": "gauge",
    "mana_ai_commit_to_apply_seconds": "histogram",
    "mana_ai_dispatch_delay_seconds": "histogram",
    "mana_ai_snapshots": "gauge",
    "mana_ai_stream_rebuilds_total": "counter",
    "mana_ai_stream_reconnects_total": "counter",
    "mana_ai_stream_connected": "gauge",
    "mana_ai_plans_produced_total": "counter",
    "mana_ai_plans_written_back_total": "counter",
    "mana_ai_mission_errors_total": "counter",
    "mana_ai_provider_errors_total": "counter",
    "mana_ai_agent_decisions_total": "counter",
    "mana_ai_tokens_used_total": "counter",
    "mana_ai_grant_scope_violations_total": "counter",
    "mana_ai_http_requests_total": "counter",
    "mana_ai_http_request_duration_seconds": "histogram",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\bmana_ai_[a-z0-9_]+\b")

# What the alert rules must cover (issue: lag bytes and seconds, wal_status unreserved/lost, no
# progress while WAL grows, dead letters, rebuilds, disconnected, planner errors, scope violations).
REQUIRED_ALERTS = {
    "MissionRunnerLagBytesHigh",
    "MissionRunnerLagSecondsHigh",
    "MissionRunnerWalUnreserved",
    "MissionRunnerWalLost",
    "MissionRunnerNoProgress",
    "MissionRunnerDeadLetters",
    "MissionRunnerRebuilt",
    "MissionRunnerStreamDisconnected",
    "MissionRunnerPlannerErrors",
    "MissionRunnerProviderErrors",
    "MissionRunnerGrantScopeViolation",
}
ALERT_PREFIX = "MissionRunner"

# Settings that are secrets: never in the ConfigMap, always from the Secret.
SECRET_SETTINGS = {
    "DATABASE_URL",
    "PLANNER_API_KEY",
    "MISSION_MASTER_KEY",
    "MISSION_GRANT_PRIVATE_KEY",
}


def _yaml() -> Any:
    # PyYAML is not a runtime dependency of the service; it is needed only here.
    return pytest.importorskip("yaml", reason="PyYAML is needed to read deploy/ YAML")


def load_all(path: Path) -> list[Any]:
    docs = [d for d in _yaml().safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    return docs


def load(path: Path) -> Any:
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one document, got {len(docs)}"
    return docs[0]


def unknown_metrics(text: str) -> set[str]:
    """Names of the form mana_ai_* in `text` that select no series the service exports.

    A histogram exists only as its _bucket, _sum and _count series; its bare name selects nothing.
    """
    unknown = set()
    for name in METRIC_NAME.findall(text):
        if METRICS.get(name) in ("gauge", "counter"):
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SERIES if name.endswith(s)), None)
        if base is not None and METRICS.get(base) == "histogram":
            continue
        unknown.add(name)
    return unknown


def kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


# -- the metric list itself ---------------------------------------------------------------------


def test_metric_list_agrees_with_the_registry() -> None:
    """A name in METRICS that the service registers has the type the list says."""
    exported: dict[str, str] = {}
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exported[name] = family.type
    checked = {name: kind for name, kind in METRICS.items() if name in exported}
    assert checked, "none of the listed metrics is registered: wrong names?"
    assert {name: exported[name] for name in checked} == checked


# -- every YAML file ----------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 10
    for path in files:
        load_all(path)


# -- Kubernetes ---------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """The resources kustomization.yaml lists, by kind."""
    kustomization = load(K8S / "kustomization.yaml")
    by_kind: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_all(K8S / name):
            assert doc["kind"] not in by_kind, f"two {doc['kind']} resources"
            by_kind[doc["kind"]] = doc
    return by_kind


def container(sts: dict[str, Any]) -> dict[str, Any]:
    containers = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = load(K8S / "kustomization.yaml")
    assert "namespace" not in kustomization, "manifests stay namespace-agnostic"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert "secret.example.yaml" not in listed, "applying it would overwrite the real Secret"
    assert listed == on_disk - {"secret.example.yaml"}
    assert set(manifests()) == {
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
    }
    for doc in manifests().values():
        assert "namespace" not in doc["metadata"]


def test_statefulset_runs_exactly_one_pod_at_a_time() -> None:
    spec = manifests()["StatefulSet"]["spec"]
    assert spec["replicas"] == 1
    assert spec["podManagementPolicy"] == "OrderedReady"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"].get("rollingUpdate", {}).get("partition", 0) == 0
    assert "volumeClaimTemplates" not in spec, "state lives in PostgreSQL"
    pod = spec["template"]["spec"]
    # SIGTERM: the service exits within 10 s; leave room, but not minutes.
    assert 15 <= pod["terminationGracePeriodSeconds"] <= 60
    # Service links would inject MISSION_RUNNER_* variables for the Service of that name.
    assert pod["enableServiceLinks"] is False


def test_statefulset_probes() -> None:
    c = container(manifests()["StatefulSet"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "http"), probe
        assert c[probe]["timeoutSeconds"] >= 1
    # A lagging or waiting instance is not ready; liveness must not restart it for that, and
    # must give a slow boot time (the startup probe covers it before liveness starts).
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30


def test_statefulset_command_resources_and_security() -> None:
    sts = manifests()["StatefulSet"]
    c = container(sts)
    assert [*c["command"], *c["args"]] == ["mission-runner", "run"]
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}, kind
    pod_sc = sts["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] > 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_config_from_configmap_and_secrets_from_secret() -> None:
    by_kind = manifests()
    c = container(by_kind["StatefulSet"])
    configmap = by_kind["ConfigMap"]
    assert c["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    data = configmap["data"]
    assert not SECRET_SETTINGS & set(data), "secrets do not belong in the ConfigMap"
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    assert data["HTTP_HOST"] == "0.0.0.0"
    assert int(data["HTTP_PORT"]) == 8080
    assert data["LOG_FORMAT"] == "json"
    for name in (
        "MISSION_RUNNER_SLOT",
        "MISSION_RUNNER_PUBLICATION",
        "MISSION_RUNNER_STATUS_INTERVAL",
        "MISSION_RUNNER_HEARTBEAT_INTERVAL",
        "MISSION_RUNNER_BATCH_MAX_DELAY",
        "MISSION_RUNNER_READY_MAX_LAG",
        "LOG_LEVEL",
        "PLANNER_URL",
        "PLANNER_MODEL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
    ):
        assert name in data, name

    example = load(K8S / "secret.example.yaml")
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == SECRET_SETTINGS
    for name, ref in refs.items():
        assert ref["name"] == example["metadata"]["name"]
        assert ref["key"] in example["stringData"], name
        # Only the database is required; the rest are optional (planner key, later: grants).
        assert ref.get("optional", False) is (name != "DATABASE_URL"), name
    for name, value in example["stringData"].items():
        assert "CHANGE-ME" in value, f"{name}: the example holds placeholders only"


def test_the_service_accepts_the_configmap_and_the_example_secret() -> None:
    """The pod's environment, as Kubernetes builds it, passes the service's own settings parser."""
    by_kind = manifests()
    env = dict(by_kind["ConfigMap"]["data"])
    env.update(load(K8S / "secret.example.yaml")["stringData"])
    for entry in container(by_kind["StatefulSet"])["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    settings = Settings.from_env(env)
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", 8080)
    assert settings.log_format == "json"
    # The service's own shutdown fits in the pod's grace period with room to spare.
    grace = by_kind["StatefulSet"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.shutdown_grace * 2 <= grace


def test_selectors_match_the_pod() -> None:
    by_kind = manifests()
    sts = by_kind["StatefulSet"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    selector = sts["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = by_kind["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    pdb = by_kind["PodDisruptionBudget"]["spec"]
    assert "minAvailable" not in pdb, "minAvailable: 1 with one replica blocks every drain"
    account = by_kind["ServiceAccount"]["metadata"]["name"]
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_service_is_headless_and_scrapes_pods_that_are_not_ready() -> None:
    by_kind = manifests()
    service = by_kind["Service"]
    assert by_kind["StatefulSet"]["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    # Lag makes the pod not ready; its metrics (and the lag alerts) must not vanish with it.
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")]


# -- Prometheus rules ---------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    rules = load(DEPLOY / "prometheus" / "alerts.yaml")
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_alerts_cover_the_issue_and_link_their_runbooks() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules:
        name = rule["alert"]
        assert name.startswith(ALERT_PREFIX), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        anchor = kebab(name.removeprefix(ALERT_PREFIX))
        assert notes["runbook"] == f"README.md#alert-{anchor}", name


def test_readme_has_every_runbook_anchor() -> None:
    """Once README.md has alert runbooks, every alert's anchor must exist there."""
    text = (ROOT / "README.md").read_text()
    anchors = set(re.findall(r'id="(alert-[a-z0-9-]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    anchors = {a for a in anchors if a.startswith("alert-")}
    if not anchors:
        pytest.skip("README.md has no alert runbook sections yet")
    wanted = {r["annotations"]["runbook"].removeprefix("README.md#") for r in alert_rules()}
    assert wanted <= anchors, sorted(wanted - anchors)


def test_alert_severities() -> None:
    severity = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}
    assert severity["MissionRunnerWalUnreserved"] == "warning"
    assert severity["MissionRunnerWalLost"] == "critical"
    assert severity["MissionRunnerGrantScopeViolation"] == "critical"


def test_alerts_query_only_exported_metrics() -> None:
    for rule in alert_rules():
        assert METRIC_NAME.search(rule["expr"]), rule["alert"]
        assert not unknown_metrics(rule["expr"]), rule["alert"]


def test_alert_unit_tests_cover_the_rules_file() -> None:
    tests = load(DEPLOY / "prometheus" / "alerts.test.yaml")
    assert tests["rule_files"] == ["alerts.yaml"]
    tested = {
        case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])
    }
    assert {"MissionRunnerNoProgress", "MissionRunnerWalLost", "MissionRunnerDeadLetters"} <= tested
    assert tested <= {r["alert"] for r in alert_rules()}


# -- Grafana ------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((DEPLOY / "grafana" / "mission-runner.json").read_text())
    return result


def test_dashboard_structure() -> None:
    board = dashboard()
    for key in ("title", "uid", "panels", "templating", "schemaVersion", "time"):
        assert key in board, key
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_queries_only_exported_metrics_and_shows_the_key_ones() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for expr in exprs:
        assert not unknown_metrics(expr), expr
    used = {m for expr in exprs for m in METRIC_NAME.findall(expr)}
    wanted = {
        "mana_ai_replication_lag_bytes",
        "mana_ai_replication_lag_seconds",
        "mana_ai_replication_retained_wal_bytes",
        "mana_ai_replication_safe_wal_bytes",
        "mana_ai_replication_wal_status",
        "mana_ai_stream_transactions_total",
        "mana_ai_stream_rows_total",
        "mana_ai_commit_to_apply_seconds_bucket",
        "mana_ai_stream_dead_letters_total",
        "mana_ai_snapshots",
        "mana_ai_dispatch_delay_seconds_bucket",
        "mana_ai_plans_produced_total",
        "mana_ai_provider_errors_total",
    }
    assert wanted <= used, wanted - used


# -- OpenTelemetry Collector --------------------------------------------------------------------


def test_collector_pipelines_reference_defined_components() -> None:
    config = load(DEPLOY / "otel" / "collector.yaml")
    protocols = config["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc", "http"}
    service = config["service"]
    for ext in service.get("extensions", []):
        assert ext in config["extensions"], ext
    assert service["pipelines"]
    for name, pipeline in service["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in config[section], f"{name}: {section} {component}"
        assert "batch" in pipeline["processors"], name
        assert pipeline["processors"][0] == "memory_limiter", name
    exporter_types = {e.split("/")[0] for e in config["exporters"]}
    assert "debug" in exporter_types
    assert exporter_types & {"otlp", "otlp_grpc", "otlphttp", "otlp_http"}


# -- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_multi_stage_non_root() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for i, rest in instructions if i == "ARG" and "=" in rest)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    froms = [rest for i, rest in instructions if i == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    final = instructions[max(n for n, (i, _) in enumerate(instructions) if i == "FROM") :]
    users = [rest for i, rest in final if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users
    envs = " ".join(rest for i, rest in final if i == "ENV")
    assert "HTTP_HOST=0.0.0.0" in envs
    assert ("EXPOSE", "8080") in final
    assert json.loads(dict(final)["ENTRYPOINT"]) + json.loads(dict(final)["CMD"]) == [
        "mission-runner",
        "run",
    ]
    runs = " ".join(rest for i, rest in instructions if i == "RUN")
    assert "pip install" in runs and "[dev]" not in runs


def test_dockerfile_copies_every_package_and_the_context_allows_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["packages"])
    copied: set[str] = set()
    for instruction, rest in dockerfile_instructions():
        words = rest.split()
        if instruction == "COPY" and not words[0].startswith("--"):
            copied.update(w.rstrip("/") for w in words[:-1])
    assert copied == packages | {"pyproject.toml", "README.md", "setup.py"}
    # The ignore file is an allowlist: "*" first, then each path the image needs.
    lines = [
        ln.strip()
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    assert {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")} == copied
