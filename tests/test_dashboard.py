"""deploy/grafana/retro-peft.json: an importable Grafana dashboard whose every query names series a running
server really exports (a real server on 127.0.0.1, a few requests of each kind, then /metrics scraped)."""

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from retro_peft.serving.app import create_app
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from test_serve import QUESTIONS, build_bank

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "retro-peft.json"
KEY, LIMITED_KEY, ADMIN_KEY = "sk-dash", "sk-dash-limited", "sk-dash-admin"
REQUESTS_PER_MINUTE = 12
# PromQL words that are neither functions (a name followed by "(") nor metrics.
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every panel target, rows' nested panels included."""
    found = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    return found


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: names not followed by "(" (functions), outside strings, label
    matchers, ranges and by/without/on clauses."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = MATCHERS.sub("", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = GROUPING.sub("", bare)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        if not bare[match.end():].lstrip().startswith("(") and match.group() not in KEYWORDS:
            names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """The labels an expression groups by or matches on."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    grouped = {name.strip() for group in GROUPING.findall(bare) for name in group.split(",") if name.strip()}
    matched = {m.split("=")[0].split("!")[0].strip() for block in MATCHERS.findall(bare) for m in block.split(",")
               if m.strip()}
    return grouped | matched


def test_the_name_parser_reads_promql():
    expr = ('histogram_quantile(0.9, sum by (le, route) (rate(a_bucket{route=~"/v1/(chat/)?x",d="{y}"}[5m]))) '
            '/ on (route) sum(rate(b_total[$__rate_interval])) and c')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert label_names(expr) == {"le", "route", "d"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """{sample name: its label names} on a server that has answered a few requests of every kind."""
    keys = [{"name": "user", "key": KEY}, {"name": "limited", "key": LIMITED_KEY},
            {"name": "ops", "key": ADMIN_KEY, "scopes": ["admin"]}]
    settings = ServeSettings(auth={"keys": keys}, limits={"requests_per_minute": REQUESTS_PER_MINUTE},
                             generation={"default_max_tokens": 4}, batching={"max_wait_ms": 5})
    bank = build_bank(tmp_path_factory.mktemp("dashboard"))
    with serve_in_thread(create_app(settings, bank)) as url, httpx.Client(base_url=url) as http:
        auth = {"Authorization": f"Bearer {KEY}"}
        for _ in range(2):  # a response-cache miss, then a hit; the same for retrieval
            assert http.post("/v1/completions", headers=auth,
                             json={"model": "b", "prompt": QUESTIONS[0]}).status_code == 200
            assert http.post("/v1/retrieve", headers=auth, json={"model": "a", "query": "tea"}).status_code == 200
        streamed = http.post("/v1/chat/completions", headers=auth, json={
            "model": "auto", "stream": True, "messages": [{"role": "user", "content": QUESTIONS[1]}]})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert http.post("/v1/completions", headers=auth, json={"model": "nope", "prompt": "x"}).status_code == 404
        limited = [http.get("/v1/models", headers={"Authorization": f"Bearer {LIMITED_KEY}"}).status_code
                   for _ in range(REQUESTS_PER_MINUTE + 1)]
        assert limited[-1] == 429
        text = http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_the_dashboard_is_importable_with_a_prometheus_datasource_variable():
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    assert board["__inputs"][0]["type"] == "datasource" and board["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("requests/s by route", "by domain", "errors", "latency", "tokens/s", "batch size", "queue depth",
                  "cache hit rate"):
        assert topic in titles, topic


def test_every_query_names_series_the_server_exports(exported):
    board = dashboard()
    used = queries(board)
    assert len(used) >= 20
    for title, expr in used:
        names = metric_names(expr)
        assert names, f"{title}: no series in {expr!r}"
        for name in names:
            assert name in exported, f"{title}: {name} is not exported by the server ({expr!r})"
        labels = set().union(*(exported[n] for n in names))
        assert label_names(expr) <= labels, f"{title}: labels {label_names(expr) - labels} are not on {names}"
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in names), f"{title}: a quantile of a histogram's buckets"
    # The domain variable lists a label of an exported series.
    domains = next(v for v in board["templating"]["list"] if v["name"] == "domain")
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", domains["definition"]).groups()
    assert label in exported[metric]
