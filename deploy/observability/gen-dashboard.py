#!/usr/bin/env python3
"""Generates the Grafana dashboard: charts/kestrel/files/kestrel-dashboard.json.

    deploy/observability/gen-dashboard.py > charts/kestrel/files/kestrel-dashboard.json
    deploy/check --update   # copies it to deploy/observability/ and re-renders

deploy/check fails when the committed JSON differs from this script's output.
Operator series may carry the ModelDeployment namespace as `namespace` or, when scraped
without honor_labels, as `exported_namespace`: op() selects both.
"""
import json
W='{namespace="$namespace", kestrel_dev_model_deployment="$md"}'
def op(metric, extra=""):
    # operator series: namespace label, or exported_namespace when scraped without honor_labels
    e = (", " + extra) if extra else ""
    return f'({metric}{{name="$md", namespace="$namespace"{e}}} or {metric}{{name="$md", exported_namespace="$namespace"{e}}})'
def target(expr, legend, ref):
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend, "refId": ref}
pid=[0]
def _decisions():
    parts = []
    for ns in ("namespace", "exported_namespace"):
        a = f'kestrel_modeldeployment_decisions_total{{name="$md", {ns}="$namespace"}}'
        # increase() misses a reason's first decision (its series starts at 1): also
        # take series that exist now but did not a minute ago.
        parts += [f"(increase({a}[1m]) > 0)", f"({a} unless {a} offset 1m)"]
    return "sum by (reason) (" + " or ".join(parts) + ")"
DECISIONS = _decisions()
READY='state="ready"'
DESIRED='state="desired"'
TRUE='status="True"'
def panel(title, targets, x, y, w=12, h=8, unit="short", desc="", kind="timeseries", overrides=None, stack=False):
    pid[0]+=1
    p={"id": pid[0], "type": kind, "title": title, "description": desc,
       "datasource": {"type": "prometheus", "uid": "${datasource}"},
       "gridPos": {"x": x, "y": y, "w": w, "h": h},
       "targets": [target(e, l, chr(65+i)) for i,(e,l) in enumerate(targets)],
       "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 2, "fillOpacity": 10,
           "stacking": {"mode": "normal" if stack else "none", "group": "A"}}}, "overrides": overrides or []},
       "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                   "tooltip": {"mode": "multi", "sort": "desc"}}}
    return p
dashed=lambda name: {"matcher": {"id": "byName", "options": name},
    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                   {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                   {"id": "custom.fillOpacity", "value": 0}]}
panels=[
 panel("Replicas per variant", [
   (f'max by (variant) ({op("kestrel_modeldeployment_replicas", READY)})', "{{variant}} ready"),
   (f'max by (variant) ({op("kestrel_modeldeployment_replicas", DESIRED)})', "{{variant}} desired"),
  ], 0, 0, desc="Ready and desired worker replicas of each variant, as the operator sees them (kestrel_modeldeployment_replicas).", stack=False),
 panel("p95 latency vs target", [
   (f'histogram_quantile(0.95, sum by (le) (rate(kestrel_worker_request_duration_seconds_bucket{W}[$__rate_interval])))', "p95 (all variants)"),
   (f'histogram_quantile(0.95, sum by (kestrel_dev_variant, le) (rate(kestrel_worker_request_duration_seconds_bucket{W}[$__rate_interval])))', "p95 {{kestrel_dev_variant}}"),
   (f'max({op("kestrel_modeldeployment_p95_target_seconds")})', "target"),
  ], 12, 0, unit="s", desc="Observed p95 request duration from the workers' histogram, against spec.slo.p95LatencyMs.", overrides=[dashed("target")]),
 panel("Queue depth", [
   (f'sum by (kestrel_dev_variant) (kestrel_worker_queue_depth{W})', "waiting {{kestrel_dev_variant}}"),
   (f'sum by (kestrel_dev_variant) (kestrel_worker_in_flight_requests{W})', "in flight {{kestrel_dev_variant}}"),
  ], 0, 8, desc="Requests waiting in the workers' queues and running, per variant (what Kestrel scales on)."),
 panel("Request rate by outcome", [
   (f'sum by (outcome) (rate(kestrel_worker_requests_total{W}[$__rate_interval]))', "{{outcome}}"),
  ], 12, 8, unit="reqps", desc="Requests per second by outcome: ok, rejected (429, queue full), error, cancelled.", stack=True),
 panel("Cost per hour", [
   (f'max({op("kestrel_modeldeployment_cost_per_hour")})', "cost/h"),
   (f'max({op("kestrel_modeldeployment_budget_per_hour")})', "budget/h"),
  ], 0, 16, unit="currencyUSD", desc="Cost per hour of the replicas that exist now, and spec.budget.maxCostPerHour (absent without a budget).", overrides=[dashed("budget/h")]),
 panel("Conditions", [
   (f'max by (type) ({op("kestrel_modeldeployment_condition", TRUE)})', "{{type}}"),
  ], 12, 16, desc="1 while a condition is True. Ready should be 1; Degraded, BudgetConstrained and ScalingLimited should be 0.", kind="state-timeline"),
]
panels[-1]["options"]={"showValue": "never", "mergeValues": True, "rowHeight": 0.8}
panels[-1]["fieldConfig"]={"defaults": {"color": {"mode": "thresholds"}, "thresholds": {"mode": "absolute", "steps": [{"color": "transparent", "value": None}, {"color": "blue", "value": 1}]}}, "overrides": []}
dash={
 "title": "Kestrel / ModelDeployment",
 "uid": "kestrel-modeldeployment",
 "description": "One ModelDeployment: replicas per variant, p95 vs target, queue depth, request rate, cost per hour; Kestrel's scaling decisions as annotations.",
 "tags": ["kestrel"],
 "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
 "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
 "templating": {"list": [
   {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus", "current": {}},
   {"name": "namespace", "type": "query", "label": "Namespace", "datasource": {"type": "prometheus", "uid": "${datasource}"},
    "query": {"query": "label_values(kestrel_worker_model_info, namespace)", "refId": "ns"}, "definition": "label_values(kestrel_worker_model_info, namespace)", "refresh": 2, "sort": 1},
   {"name": "md", "type": "query", "label": "ModelDeployment", "datasource": {"type": "prometheus", "uid": "${datasource}"},
    "query": {"query": "label_values(kestrel_worker_model_info{namespace=\"$namespace\"}, kestrel_dev_model_deployment)", "refId": "md"},
    "definition": "label_values(kestrel_worker_model_info{namespace=\"$namespace\"}, kestrel_dev_model_deployment)", "refresh": 2, "sort": 1},
 ]},
 "annotations": {"list": [
   {"name": "Scaling decisions", "enable": True, "iconColor": "orange",
    "datasource": {"type": "prometheus", "uid": "${datasource}"},
    "expr": DECISIONS,
    "step": "30s", "titleFormat": "{{reason}}", "textFormat": "Kestrel changed replicas or variant: {{reason}}",
    "useValueForTime": False},
 ]},
 "panels": panels,
}
print(json.dumps(dash, indent=2))
