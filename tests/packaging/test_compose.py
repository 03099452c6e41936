"""packaging/docker/compose.yaml and what it mounts: the file parses (and Docker Compose v2
reads it, where installed), the GPU service reserves a GPU, both server services are
scraped by Prometheus at the address and port they serve on, with the API key they read;
Grafana's provisioning points at the Prometheus service and the dashboard uses that data
source; the Prometheus config passes ``promtool check config`` (where promtool is: the
README's test command fetches it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.packaging.deploy_queries import DASHBOARD, DOCKER, dashboard_panels

COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
SERVERS = ("hearth", "hearth-cpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))


def test_gpu_and_cpu_servers_are_profiles_of_their_images(compose):
    services = compose["services"]
    assert set(services) == {*SERVERS, "prometheus", "grafana"}
    gpu, cpu = services["hearth"], services["hearth-cpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "packaging/docker/Dockerfile"
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["dockerfile"] == "packaging/docker/Dockerfile.cpu"
    for s in (gpu, cpu):
        assert (COMPOSE.parent / s["build"]["context"]).resolve() == DOCKER.parents[1]  # the repository
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert "deploy" not in cpu


def test_prometheus_scrapes_the_server_with_its_key(compose, prometheus):
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.rsplit(":", 1)
    services = compose["services"]
    for name in SERVERS:
        s = services[name]
        aliases = (s.get("networks") or {}).get("default", {}) or {}
        assert host == name or host in aliases.get("aliases", []), f"{name} is not reachable as {host}"
        assert s["environment"]["HEARTH_PORT"] == port
        assert any(p.endswith(f":{port}") for p in s["ports"])
        assert s["volumes"] == ["hearth-cache:/cache"]  # the image's VOLUME
    # /metrics needs the key: Prometheus reads the secret the server reads.
    secret = job["authorization"]["credentials_file"]
    assert job["authorization"]["type"] == "Bearer"
    assert secret == "/run/secrets/hearth_api_key"
    assert "hearth_api_key" in services["prometheus"]["secrets"]
    assert all("hearth_api_key" in services[n]["secrets"] for n in SERVERS)
    assert compose["secrets"]["hearth_api_key"] == {"environment": "HEARTH_API_KEY"}
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"] if v.startswith("./")}
    assert (DOCKER / mounted["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS


def test_monitoring_ports_stay_on_this_machine(compose):
    for name in ("prometheus", "grafana"):  # neither has a login worth the name by default
        assert all(p.startswith("127.0.0.1:") for p in compose["services"][name]["ports"]), name


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: (DOCKER / v.split(":")[0]).resolve() for v in grafana["volumes"] if v.startswith("./")}
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in compose["services"]["prometheus"]["ports"])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "hearth.yaml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / DASHBOARD.name).resolve() == DASHBOARD
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        f"{provider['options']['path']}/{DASHBOARD.name}"

    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus" and variable["current"]["value"] == source["uid"]
    panels = dashboard_panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        for ds in [p["datasource"], *(t["datasource"] for t in p["targets"])]:
            assert ds == {"type": "prometheus", "uid": f"${{{variable['name']}}}"}, p["title"]


def compose_cli() -> list[str] | None:
    """The Docker Compose v2 command here (the docker CLI's plugin, or a standalone
    docker-compose v2), or None. Compose v1 doesn't know secrets from the environment."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        done = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and re.match(r"v?([2-9]|\d\d)\.", done.stdout.strip()):
            return cmd
    return None


# ids not "gpu": tests/conftest.py skips every test with that keyword where no GPU is
@pytest.mark.parametrize("profile", ["gpu", "cpu"], ids=["profile-gpu", "profile-cpu"])
def test_docker_compose_reads_it(profile):
    cmd = compose_cli()
    if cmd is None:
        pytest.skip("Docker Compose v2 is not installed (the docker CLI's compose plugin, or docker-compose "
                    "v2); the YAML checks above ran")
    done = subprocess.run([*cmd, "--project-directory", str(DOCKER), "-f", str(COMPOSE), "--profile", profile,
                           "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "HEARTH_"))},
                               "HEARTH_API_KEY": "sk-test"})  # the shell's own profiles and model don't count
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    server = "hearth" if profile == "gpu" else "hearth-cpu"
    assert set(services) == {server, "prometheus", "grafana"}
    assert services[server]["secrets"] == [{"source": "hearth_api_key", "target": "/run/secrets/hearth_api_key"}]


def promtool() -> str | None:
    found = Path(sys.executable).with_name("promtool")
    return str(found) if found.exists() else shutil.which("promtool")


def check_config(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``promtool check config`` on ``text`` with the key file it names present (promtool
    checks that it exists): the path rewritten to a file of the test's."""
    key = tmp_path / "hearth_api_key"
    key.write_text("sk-test\n")
    assert text.count("/run/secrets/hearth_api_key") == 1
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/run/secrets/hearth_api_key", str(key)))
    return subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True,
                          timeout=60)


def test_promtool_accepts_the_prometheus_config(tmp_path):
    """Debian bookworm's promtool is Prometheus 2.42's and compose runs 3.x: the config keeps
    to scrape settings both read (global intervals, static targets, authorization), so
    one check covers both; a 3.x-only setting would need a promtool of 3.x here."""
    if promtool() is None:
        pytest.skip("promtool is not installed (bash packaging/dev.sh test fetches it from Debian's "
                    "prometheus package where apt-get is)")
    done = check_config(PROMETHEUS.read_text(), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_would_catch_a_broken_config(tmp_path):
    if promtool() is None:
        pytest.skip("promtool is not installed (bash packaging/dev.sh test fetches it from Debian's "
                    "prometheus package where apt-get is)")
    broken = PROMETHEUS.read_text().replace("scrape_interval: 5s", "scrape_interval: soon")
    assert check_config(broken, tmp_path).returncode != 0
