"""Test certificates made with ``openssl``: a CA, a server certificate for
127.0.0.1 and a client certificate, for the servers that speak TLS (etcd, ZooKeeper)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def certificates(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate."""
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key = root / "ca.pem", root / "ca-key.pem"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=elastic-test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (root / f"{name}.ext").write_text(extension + "\n")
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(root / f"{name}-key.pem"),
            "-out",
            str(root / f"{name}.csr"),
        )
        openssl(
            "x509",
            "-req",
            "-in",
            str(root / f"{name}.csr"),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(root / f"{name}.ext"),
            "-out",
            str(root / f"{name}.pem"),
        )
    return {
        "ca": ca,
        "cert": root / "server.pem",
        "key": root / "server-key.pem",
        "client": root / "client.pem",
        "client_key": root / "client-key.pem",
    }
