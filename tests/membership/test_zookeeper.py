"""ZooKeeper's URL and access: a digest user owns its cluster's znodes, and a client
without that user's password gets one clear error, not a refusal deep inside."""

from __future__ import annotations

import uuid

import pytest

from elastic.errors import ConfigError
from elastic.membership.zookeeper import ZkBackend
from elastic.membership.zookeeper.client import connect, parse_zk_url
from tests.zk_server import ZkServer


def test_the_url_names_servers_cluster_user_and_files(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = parse_zk_url("zk://bob:pw@z1,z2:2182,[::1]:2183/prod")
    assert url.servers == (("z1", 2181), ("z2", 2182), ("::1", 2183))
    assert url.hosts() == "z1:2181,z2:2182,[::1]:2183"
    assert (url.cluster, url.user, url.password, url.tls) == ("prod", "bob", "pw", False)
    monkeypatch.setenv("ELASTIC_ZK_PASSWORD", "from-env")
    assert parse_zk_url("zk://bob@z1/prod").password == "from-env"
    monkeypatch.delenv("ELASTIC_ZK_PASSWORD")
    for bad, words in (
        ("zk://bob@z1/prod", "put it in $ELASTIC_ZK_PASSWORD"),
        ("zk://z1/prod?ca=/nope.pem", "ca file /nope.pem does not exist"),
        ("zk://z1/prod?timeout=3", "unknown option(s) timeout (known: ca, cert, key)"),
        ("zk://z1:0/prod", "bad server 'z1:0'"),
        ("etcd://z1/prod", "is not a zk:// URL"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_zk_url(bad)
        assert words in str(err.value)
        assert "pw" not in str(err.value)


def test_a_password_in_the_url_never_reaches_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_zk_url("zk://bob:hunter2@z1/prod?color=red")
    assert "hunter2" not in str(err.value) and "bob:***@" in str(err.value)


def test_a_users_cluster_is_closed_to_other_clients(zookeeper: ZkServer) -> None:
    from kazoo.exceptions import NoAuthError

    cluster = f"c{uuid.uuid4().hex[:8]}"
    owner = f"zk://alice:s3cret@{zookeeper.hosts}/{cluster}"
    registration = ZkBackend(owner).registration("w0", {"host": "h"}, ttl=5)
    try:
        client = connect(owner)
        try:
            [node] = client.get_children(f"/elastic/{cluster}/members")
            assert node.startswith("w0.")
        finally:
            client.stop()
            client.close()

        for url, words in (
            (f"zk://{zookeeper.hosts}/{cluster}", "refuses a client with no user"),
            (f"zk://alice:wrong@{zookeeper.hosts}/{cluster}", "the password is wrong"),
            (f"zk://mallory:s3cret@{zookeeper.hosts}/{cluster}", "belongs to another user"),
        ):
            with pytest.raises(ConfigError) as err:
                connect(url)
            assert words in str(err.value)
            assert "wrong" not in str(err.value).split("refuses")[0]  # no password shown

        client = connect(f"zk://{zookeeper.hosts}/other-{cluster}")  # /elastic stays shared
        try:
            with pytest.raises(NoAuthError):
                client.get_children(f"/elastic/{cluster}/members")
        finally:
            client.stop()
            client.close()
    finally:
        registration.close()
