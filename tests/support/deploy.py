"""The deployment tests' parts: the shipped files, a real nginx running them, certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from tests.support.servers import ROOT, free_port, wait_for_port

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "wsserver.service"
ENV_EXAMPLE = DEPLOY / "wsserver.env.example"
NGINX_SITE = DEPLOY / "nginx.conf"
NGINX_CLUSTER_SITE = DEPLOY / "nginx-cluster.conf"
NGINX = "/usr/sbin/nginx"

#: The interpreter the shipped unit runs, as installed by docs/deploy.md.
UNIT_PYTHON = "/opt/wsserver/venv/bin/python"

def unit_service_settings(text: str) -> dict[str, list[str]]:
    """``key -> values`` of the ``[Service]`` section of a unit file's text."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def substitute_once(text: str, pattern: str, replacement: str) -> str:
    """Replace ``pattern`` (a regex), which must occur exactly once.

    The tests run the shipped files with local ports and paths; if a shipped
    file changes shape, this fails loudly instead of testing something else.
    """
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"expected one match of {pattern!r}, found {count}")
    return new


def render_site(upstream_port: int, listen_port: int, access_log: Path | None = None) -> str:
    """The shipped nginx site with local ports, as an operator would edit it."""
    site = NGINX_SITE.read_text()
    site = substitute_once(
        site, r"^(\s*server\s+)127\.0\.0\.1:8888;", rf"\g<1>127.0.0.1:{upstream_port};"
    )
    site = substitute_once(site, r"^(\s*listen\s+)80;", rf"\g<1>127.0.0.1:{listen_port};")
    if access_log is not None:
        site = substitute_once(site, r"^(\s*access_log\s+)/var/log/nginx/wsserver\.access\.log",
                               rf"\g<1>{access_log}")
    return substitute_once(site, r"^\s*listen\s+\[::\]:80;.*\n", "")


def render_cluster_site(upstream_ports: list[int], listen_port: int) -> str:
    """The shipped cluster site with its upstream's nodes replaced by local ports."""
    site = NGINX_CLUSTER_SITE.read_text()
    nodes = "".join(
        f"    server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;\n" for port in upstream_ports
    )
    site = substitute_once(site, r"^(\s*server\s+\S+:\d+ max_fails=3 fail_timeout=10s;\n)+", nodes)
    site = substitute_once(site, r"^(\s*listen\s+)80;", rf"\g<1>127.0.0.1:{listen_port};")
    return substitute_once(site, r"^\s*listen\s+\[::\]:80;.*\n", "")


class Nginx:
    """A real nginx, run in the foreground from a generated main config.

    ``upstream_ports`` (several nodes) renders ``deploy/nginx-cluster.conf``
    instead of ``deploy/nginx.conf``.
    """

    def __init__(
        self, workdir: Path, upstream_port: int, upstream_ports: list[int] | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        workdir.mkdir(parents=True, exist_ok=True)
        site = workdir / "wsserver.conf"
        self.access_log = workdir / "wsserver.access.log"
        if upstream_ports is None:
            site.write_text(render_site(upstream_port, self.port, self.access_log))
        else:
            site.write_text(render_cluster_site(upstream_ports, self.port))
        temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        # As root nginx would switch its workers to "nobody", who cannot
        # enter the test's private directory.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        self.config = workdir / "nginx.conf"
        self.config.write_text(
            f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {site};
}}
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        """The nginx command line for this instance (``-e`` keeps logs out of /var/log)."""
        return [NGINX, "-p", str(self.workdir), "-e", str(self.workdir / "error.log"),
                "-c", str(self.config), *extra]

    def start(self) -> None:
        """Check the config with ``nginx -t``, start nginx, wait until it listens."""
        check = subprocess.run(self.command("-t"), capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{check.stderr}")
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.process)

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGTERM) and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def nginx_available() -> bool:
    """True when the Debian nginx binary is installed."""
    return os.access(NGINX, os.X_OK)


def systemd_analyze() -> str | None:
    """The path of ``systemd-analyze``, or None when systemd's tools are missing."""
    return shutil.which("systemd-analyze")


def write_self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A fresh EC key and a self-signed certificate for ``host`` (IP and DNS SANs).

    Returns:
        The paths of the certificate and of the key, both PEM.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsserver test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
