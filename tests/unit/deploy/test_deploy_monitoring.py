"""deploy/prometheus and deploy/grafana: Prometheus scrapes every service (scaled actors through DNS discovery),
Grafana is provisioned with the Prometheus datasource and the tbrm dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from deploy import topology

REPO = Path(__file__).resolve().parents[3]
PROM = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tbrm.json"
PANELS = ["Buffer size", "Version lag", "Reward", "Loss", "Tokens/s", "Weight push latency"]


def prometheus() -> dict[str, Any]:
    return yaml.safe_load(PROM.read_text())


def test_prometheus_scrapes_every_http_service_on_its_port() -> None:
    jobs = {j["job_name"]: j for j in prometheus()["scrape_configs"]}
    for svc in topology.SERVICES:
        if svc.health_path is None:  # redis has no /metrics
            continue
        job = jobs[svc.name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        (sd,) = job["dns_sd_configs"]
        assert svc.name in sd["names"] and sd["port"] == svc.port and sd["type"] == "A", svc.name
        if svc.accelerator:  # the gpu profile's service of the same role is scraped by the same job
            assert f"{svc.name}-gpu" in sd["names"], svc.name


def test_prometheus_job_names_are_compose_services() -> None:
    """DNS discovery only works if every name is a service (or a replica set) in docker-compose.yml."""
    services = set(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"])
    for job in prometheus()["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert set(sd["names"]) <= services, sd["names"]
    assert prometheus()["global"]["scrape_interval"].endswith("s")


def test_grafana_datasource_and_dashboard_provider_point_at_the_mounted_paths() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tbrm.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    # Every panel queries the provisioned datasource by uid.
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def test_dashboard_has_the_named_panels_with_queries() -> None:
    dash = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: p for p in dash["panels"]}
    for title in PANELS:
        assert title in by_title, title
        exprs = [t["expr"] for t in by_title[title]["targets"]]
        assert exprs and all(re.search(r"\btbrm_[a-z_]+", e) for e in exprs), title
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]
    # Panels do not overlap on the grid.
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def exported_metric_names() -> set[str]:
    """Metric names the services declare (prometheus_client names; buffer gauges are built as tbrm_buffer_<x>)."""
    names: set[str] = set()
    for pkg in ("actor_service", "buffer", "reward", "learner"):
        for f in (REPO / pkg).rglob("*.py"):
            text = f.read_text()
            names |= set(re.findall(r"[\"'](tbrm_[a-z0-9_]+)[\"']", text))
            if 'f"tbrm_buffer_{' in text:
                names |= {f"tbrm_buffer_{m}" for m in re.findall(r"\(\"([a-z_]+)\", s\.", text)}
    from learner.metrics import GAUGES, prometheus_name  # the learner's gauges are named from its metric keys

    return names | {prometheus_name(k) for k in GAUGES}


def test_every_dashboard_metric_is_exported_by_a_service() -> None:
    """A renamed metric in a service would leave a silently empty panel: catch it here."""
    exported = exported_metric_names()
    assert "tbrm_buffer_size" in exported  # the scan itself works
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\btbrm_[a-z0-9_]+", target["expr"]):
                base = re.sub(r"_(total|bucket|count|sum)$", "", name)
                assert name in exported or base in exported, f"{panel['title']}: {name} is exported by no service"
