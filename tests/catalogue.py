"""The metric catalogue read from the code, and the dashboard's queries: shared by the docs and ops tests."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tools import gen_dashboard

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "zmon.json"
PROVISIONING = ROOT / "grafana" / "provisioning"
RECORDING_RULES = ROOT / "deploy" / "prometheus" / "zmon.recording.yml"
DS = {"type": "prometheus", "uid": "${datasource}"}
README = ROOT / "README.md"

# -- metric catalogue: what zmon exports ---------------------------------------------------------------------

_NAME = re.compile(r"^zmon_[a-z0-9_]+$")
_SUFFIXES = {
    "CounterMetricFamily": ("_total",),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "SummaryMetricFamily": ("_sum", "_count"),
    "InfoMetricFamily": ("_info",),
    "GaugeMetricFamily": ("",),
}


# helpers in zmon that build one family of a fixed type from its name (collectors/generation.py)
_HELPERS = {"_histogram": "HistogramMetricFamily"}


def _is_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(_NAME.match(node.value))


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


@cache
def code_families() -> dict[str, str]:
    """{family name as written in zmon's source: its MetricFamily class}, read from the AST of the package.

    A name passed straight to XMetricFamily("zmon_...") (or to a helper in _HELPERS) has that type. A name
    in a table (a tuple literal) assigned to a variable whose name contains COUNTER, HISTOGRAM or INFO is of
    that type. Any other "zmon_..." string constant is taken for a gauge (the tables of unlabelled gauges).
    """
    out: dict[str, str] = {}
    for path in sorted((ROOT / "zmon").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        typed: set[int] = set()
        for node in ast.walk(tree):
            kind = _HELPERS.get(_call_name(node), _call_name(node)) if isinstance(node, ast.Call) else ""
            if isinstance(node, ast.Call) and kind.endswith("MetricFamily") and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and _is_name(first):
                    out[str(first.value)] = kind
                    typed.add(id(first))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                label = " ".join(t.id for t in targets if isinstance(t, ast.Name)).upper()
                kind = next((k for k in ("COUNTER", "HISTOGRAM", "INFO") if k in label), None)
                if kind is None:
                    continue
                for sub in ast.walk(node.value):
                    if isinstance(sub, ast.Constant) and _is_name(sub):
                        out.setdefault(str(sub.value), f"{kind.title()}MetricFamily")
                        typed.add(id(sub))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and _is_name(node) and id(node) not in typed:
                out.setdefault(str(node.value), "GaugeMetricFamily")
    return out


def recording_rule_names() -> set[str]:
    data = yaml.safe_load(RECORDING_RULES.read_text())
    return {r["record"] for g in data["groups"] for r in g["rules"] if "record" in r}


@cache
def exported_series_names() -> frozenset[str]:
    """Series names zmon exposes: each family expanded by its type (counter _total, histogram _bucket/_sum/
    _count, info _info), plus the recording rules shipped in deploy/prometheus."""
    names = {name + suffix for name, kind in code_families().items() for suffix in _SUFFIXES[kind]}
    return frozenset(names | recording_rule_names())


# -- PromQL: metric names used by an expression -------------------------------------------------------------

AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
}
GRAFANA_RANGE_VARIABLES = re.compile(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?")


def grafana_to_promql(expr: str, *, instance: str = ".*", gpu: str = ".*") -> str:
    """Replace Grafana's variables with values Prometheus accepts (as the dashboard would send them)."""
    expr = GRAFANA_RANGE_VARIABLES.sub("1m", expr)
    return expr.replace("$instance", instance).replace("$gpu", gpu)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (a small tokenizer, not a parser).

    Drops string literals, label matchers {...}, ranges [...], grouping label lists by/on/ignoring/group_x
    (...) and offsets; what remains is identifiers, numbers and operators. An identifier is a metric name
    unless a '(' follows it (a function), or it is an aggregation or a keyword.
    """
    s = GRAFANA_RANGE_VARIABLES.sub("1m", expr)
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', s)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" \1 ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-zA-Z]+", " ", s)
    names = set()
    tokens = list(re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+|\S", s))
    for i, m in enumerate(tokens):
        tok = m.group(0)
        if not re.match(r"[A-Za-z_:]", tok):
            continue
        nxt = tokens[i + 1].group(0) if i + 1 < len(tokens) else ""
        if nxt == "(" or tok in AGGREGATIONS or tok in KEYWORDS:
            continue
        names.add(tok)
    return names


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in d["panels"] if p["type"] != "row"]


def all_queries(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and annotation query."""
    out = [(f"panel {title!r}", expr) for title, expr in gen_dashboard.queries(d)]
    for a in d["annotations"]["list"]:
        if a.get("expr"):
            out.append((f"annotation {a['name']!r}", a["expr"]))
    return out


# -- the README side ---------------------------------------------------------------------------------------

_ROW = re.compile(r"^\|(?P<names>[^|]*`zmon_[^|]*)\|(?P<type>[^|]*)\|(?P<labels>[^|]*)\|(?P<meaning>.*)\|\s*$")
_FEATURE = re.compile(r"\(only with `([a-z0-9_.]+)`")
BASE = ("model", "resolution", "device")  # "+ base" in the README


@dataclass(frozen=True)
class Row:
    names: tuple[frozenset[str], ...]  # per documented name: every reading of a `_suffix` shorthand
    kind: str
    labels: dict[str, frozenset[str] | None]  # label → listed values (None: not enumerated)
    feature: str | None
    line: str


_SECTION_FEATURE = re.compile(r"^Every family in this table: \(only with `([a-z0-9_.]+)`")


def readme_rows(text: str | None = None) -> list[Row]:
    """Rows of the README's metric tables (first cell names zmon_ families). A line "Every family in this
    table: (only with `X`)" above a table marks its rows that carry no marker of their own."""
    rows = []
    section_feature: str | None = None
    for line in (text if text is not None else README.read_text()).splitlines():
        if line.startswith("#"):
            section_feature = None
        if (sm := _SECTION_FEATURE.match(line)) is not None:
            section_feature = sm[1]
        m = _ROW.match(line)
        if not m:
            continue
        names: list[frozenset[str]] = []
        base = ""
        for tok in re.findall(r"`([a-z0-9_]+)`", m["names"]):
            if tok.startswith("zmon_"):
                names.append(frozenset({tok}))
                base = tok
            elif tok.startswith("_") and base:  # `_suffix` replaces some trailing words of the previous name
                parts = base.split("_")
                names.append(frozenset("_".join(parts[:k]) + tok for k in range(2, len(parts))))
        labels: dict[str, frozenset[str] | None] = {}
        for label, values in re.findall(r"([a-z_]+)(?:\s*\(([^)]*)\))?", m["labels"]):
            if label == "base":  # `base` labels: model, resolution, device
                labels.update(dict.fromkeys(BASE))
            else:
                labels[label] = frozenset(v.strip() for v in values.split(",")) if values else None
        f = _FEATURE.search(m["meaning"])
        rows.append(Row(tuple(names), m["type"].strip(), labels, f[1] if f else section_feature, line))
    return rows
