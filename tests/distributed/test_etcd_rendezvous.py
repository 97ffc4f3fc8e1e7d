"""torch's rendezvous-backend contract, kept by the etcd v3 backend against a real etcd
whose v2 API is off (the contract as torch's own backend tests state it)."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid

import pytest
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousParameters,
    RendezvousStateError,
)

from elastic.distributed.etcd_access import RunLease, connect_endpoint, run_prefix
from elastic.distributed.etcd_rendezvous import EtcdV3RendezvousBackend
from elastic.distributed.torchrun import create_backend


@pytest.fixture
def client(etcd_server):
    client, _ = connect_endpoint(etcd_server.url, timeout=10)
    yield client
    client.close()


@pytest.fixture
def backend(client):
    key = run_prefix("test", uuid.uuid4().hex) + "state"
    return EtcdV3RendezvousBackend(client, key, RunLease(client, 60), timeout=5)


def test_etcd_serves_no_v2_api(etcd_server):
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(f"http://{etcd_server.url}/v2/keys/", timeout=5)
    assert failed.value.code == 404


def test_get_state_is_none_before_any_state(backend):
    assert backend.get_state() is None


def test_get_state_returns_the_state_and_a_token(backend):
    backend.set_state(b"x")
    state, token = backend.get_state()
    assert state == b"x" and token is not None


def test_get_state_of_a_corrupt_value_raises_state_error(backend, client):
    client.put(backend._key, b"non_base64")
    with pytest.raises(RendezvousStateError, match="corrupt"):
        backend.get_state()


def test_set_state_without_a_token_writes_when_there_is_no_state(backend):
    state, token, written = backend.set_state(b"x")
    assert (state, written) == (b"x", True) and token is not None
    assert backend.get_state() == (b"x", token)


def test_set_state_with_the_current_token_writes_and_gives_a_new_token(backend):
    _, token1, written1 = backend.set_state(b"x")
    state2, token2, written2 = backend.set_state(b"y", token1)
    assert written1 and written2 and state2 == b"y" and token2 != token1
    assert backend.get_state() == (b"y", token2)


@pytest.mark.parametrize("stale", ["old", "none", "invalid"])
def test_set_state_with_a_stale_token_returns_the_current_state_unwritten(backend, stale):
    _, token1, _ = backend.set_state(b"x")
    if stale == "old":
        current = backend.set_state(b"y", token1)[:2]
        asked = token1
    else:
        current, asked = (b"x", token1), (None if stale == "none" else "invalid")
    state, token, written = backend.set_state(b"z", asked)
    assert (state, token, written) == (*current, False)
    assert backend.get_state() == current


def test_a_token_is_the_keys_mod_revision(backend, client):
    _, token, _ = backend.set_state(b"x")
    _, meta = client.get(backend._key)
    assert token == meta.mod_revision


def test_concurrent_writers_with_one_token_only_one_wins(backend, client):
    _, token, _ = backend.set_state(b"x")
    other = EtcdV3RendezvousBackend(client, backend._key, RunLease(client, 60), timeout=5)
    first = backend.set_state(b"a", token)
    second = other.set_state(b"b", token)
    assert first[2] and not second[2] and second[:2] == first[:2]


def test_state_keys_live_under_a_lease_that_cleans_up(backend, client):
    backend.set_state(b"x")
    _, meta = client.get(backend._key)
    assert meta.lease_id == backend._lease.id()
    client.revoke_lease(meta.lease_id)
    assert backend.get_state() is None
    assert backend.set_state(b"again")[2]  # a new lease is granted


def _params(endpoint: str, **config: str) -> RendezvousParameters:
    return RendezvousParameters("etcd-v3", endpoint, uuid.uuid4().hex, 1, 2, **config)


def test_create_backend_uses_the_run_id_and_the_endpoint(etcd_server, client):
    params = _params(etcd_server.url)
    backend, store = create_backend(params)
    assert backend.name == "etcd-v3"
    backend.set_state(b"dummy_state")
    value, _ = client.get(f"/elastic/torchrun/torch/{params.run_id}/state")
    assert value == b"ZHVtbXlfc3RhdGU="  # base64, so corruption shows
    store.set("k", "v")
    assert client.get(f"/elastic/torchrun/torch/{params.run_id}/store/k")[0] == b"v"


def test_create_backend_takes_an_etcd_url_naming_the_cluster(etcd_server, client):
    params = _params(f"etcd://{etcd_server.url}/lab")
    backend, _ = create_backend(params)
    backend.set_state(b"s")
    assert client.get(f"/elastic/lab/torch/{params.run_id}/state")[0] is not None


def test_create_backend_names_an_unreachable_etcd(etcd_server):
    dead = etcd_server.url.rsplit(":", 1)[0] + ":1"
    with pytest.raises(RendezvousConnectionError, match="etcd unreachable at 127.0.0.1:1"):
        create_backend(_params(dead, read_timeout="1"))


@pytest.mark.parametrize(
    ("config", "message"),
    [({"read_timeout": "0"}, "read timeout"), ({"ttl": "5"}, "ttl")],
)
def test_create_backend_refuses_bad_options(etcd_server, config, message):
    with pytest.raises(ValueError, match=message):
        create_backend(_params(etcd_server.url, **config))
