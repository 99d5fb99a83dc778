#!/usr/bin/env bash
# Validate everything in deploy/ with real validators; exit non-zero on any error.
#
#   bash deploy/validate.sh
#
# - Kubernetes manifests: kubernetes-validate (PyPI; bundles the Kubernetes JSON schemas and
#   works offline) in strict mode (unknown fields are errors), against the oldest and newest
#   Kubernetes versions in K8S_VERSIONS; and the kustomize build of deploy/kubernetes when kubectl
#   is on the PATH (`kubectl kustomize`, offline).
# - Prometheus rules: promtool (Debian package `prometheus`) `check rules` and `test rules`
#   (deploy/prometheus/alerts.test.yaml); the Grafana dashboard's PromQL is checked by promtool
#   too, as recording rules.
# - Everything else (Grafana JSON, collector, Dockerfile, the probes, replicas, runbooks, metric
#   names): tests/unit/test_deploy.py.
#
# Missing tools are installed: Python packages into .venv (created like `make` does when
# missing), promtool with apt-get when root, else unpacked from the Debian package into
# ~/.cache/mission-runner/deploy-tools (apt-get download works without root).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
KUBERNETES_VALIDATE_VERSION=1.37.0
# Oldest and newest Kubernetes minor versions the manifests must be valid for.
K8S_VERSIONS=${K8S_VERSIONS:-"1.28.0 1.37.0"}
TOOLS_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/mission-runner/deploy-tools

say() { printf '==> %s\n' "$*"; }

# -- tools ------------------------------------------------------------------------------------

if [ ! -x "$PY" ]; then
    say "creating $VENV with the project and its development dependencies"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[dev]'
fi

if ! "$PY" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null \
    || ! "$PY" -c 'import yaml' 2>/dev/null; then
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and PyYAML into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML>=6"
fi

PROMTOOL=$(command -v promtool || true)
if [ -z "$PROMTOOL" ] && [ -x "$TOOLS_DIR/usr/bin/promtool" ]; then
    PROMTOOL="$TOOLS_DIR/usr/bin/promtool"
fi
if [ -z "$PROMTOOL" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        say "installing promtool (Debian package prometheus)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        PROMTOOL=$(command -v promtool)
    else
        say "unpacking promtool from the Debian package prometheus into $TOOLS_DIR"
        mkdir -p "$TOOLS_DIR"
        (cd "$TOOLS_DIR" && apt-get download prometheus >/dev/null && dpkg-deb -x prometheus_*.deb .)
        PROMTOOL="$TOOLS_DIR/usr/bin/promtool"
    fi
fi

say "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n 1)"
say "$("$PROMTOOL" --version 2>&1 | head -n 1)"

# -- checks -----------------------------------------------------------------------------------

failed=()
check() {
    local name=$1
    shift
    say "$name"
    if "$@"; then
        return 0
    fi
    printf 'FAILED: %s\n' "$name" >&2
    failed+=("$name")
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Every Kubernetes object in deploy/kubernetes (the example Secret too), strict schema check.
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
for version in $K8S_VERSIONS; do
    check "kubernetes-validate --strict, Kubernetes $version" \
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done

if command -v kubectl >/dev/null 2>&1; then
    render_and_validate() {
        kubectl kustomize deploy/kubernetes >"$tmp/rendered.yaml" &&
            "$VENV/bin/kubernetes-validate" --strict --quiet "$tmp/rendered.yaml"
    }
    check "kubectl kustomize deploy/kubernetes | kubernetes-validate --strict" render_and_validate
else
    say "kubectl not found: the kustomize build is not checked (its resources are, above)"
fi

check "promtool check rules deploy/prometheus/alerts.yaml" \
    "$PROMTOOL" check rules deploy/prometheus/alerts.yaml
check "promtool test rules deploy/prometheus/alerts.test.yaml" \
    "$PROMTOOL" test rules deploy/prometheus/alerts.test.yaml

# The dashboard's queries as recording rules, Grafana's variables replaced by plain values.
dashboard_rules() {
    "$PY" - deploy/grafana/mission-runner.json >"$tmp/dashboard-rules.yaml" <<'EOF'
import json
import sys

board = json.load(open(sys.argv[1]))
values = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "${instance}": ".*",
    "$instance": ".*",
}
rules = []
for panel in board["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
        name = f"dashboard_panel_{panel['id']}_{target['refId']}"
        rules.append({"record": name, "expr": expr})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, sys.stdout, indent=1)
EOF
    "$PROMTOOL" check rules "$tmp/dashboard-rules.yaml"
}
check "promtool check rules on the dashboard's queries" dashboard_rules

check "dashboard JSON parses" "$PY" -m json.tool deploy/grafana/mission-runner.json /dev/null

check "structural tests: tests/unit/test_deploy.py" \
    "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_deploy.py

if [ ${#failed[@]} -gt 0 ]; then
    printf '\n%d check(s) failed:\n' "${#failed[@]}" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
say "deploy/: all checks passed"
