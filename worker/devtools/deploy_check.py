"""Checks that the operations files in deploy/ (the Grafana dashboard, the Prometheus alert rules
and their tests) name only metrics the code exports (worker/metrics.py: the catalog and the API's
gauges), and that the dashboard's and the rules' queries each use at least one of them.

`python -m worker.devtools.deploy_check` prints what it checked and exits 1 on an unknown name
(.ci/check-deploy.sh runs it after promtool).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from worker.metrics import exported_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "edit-worker.json"
RULE_FILES = (ROOT / "deploy" / "prometheus" / "alerts.yml", ROOT / "deploy" / "prometheus" / "alerts_test.yml")

NAME = re.compile(r"\bedit_worker_[a-zA-Z0-9_]*")
EXPR = re.compile(r"^\s*-?\s*expr:\s*(.+)$", re.M)


def names_in(text: str) -> set[str]:
    """Every `edit_worker_…` metric name in a text (PromQL, YAML or JSON)."""
    return set(NAME.findall(text))


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    dashboard = json.loads(path.read_text())
    return [target["expr"] for panel in dashboard.get("panels", []) for target in panel.get("targets", [])]


def rule_exprs(path: Path) -> list[str]:
    """The alerting rules' `expr:` values (a `|` block: its lines joined)."""
    exprs, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        match = EXPR.match(line)
        if match:
            value = match.group(1).strip()
            if value in ("|", ">") and i + 1 < len(lines):
                first = lines[i + 1]
                indent = len(first) - len(first.lstrip())
                block = []
                for ln in lines[i + 1 :]:  # the block: the lines indented at least as deep as its first
                    if ln.strip() and len(ln) - len(ln.lstrip()) < indent:
                        break
                    block.append(ln.strip())
                value = " ".join(b for b in block if b)
            exprs.append(value)
    return exprs


def problems(dashboard: Path = DASHBOARD, rule_files: tuple[Path, ...] = RULE_FILES) -> list[str]:
    known = exported_names()
    found: list[str] = []
    sources = [(dashboard, dashboard.read_text(), dashboard_exprs(dashboard))]
    sources += [(path, path.read_text(), rule_exprs(path) if path.name == "alerts.yml" else []) for path in rule_files]
    for path, text, exprs in sources:
        for name in sorted(names_in(text) - known):
            found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {name} is not a metric the code exports")
        for expr in exprs:
            if not names_in(expr):
                found.append(f"{path.name}: query uses no edit-worker metric: {expr}")
    return found


def main() -> int:
    found = problems()
    print(
        f"deploy check: {len(dashboard_exprs())} dashboard queries, {len(rule_exprs(RULE_FILES[0]))} alert rules, {len(exported_names())} exported series names"
    )
    for problem in found:
        print(f"  {problem}")
    print("deploy check: ok" if not found else f"deploy check: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
