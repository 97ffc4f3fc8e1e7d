"""CURVE on every ZeroMQ socket: key pairs, allow-lists, and plaintext only on request.

Keys are ZeroMQ certificate files (``NAME.key`` public, ``NAME.key_secret`` secret,
the format czmq and pyzmq share), made by ``elastic keys generate``. The
coordinator is a CURVE server on its data socket and its control socket; a ZAP
handler admits a client only if its public key is in the socket's allow-list: a
directory of ``*.key`` files, worker keys for the data path, admin keys for the
control API. Every refusal is counted by reason. Traffic is encrypted either way
CURVE is on. Without keys a daemon refuses to start unless ``--insecure`` says
plaintext is meant, and then it warns.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from elastic.errors import ConfigError

__all__ = [
    "generate",
    "load_secret",
    "load_public",
    "AllowList",
    "CurveServer",
    "client_security",
    "DATA",
    "CONTROL",
]

log = logging.getLogger("elastic.security")
DATA, CONTROL = "data", "control"  # ZAP domains of the coordinator's two sockets


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name, e.g. worker-1")
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ConfigError(f"{public} or {secret} exists already; pick another name or directory")
    made_public, made_secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def load_secret(path: Path | str, what: str) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate file, or one clear error."""
    public, secret = _load(path, what)
    if secret is None:
        raise ConfigError(
            f"{what} {path} holds no secret key; give the NAME.key_secret file from `elastic keys "
            "generate`"
        )
    return public, secret


def load_public(path: Path | str, what: str) -> bytes:
    return _load(path, what)[0]


def _load(path: Path | str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{what} {path} cannot be read as a ZeroMQ certificate ({exc}); make one with "
            "`elastic keys generate`"
        ) from None
    return public, secret


class AllowList:
    """The public keys in a directory of ``*.key`` files; read again on ``reload()``."""

    def __init__(self, directory: Path | str, domain: str) -> None:
        self.directory, self.domain = Path(directory), domain
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._keys: set[bytes] = set()
        self.reload()

    def reload(self) -> int:
        if not self.directory.is_dir():
            raise ConfigError(
                f"allow-list {self.directory} is not a directory of public keys (*.key files)"
            )
        keys = {load_public(p, "allowed key") for p in sorted(self.directory.glob("*.key"))}
        with self._lock:
            self._keys = keys
        log.info(
            "allow-list loaded domain=%s keys=%d directory=%s",
            self.domain,
            len(keys),
            self.directory,
        )
        return len(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question, asked on its own thread: may this key connect?"""
        with self._lock:
            ok = key in self._keys
        if not ok:
            self.refused["unknown_key"] += 1
            log.warning(
                "connection refused domain=%s reason=unknown_key key=%s",
                domain,
                key.decode("ascii", "replace"),
            )
        return ok


class CurveServer:
    """The coordinator's side: its key pair, a ZAP handler, an allow-list per domain."""

    def __init__(
        self, ctx: zmq.Context, secret_key_file: Path | str, allow: dict[str, Path | str]
    ) -> None:
        self.public, self.secret = load_secret(secret_key_file, "coordinator key")
        self.allow = {domain: AllowList(directory, domain) for domain, directory in allow.items()}
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("elastic.zap"))
        self.auth.start()
        for domain, allow_list in self.allow.items():
            self.auth.configure_curve_callback(domain, credentials_provider=allow_list)

    def apply(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` (before it binds) a CURVE server checked against
        ``domain``'s allow-list."""
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def refused(self) -> dict[str, int]:
        return {
            f"{domain}_{reason}": n
            for domain, a in self.allow.items()
            for reason, n in a.refused.items()
        }

    def reload(self) -> None:
        for allow_list in self.allow.values():
            allow_list.reload()

    def stop(self) -> None:
        self.auth.stop()


def client_security(
    secret_key_file: Path | str, server_key_file: Path | str
) -> Callable[[zmq.Socket], None]:
    """What makes a socket (before it connects) a CURVE client of that server; the
    files are read once, here, so a bad path fails at start."""
    public, secret = load_secret(secret_key_file, "key")
    server = load_public(server_key_file, "coordinator public key")

    def secure(sock: zmq.Socket) -> None:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server

    return secure
