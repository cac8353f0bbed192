#!/usr/bin/env bash
# Check the operations files in deploy/ without starting Prometheus or Grafana:
#  1. promtool check config deploy/prometheus/prometheus.yml (in a copy, with a placeholder
#     admin-key next to it: the real one is the operator's and git-ignored);
#  2. promtool check rules deploy/prometheus/alerts.yml;
#  3. promtool test rules deploy/prometheus/alerts_test.yml (the alerts' unit tests);
#  4. the Grafana dashboard is JSON and it and the rules name only metrics the code exports
#     (python -m worker.devtools.deploy_check).
# promtool comes from Debian's `prometheus` package (.ci/run installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${CI_PYTHON:-python3}

command -v promtool >/dev/null || { echo "check-deploy: promtool not found (apt-get install prometheus)" >&2; exit 1; }

copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml "$copy/"
echo placeholder > "$copy/admin-key"

echo "== promtool check config"
promtool check config "$copy/prometheus.yml"
echo "== promtool check rules"
promtool check rules deploy/prometheus/alerts.yml
echo "== promtool test rules"
(cd deploy/prometheus && promtool test rules alerts_test.yml)
echo "== dashboard and rules name only exported metrics"
"$python" -m json.tool deploy/grafana/edit-worker.json >/dev/null
"$python" -m worker.devtools.deploy_check
echo "deploy checks passed"
