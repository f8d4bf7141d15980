"""Print deploy/observability/alerts.yaml as a prometheus-operator PrometheusRule.

kube-prometheus-stack loads rules from PrometheusRule objects, not from rule files, and a
PrometheusRule's `spec` is a rule file's body.  So the overlay's prometheusrule.yaml is this file's
output, alerts.yaml indented under `spec:` with its comments kept, and never edited by hand:
`make prometheusrule` writes it again, and a test fails when the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

ALERTS = Path(__file__).with_name("alerts.yaml")
HEADER = """\
# Generated from deploy/observability/alerts.yaml by `make prometheusrule`: edit that file, not this one
# (a test fails when they differ).  kube-prometheus-stack loads only PrometheusRules whose labels its
# `ruleSelector` matches: by default `release: <its Helm release name>`; change the label below to yours.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: lb
  labels:
    app.kubernetes.io/name: lb
    release: kube-prometheus-stack
spec:
"""


def render(alerts: str) -> str:
    """The PrometheusRule manifest whose spec is the rule file `alerts`, line for line."""
    body = "".join(f"  {line}" if line.strip() else line for line in alerts.splitlines(keepends=True))
    return HEADER + body


if __name__ == "__main__":
    sys.stdout.write(render(ALERTS.read_text()))
