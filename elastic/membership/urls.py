"""The cluster URL of a networked backend, read one way for all of them:

    SCHEME://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...]/CLUSTER[?ca=FILE&cert=FILE&key=FILE]

The servers (a client moves between them), one path segment naming the cluster (so
several share one server set), and how to reach the servers beyond their address:
``ca`` turns on TLS, ``cert`` and ``key`` add a client certificate, a user turns on
the server's authentication. The password comes from the URL or, better (it stays
out of process lists), from the backend's environment variable. Logs show a URL
through ``ClusterBackend.describe_url``, which hides the password.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from elastic.errors import ConfigError
from elastic.membership.cluster import ClusterBackend

__all__ = ["ClusterURL", "parse_cluster_url"]

OPTIONS = ("ca", "cert", "key")


@dataclass(frozen=True)
class ClusterURL:
    """A parsed cluster URL. Empty strings: not asked for."""

    servers: tuple[tuple[str, int], ...]
    cluster: str
    ca: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    def hosts(self) -> str:
        """``h1:p1,h2:p2``, IPv6 addresses in brackets."""
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.servers)


def parse_cluster_url(url: str, scheme: str, default_port: int, password_env: str) -> ClusterURL:
    """Read ``url`` (of ``scheme``); ``ConfigError`` naming what is wrong and the fix.
    Files named by options must exist; the password is ``$password_env`` when the URL
    gives a user without one."""
    shown = ClusterBackend.describe_url(url)
    fix = (
        f"use {scheme}://[USER@]HOST:PORT[,HOST:PORT...]/CLUSTER[?ca=FILE&cert=FILE&key=FILE], "
        f"e.g. {scheme}://127.0.0.1:{default_port}/demo"
    )
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.netloc:
        raise ConfigError(f"membership {shown!r} is not a {scheme}:// URL; {fix}")
    cluster = parts.path.strip("/")
    if not cluster or "/" in cluster or not cluster.isprintable():
        raise ConfigError(f"membership {shown!r} names no cluster (one path segment); {fix}")
    userinfo, at, netloc = parts.netloc.rpartition("@")
    servers = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", str(default_port))
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"membership {shown!r}: bad server {item!r}; {fix}")
        servers.append((host, int(port)))
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - set(OPTIONS)
    if unknown:
        raise ConfigError(
            f"membership {shown}: unknown option(s) {', '.join(sorted(unknown))} (known: "
            f"{', '.join(OPTIONS)})"
        )
    for name in OPTIONS:
        if query.get(name) and not Path(query[name]).is_file():
            raise ConfigError(f"membership {shown}: {name} file {query[name]} does not exist")
    if bool(query.get("cert")) != bool(query.get("key")):
        raise ConfigError(f"membership {shown}: a client certificate needs both cert= and key=")
    if query.get("cert") and not query.get("ca"):
        raise ConfigError(f"membership {shown}: cert= and key= need ca= (TLS)")
    user, _, password = userinfo.partition(":") if at else ("", "", "")
    if user and not password:
        password = os.environ.get(password_env, "")
        if not password:
            raise ConfigError(
                f"membership {shown}: user {user!r} has no password; put it in ${password_env}"
            )
    return ClusterURL(
        tuple(servers),
        cluster,
        query.get("ca", ""),
        query.get("cert", ""),
        query.get("key", ""),
        unquote(user),
        unquote(password),
    )
