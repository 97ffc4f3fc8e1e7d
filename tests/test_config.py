from pathlib import Path

import pytest

from elastic.config import CoordinatorConfig, WorkerConfig, resolve
from elastic.errors import ConfigError, PluginError


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[coordinator]\nbind = "tcp://127.0.0.1:7000"\nheartbeat_timeout = 9\nlog_format = "json"\n'
    )
    env = {
        "ELASTIC_HEARTBEAT_TIMEOUT": "7",
        "ELASTIC_EXIT_WHEN_DONE": "yes",
        "ELASTIC_INSECURE": "1",
    }
    c = resolve(
        CoordinatorConfig,
        "coordinator",
        cfg,
        {"heartbeat_timeout": None, "bind": "tcp://127.0.0.1:7001"},
        env,
    )
    assert c.bind == "tcp://127.0.0.1:7001"  # flag beats file
    assert c.heartbeat_timeout == 7.0  # env beats file
    assert c.exit_when_done is True
    assert c.log_format == "json"  # file beats default


@pytest.mark.parametrize(
    "flags, env, match",
    [
        ({"bind": "localhost:5555"}, {}, "not a ZeroMQ endpoint"),
        (
            {},
            {"ELASTIC_HEARTBEAT_TIMEOUT": "soon"},
            "environment ELASTIC_HEARTBEAT_TIMEOUT: 'soon'",
        ),
        ({"heartbeat_timeout": 0.5}, {}, "must be longer than heartbeat_interval"),
        ({"log_format": "xml"}, {}, "log_format"),
    ],
)
def test_bad_settings_are_one_clear_error(flags: dict, env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(CoordinatorConfig, "coordinator", None, flags, env | {"ELASTIC_INSECURE": "1"})


def test_unknown_file_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[worker]\ncolor = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'color'"):
        resolve(WorkerConfig, "worker", cfg, {}, {})


def test_worker_defaults(tmp_path: Path) -> None:
    w = resolve(WorkerConfig, "worker", None, {"data": str(tmp_path), "insecure": True}, {})
    assert w.id and "/" not in w.id
    with pytest.raises(ConfigError, match="data directory .* does not exist"):
        resolve(WorkerConfig, "worker", None, {"data": str(tmp_path / "nope")}, {})


def test_keys_or_insecure_and_never_both(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="no CURVE keys .*--coordinator-key missing.*or --insecure"
    ):
        resolve(WorkerConfig, "worker", None, {"curve_key": "w.key_secret"}, {})
    with pytest.raises(ConfigError, match="not both"):
        resolve(
            CoordinatorConfig,
            "coordinator",
            None,
            {"insecure": True, "allow_workers": str(tmp_path)},
            {},
        )
    c = resolve(
        CoordinatorConfig,
        "coordinator",
        None,
        {"curve_key": "c.key_secret", "allow_workers": "w", "allow_admins": "a"},
        {},
    )
    assert not c.insecure  # the files themselves are read (and checked) when the daemon starts


@pytest.mark.parametrize(
    ("url", "error", "match"),
    [
        (
            "etcd.example:2379",
            ConfigError,
            "is not a URL; use embedded://, etcd://HOST:2379/CLUSTER or zk://HOST:2181/CLUSTER",
        ),
        (
            "redis://h:6379/c",
            PluginError,
            "unknown cluster backend 'redis' \\(known: embedded, etcd, zk\\)",
        ),
        ("zk://h:2181", ConfigError, "names no cluster"),
        ("zk://h:99999/c", ConfigError, "bad server 'h:99999'"),
        ("etcd://h:2379/c?color=red", ConfigError, "unknown option\\(s\\) color"),
    ],
)
def test_a_membership_url_is_checked_by_its_backend_at_start(
    url: str, error: type, match: str
) -> None:
    for config, section in ((CoordinatorConfig, "coordinator"), (WorkerConfig, "worker")):
        with pytest.raises(error, match=match):
            resolve(config, section, None, {"membership": url}, {"ELASTIC_INSECURE": "1"})


def test_a_worker_on_a_shared_cluster_finds_its_coordinator_there() -> None:
    assert (
        resolve(
            WorkerConfig, "worker", None, {"membership": "zk://h:2181/c"}, {"ELASTIC_INSECURE": "1"}
        ).coordinator
        == ""
    )
    assert (
        resolve(WorkerConfig, "worker", None, {}, {"ELASTIC_INSECURE": "1"}).coordinator
        == "tcp://127.0.0.1:5555"
    )
