"""The cluster examples in deploy/: the config loads, nginx accepts the upstream file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.deploy import DEPLOY, NGINX, nginx_available
from wsserver.config import load_settings


def test_cluster_config_loads() -> None:
    settings = load_settings({"config": str(DEPLOY / "cluster.toml")}, {}, check_files=False)
    assert settings.broker.startswith("redis://")
    assert settings.trusted_proxies == ("127.0.0.1", "::1")
    assert not settings.demo_mode


@pytest.mark.e2e
@pytest.mark.skipif(not nginx_available(), reason="needs nginx (Debian: nginx-light)")
def test_nginx_accepts_the_cluster_upstream(tmp_path: Path) -> None:
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
        f"http {{ access_log off; include {DEPLOY / 'nginx-cluster.conf'}; }}\n"
    )
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
