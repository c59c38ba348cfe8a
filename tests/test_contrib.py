"""contrib/: the Prometheus alert rules load in promtool and fire when they should, and
the Grafana dashboard's queries parse and name only metrics kith exports."""

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
from prometheus_client import REGISTRY

import kith.metrics  # noqa: F401 - declares every kith_* metric

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "kith-alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "kith-dashboard.json"
PROMTOOL = shutil.which("promtool")
# Metric-like words of PromQL that are not metrics.
PROMQL_WORDS = {"sum", "max", "min", "by", "rate", "increase", "histogram_quantile", "time",
                "and", "le", "instance", "route", "status", "source", "state", "outcome",
                "dependency", "peer", "version", "job", "up"}

WARNING = {"severity": "warning"}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool not installed (Debian: apt-get install prometheus); CI has it")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: apt-get install prometheus"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def exported_names() -> set[str]:
    """Every sample name kith's metrics can produce."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("kith_"):
            continue
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "gauge": [""]}[family.type]
        names.update(family.name + suffix for suffix in suffixes)
    return names


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("$")}


def dashboard_exprs() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_queries_name_only_metrics_kith_exports() -> None:
    exported = exported_names()
    assert "kith_binds_total" in exported and "kith_onbind_queue" in exported
    used = set().union(*map(metric_names, dashboard_exprs() + rule_exprs()))
    assert used - exported - {"up"} == set()
    # Every gauge an operator is told to watch is on the dashboard.
    on_dashboard = set().union(*map(metric_names, dashboard_exprs()))
    for watched in ("kith_onbind_oldest_pending_age_seconds", "kith_breaker_open",
                    "kith_bindings", "kith_onbind_queue", "kith_replication_lag_seconds"):
        assert watched in on_dashboard


@needs_promtool
def test_alert_rules_load_in_promtool(tmp_path: Path) -> None:
    checked = promtool("check", "rules", str(RULES), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout


@needs_promtool
def test_dashboard_queries_parse_in_promtool(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule promtool
    parses."""
    filled = [expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
              for expr in dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(filled)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests: synthetic series in, alerts out."""
    shutil.copy(RULES, tmp_path / "kith-alerts.yml")
    labels = 'instance="id:9090", job="kith"'
    tests = {"rule_files": ["kith-alerts.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f"kith_onbind_oldest_pending_age_seconds{{{labels}}}",
             "values": "3000+60x60"},
            {"series": f'kith_breaker_open{{{labels}, dependency="ldap"}}',
             "values": "0 0 1x30"},
            {"series": f'kith_breaker_open{{{labels}, dependency="upstream"}}',
             "values": "0x32"},
            {"series": f'kith_http_requests_total{{{labels}, method="POST", route="/r", '
                       f'status="500"}}', "values": "0+6x60"},
            {"series": f'kith_http_requests_total{{{labels}, method="POST", route="/r", '
                       f'status="200"}}', "values": "0+60x60"},
            {"series": f'kith_onbind_deliveries_total{{{labels}, outcome="gave_up"}}',
             "values": "0 0 0 1x30"},
            {"series": f"up{{{labels}}}", "values": "1x60"},
        ],
        "alert_rule_test": [
            # 3000 s + 60 s a minute passes an hour at minute 10, and fires 15 min later.
            {"eval_time": "20m", "alertname": "KithOnbindStuck", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "KithOnbindStuck", "exp_alerts": [
                {"exp_labels": {"instance": "id:9090", "job": "kith", **WARNING},
                 "exp_annotations": {
                     "summary": "An invite notification (onbind) has waited 1h 20m 0s",
                     "description": "A homeserver does not accept onbind calls; `kith "
                                    "onbind` lists them with their last error."}}]},
            {"eval_time": "10m", "alertname": "KithBreakerOpen", "exp_alerts": [
                {"exp_labels": {"instance": "id:9090", "dependency": "ldap", **WARNING},
                 "exp_annotations": {
                     "summary": "kith stopped asking its ldap source: it keeps failing",
                     "description": "Lookups are answered without it until it answers "
                                    "again."}}]},
            {"eval_time": "5m", "alertname": "KithHighErrorRate", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "KithHighErrorRate", "exp_alerts": [
                {"exp_labels": {"instance": "id:9090", **WARNING},
                 "exp_annotations": {
                     "summary": "9.091% of kith's answers on id:9090 are 5xx",
                     "description": "Look for SMTP, SMS, homeserver or database errors "
                                    "in kith's log."}}]},
            {"eval_time": "10m", "alertname": "KithOnbindGaveUp", "exp_alerts": [
                {"exp_labels": {"instance": "id:9090", "job": "kith", "outcome": "gave_up",
                                **WARNING},
                 "exp_annotations": {
                     "summary": "kith gave up delivering invites to a homeserver",
                     "description": "Invitees will not be joined to their rooms; `kith "
                                    "onbind --retry` tries again."}}]},
            {"eval_time": "30m", "alertname": "KithDown", "exp_alerts": []},
        ],
    }]}
    path = tmp_path / "kith-alerts.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    tested = promtool("test", "rules", str(path), cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
