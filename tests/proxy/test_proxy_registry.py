"""The node registry, URL checks and the command line, without any server."""

from __future__ import annotations

import argparse

import pytest

from app.proxy.cli import add_arguments, config_from_args
from app.proxy.nodes import LATENCY_WINDOW, NodeRegistry, normalize_base_url
from app.proxy.strategies import Strategy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:23333", "http://127.0.0.1:23333"),
        ("HTTP://Node-1.example:80/", "http://node-1.example"),
        ("https://[::1]:8443/llm/", "https://[::1]:8443/llm"),
        ("http://0.0.0.0:23333", "http://0.0.0.0:23333"),
        # One server, one spelling: leading zeros, default ports and `.` segments go.
        ("http://127.0.0.1:024001", "http://127.0.0.1:24001"),
        ("http://127.0.0.1:24001/.", "http://127.0.0.1:24001"),
        ("https://Host:443/./llm/./v/", "https://host/llm/v"),
        ("http://[0:0::1]:80", "http://[::1]"),
        ("http://[::1]:080/", "http://[::1]"),
    ],
)
def test_good_urls_are_normalized(url, expected):
    assert normalize_base_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://host:21",
        "javascript:alert(1)",
        "http://",
        "http://host name",
        "http://user:pw@host",
        "http://host:99999",
        "http://host:0",
        "http://host:1/./../admin",
        "http://host/?q=1",
        "http://host/#frag",
        "http://host/../admin",
        "http://host\r\nX: y",
        "http://h\u00f6st",
        "file:///etc/passwd",
        "http://host:port",
        "x" * 3000,
    ],
)
def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError):
        normalize_base_url(url)


def test_candidates_follow_models_health_and_exclusions():
    registry = NodeRegistry()
    registry.upsert("http://a", ["m"])
    registry.upsert("http://b", ["m", "big"])
    assert [n.url for n in registry.candidates("big", set())] == ["http://b"]
    assert [n.url for n in registry.candidates("m", {"http://a"})] == ["http://b"]
    assert len(registry.candidates(None, set())) == 2
    assert registry.models() == ["m", "big"]
    assert registry.knows_model("big") and not registry.knows_model("other")


def test_failures_in_a_row_eject_and_success_resets():
    registry = NodeRegistry(max_failures=3)
    node = registry.upsert("http://a", ["m"])
    registry.request_failed(node)
    registry.request_failed(node)
    registry.request_succeeded(node, None)
    registry.request_failed(node)
    registry.request_failed(node)
    assert node.healthy
    registry.request_failed(node)
    assert not node.healthy
    assert registry.candidates("m", set()) == [] and registry.models() == []
    assert registry.knows_model("m")


def test_health_checks_eject_restore_and_expire():
    clock = Clock()
    registry = NodeRegistry(max_failures=2, node_expiry=10.0, clock=clock)
    node = registry.upsert("http://a", ["m"])
    registry.health_checked(node, None)
    assert node.healthy
    registry.health_checked(node, None)
    assert not node.healthy
    registry.health_checked(node, ["m", "n"])
    assert node.healthy and node.models == ["m", "n"]
    registry.health_checked(node, None)
    registry.health_checked(node, None)
    clock.now = 9.0
    assert registry.expire() == [] and "http://a" in registry.nodes
    clock.now = 10.0
    assert registry.expire() == ["http://a"] and registry.nodes == {}


def test_re_adding_keeps_stats_and_restores():
    registry = NodeRegistry(max_failures=1)
    node = registry.upsert("http://a", ["m"], speed=5.0)
    registry.request_succeeded(node, 0.5)
    registry.request_failed(node)
    again = registry.upsert("http://a", ["m2"])
    assert again is node and node.healthy and node.speed == 5.0
    assert list(node.latency) == [0.5] and node.models == ["m2"]


def test_a_timed_out_request_counts_as_a_failure_with_its_wait():
    registry = NodeRegistry(max_failures=2)
    node = registry.upsert("http://a", ["m"])
    registry.request_failed(node, 30.0)
    assert list(node.latency) == [30.0] and node.healthy
    registry.request_failed(node)
    assert not node.healthy and list(node.latency) == [30.0]


def test_latency_window_is_bounded():
    registry = NodeRegistry()
    node = registry.upsert("http://a", ["m"])
    for i in range(LATENCY_WINDOW + 5):
        registry.request_succeeded(node, float(i))
    assert len(node.latency) == LATENCY_WINDOW and node.latency[0] == 5.0


def test_sessions_are_bounded_and_dropped_with_their_node():
    registry = NodeRegistry(max_sessions=2)
    registry.upsert("http://a", ["m"])
    registry.upsert("http://b", ["m"])
    registry.bind_session("1", "http://a")
    registry.bind_session("2", "http://b")
    assert registry.session_node("1").url == "http://a"  # "1" is now the most recent
    registry.bind_session("3", "http://a")
    assert registry.session_node("2") is None
    registry.remove("http://a")
    assert registry.session_node("1") is None and registry.session_node("3") is None


def test_cli_flags_build_the_config(monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("SPLITFUSE_ADMIN_KEY", "from-env")
    args = parser.parse_args(
        ["--strategy", "random", "--api-keys", "k1", "k2", "--health-interval", "2.5"]
    )
    config = config_from_args(args)
    assert config.strategy is Strategy.RANDOM and config.api_keys == ("k1", "k2")
    assert config.admin_key == "from-env" and config.health_interval == 2.5
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert config_from_args(parser.parse_args(["--admin-key", "flag"])).admin_key == "flag"
    with pytest.raises(SystemExit):
        parser.parse_args(["--strategy", "round_robin"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--health-interval", "0"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "--port/--server-port: 99999 is above 65535"),
        (["--port", "65536"], "65536 is above 65535"),
        (["--port", "-1"], "-1 is below 0"),
        (["--server-port", "x"], "'x' is not a number"),
        (["--max-body-bytes", "-1"], "--max-body-bytes: -1 is below 1"),
        (["--max-body-bytes", "0"], "0 is below 1"),
        (["--max-failures", "0"], "--max-failures: 0 is below 1"),
        (["--max-failures", "-3"], "-3 is below 1"),
        (["--health-interval", "0"], "--health-interval: 0 is not above 0.0"),
        (["--health-interval", "inf"], "inf is not a finite number"),
        (["--request-timeout", "nan"], "--request-timeout: nan is not a finite number"),
    ],
)
def test_cli_refuses_bad_numbers_in_one_line(flags, message, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(flags)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_takes_port_0_for_any_free_port():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--port", "0"]).port == 0
    assert parser.parse_args(["--port", "65535", "--max-body-bytes", "1"]).max_body_bytes == 1
