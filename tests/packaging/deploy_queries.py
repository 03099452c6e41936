"""The PromQL that the deployment files send to Prometheus (the Grafana dashboard's panels and
prometheus-adapter's rule for the autoscaler), and what each query needs of the server's
``/metrics``: metric names and the labels it matches or groups by. Parsed with promql-parser
(the Rust PromQL parser's bindings), so a name is found wherever PromQL allows one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "packaging" / "docker"
K8S = REPO / "packaging" / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "hearth.json"
ADAPTER = K8S / "prometheus-adapter.yaml"

#: Labels Prometheus itself puts on every series of a target (static targets: job and instance;
#: prometheus-operator's ServiceMonitor adds the Kubernetes ones), so a query may use them
#: although the server's /metrics doesn't have them.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "service", "pod", "container", "endpoint"})

#: Grafana's interval variables, replaced by a duration so the query parses as plain PromQL.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")


@dataclass
class Needs:
    """What one query needs of the scraped series."""
    query: str
    where: str
    metrics: set[str] = field(default_factory=set)
    #: (metric, label) for each label matcher of a selector
    matched: set[tuple[str, str]] = field(default_factory=set)
    #: (label, metrics under the aggregation) for each ``by (...)`` label
    grouped: list[tuple[str, frozenset[str]]] = field(default_factory=list)


def parse_promql(query: str, where: str) -> promql_parser.Expr:
    """The query's syntax tree; a ValueError saying which query of which file when it doesn't parse."""
    try:
        return promql_parser.parse(query)
    except ValueError as e:
        raise ValueError(f"{where}: the query {query!r} is not PromQL: {e}") from None


def needs_of(query: str, where: str) -> Needs:
    """The metric names and labels ``query`` uses (a selector without a literal metric name is
    an error: the tests could not tell what it reads)."""
    needs = Needs(query, where)

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                raise ValueError(f"{where}: a selector without a metric name in {query!r}")
            needs.metrics.add(node.name)
            for m in node.matchers.matchers:
                if m.name != "__name__":
                    needs.matched.add((node.name, m.name))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                under: set[str] = set()
                promql_parser.walk(node.expr, pre_visit=lambda n: under.add(n.name)
                                   if isinstance(n, promql_parser.VectorSelector) and n.name else None)
                needs.grouped.extend((label, frozenset(under)) for label in node.modifier.labels)

    promql_parser.walk(parse_promql(query, where), pre_visit=visit)
    return needs


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(query, where) for every panel target and query variable of the Grafana dashboard, with
    Grafana's interval variables replaced by a duration."""
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((GRAFANA_INTERVALS.sub("5m", target["expr"]),
                              f"{path.name}: panel {panel.get('title')!r} query {target.get('refId')}"))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            raise AssertionError(f"{path.name}: query variable {var.get('name')!r}: teach "
                                 "dashboard_queries to read its label_values() first")
    return found


def adapter_rules(path: Path = ADAPTER) -> list[dict]:
    """prometheus-adapter's rules from the ConfigMap's config.yaml."""
    (config_map,) = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def adapter_queries(path: Path = ADAPTER) -> list[tuple[str, str]]:
    """(query, where) for each rule's seriesQuery and its metricsQuery as the adapter expands
    its template for one pod (``<<.Series>>`` the series, ``<<.LabelMatchers>>`` the pod's
    namespace and name, ``<<.GroupBy>>`` pod)."""
    found = []
    for k, rule in enumerate(adapter_rules(path)):
        series = parse_promql(rule["seriesQuery"], f"{path.name} rule {k}")
        assert isinstance(series, promql_parser.VectorSelector) and series.name, \
            f"{path.name} rule {k}: seriesQuery should select one metric by name"
        expanded = (rule["metricsQuery"].replace("<<.Series>>", series.name)
                    .replace("<<.LabelMatchers>>", 'namespace="default",pod="hearth-0"')
                    .replace("<<.GroupBy>>", "pod"))
        assert "<<" not in expanded, f"{path.name} rule {k}: a template field the test doesn't know: {expanded}"
        found += [(rule["seriesQuery"], f"{path.name} rule {k} seriesQuery"),
                  (expanded, f"{path.name} rule {k} metricsQuery")]
    return found


def deployment_queries() -> list[tuple[str, str]]:
    """Every query the deployment files make (the Prometheus config makes none: it only scrapes)."""
    return dashboard_queries() + adapter_queries()


def missing_from(needs: Needs, labels_of: dict[str, set[str]]) -> list[str]:
    """What ``needs`` asks for that the scraped series (``labels_of``: sample name -> the
    label names its samples carry) don't have, each said in a line."""
    problems = [f"{needs.where}: no metric {m} in /metrics" for m in sorted(needs.metrics - labels_of.keys())]
    for metric, label in sorted(needs.matched):
        if metric in labels_of and label not in labels_of[metric] | TARGET_LABELS:
            problems.append(f"{needs.where}: {metric} has no label {label!r}")
    for label, under in needs.grouped:
        if label not in TARGET_LABELS and not any(label in labels_of.get(m, ()) for m in under):
            problems.append(f"{needs.where}: grouped by {label!r}, which none of {sorted(under)} has")
    return problems
