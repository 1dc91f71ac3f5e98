"""Node management through the API (admin key, loopback rule, bad URLs) and node registration."""

from __future__ import annotations

import asyncio
import socket

import pytest
from proxy_harness import ADMIN, Cluster, assert_openai_error, http, node_status, wait_until

from app.proxy import NodeRegistration


def test_node_management_needs_the_admin_key(cluster: Cluster):
    _, a_server = cluster.node("A", models=("m", "n"))
    proxy = cluster.proxy(admin_key="admin-key")
    add = {"url": a_server.url, "status": {"speed": 12.5}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "admin-key"}):
        for method, path, body in (
            ("GET", "/nodes/status", None),
            ("POST", "/nodes/add", add),
            ("POST", "/nodes/add", "not an object"),
            ("POST", f"/nodes/remove?node_url={a_server.url}", None),
        ):
            status, error = http(method, proxy.url + path, body, headers)
            assert status == 401, (method, path, headers)
            assert assert_openai_error(error)["type"] == "authentication_error"

    status, body = http("POST", f"{proxy.url}/nodes/add", add, ADMIN)
    assert status == 200 and body["models"] == ["m", "n"]
    assert node_status(proxy)[a_server.url] | {"latency": []} == {
        "models": ["m", "n"],
        "unfinished": 0,
        "latency": [],
        "speed": 12.5,
        "healthy": True,
        "request_failures": 0,
        "health_failures": 0,
    }
    remove = f"{proxy.url}/nodes/remove?node_url={a_server.url}"
    assert http("POST", remove, headers=ADMIN)[0] == 200
    assert node_status(proxy) == {}
    status, error = http("POST", remove, headers=ADMIN)
    assert status == 404 and assert_openai_error(error)["code"] == "node_not_found"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1:1",
        "http://",
        "http://a b:1",
        "http://u:p@127.0.0.1:1",
        "http://h:70000",
        "javascript:alert(1)",
        "http://127.0.0.1:1/?x=1",
        42,
    ],
)
def test_bad_node_urls_are_400(cluster: Cluster, url):
    proxy = cluster.proxy()
    status, error = http("POST", f"{proxy.url}/nodes/add", {"url": url}, ADMIN)
    assert status == 400 and assert_openai_error(error)["param"] in ("url", None)
    assert node_status(proxy) == {}


def test_unreachable_or_unhealthy_node_is_not_added(cluster: Cluster):
    _, sick = cluster.node("A", health_status=503)
    proxy = cluster.proxy()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        for url in (dead_url, sick.url):
            status, error = http("POST", f"{proxy.url}/nodes/add", {"url": url}, ADMIN)
            assert status == 400 and assert_openai_error(error)["code"] == "node_unavailable"
    assert node_status(proxy) == {}


def test_without_admin_key_loopback_clients_may_manage_nodes(cluster: Cluster):
    _, a_server = cluster.node("A")
    proxy = cluster.proxy(admin_key=None)
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"}
    assert http("POST", f"{proxy.url}/nodes/add", {"url": a_server.url}, spoofed)[0] == 200
    assert http("GET", f"{proxy.url}/nodes/status")[0] == 200


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_without_admin_key_other_clients_may_not_manage_nodes(cluster: Cluster):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    _, a_server = cluster.node("A")
    proxy = cluster.proxy(host=address, admin_key=None)
    spoofed = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Host": "localhost"}
    for method, path, body in (
        ("GET", "/nodes/status", None),
        ("POST", "/nodes/add", {"url": a_server.url}),
        ("POST", f"/nodes/remove?node_url={a_server.url}", None),
    ):
        status, error = http(method, proxy.url + path, body, spoofed)
        assert status == 401 and assert_openai_error(error)
    assert http("GET", f"{proxy.url}/v1/models")[0] == 200


def test_node_registration_joins_heartbeats_and_leaves(cluster: Cluster):
    _, a_server = cluster.node("A")
    proxy = cluster.proxy(start=False)

    async def run() -> None:
        registration = NodeRegistration(
            proxy.url, a_server.url, admin_key="admin-key", interval=0.3
        )
        await registration.start()
        # The proxy is not up yet: registration keeps retrying until it is.
        await asyncio.sleep(0.4)
        assert not registration.registered
        await asyncio.to_thread(proxy.start)
        await asyncio.to_thread(wait_until, lambda: a_server.url in node_status(proxy))
        assert registration.registered
        # Removed by hand, the node is back within a heartbeat.
        remove = f"{proxy.url}/nodes/remove?node_url={a_server.url}"
        assert (await asyncio.to_thread(http, "POST", remove, None, ADMIN))[0] == 200
        await asyncio.to_thread(wait_until, lambda: a_server.url in node_status(proxy), 2.0)
        await registration.stop()
        assert a_server.url not in node_status(proxy) and not registration.registered

    asyncio.run(run())


def test_proxy_removes_a_node_whose_health_stops(cluster: Cluster):
    _, a_server = cluster.node("A")
    _, b_server = cluster.node("B")
    proxy = cluster.proxy(health_interval=0.1, max_failures=2, node_expiry=0.5)

    async def run() -> None:
        registration = NodeRegistration(
            proxy.url, a_server.url, admin_key="admin-key", interval=0.2
        )
        await registration.start()
        await asyncio.to_thread(cluster.add, proxy, b_server)
        await asyncio.to_thread(wait_until, lambda: a_server.url in node_status(proxy))
        # A dies with its heartbeat still running: health checks eject it, expiry removes it,
        # and the heartbeat cannot bring back a node that does not answer.
        await asyncio.to_thread(a_server.kill)
        await asyncio.to_thread(wait_until, lambda: a_server.url not in node_status(proxy), 5.0)
        await asyncio.sleep(0.5)
        assert list(node_status(proxy)) == [b_server.url]
        await registration.stop()

    asyncio.run(run())


def test_failed_health_checks_eject_and_recovery_restores(cluster: Cluster):
    a, a_server = cluster.node("A")
    proxy = cluster.proxy(health_interval=0.1, max_failures=2, node_expiry=60)
    cluster.add(proxy, a_server)
    a.knobs.health_status = 503
    wait_until(lambda: not node_status(proxy)[a_server.url]["healthy"], 3.0)
    assert http("GET", f"{proxy.url}/v1/models")[1]["data"] == []
    a.knobs.health_status = 200
    wait_until(lambda: node_status(proxy)[a_server.url]["healthy"], 3.0)


def test_with_api_keys_and_no_admin_key_node_management_needs_an_api_key(cluster: Cluster):
    _, a_server = cluster.node("A")
    proxy = cluster.proxy(api_keys=("K1",), admin_key=None)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer admin-key"}):
        for method, path, body in (
            ("GET", "/nodes/status", None),
            ("POST", "/nodes/add", {"url": a_server.url}),
            ("POST", f"/nodes/remove?node_url={a_server.url}", None),
        ):
            status, error = http(method, proxy.url + path, body, headers)
            assert status == 401, (method, path, headers)
            assert assert_openai_error(error)["code"] == "invalid_api_key"
    key = {"Authorization": "Bearer K1"}
    assert http("POST", f"{proxy.url}/nodes/add", {"url": a_server.url}, key)[0] == 200
    assert list(http("GET", f"{proxy.url}/nodes/status", headers=key)[1]) == [a_server.url]


def test_speeds_out_of_range_are_400_and_requests_keep_working(cluster: Cluster):
    _, a_server = cluster.node("A")
    _, b_server = cluster.node("B")
    proxy = cluster.proxy()
    for speed in (1e308, 1e10, 1e-9, 0):
        for server in (a_server, b_server):
            add = {"url": server.url, "status": {"speed": speed}}
            status, error = http("POST", f"{proxy.url}/nodes/add", add, ADMIN)
            assert status == 400 and assert_openai_error(error)
    assert node_status(proxy) == {}
    for server in (a_server, b_server):
        add = {"url": server.url, "status": {"speed": 1e9}}
        assert http("POST", f"{proxy.url}/nodes/add", add, ADMIN)[0] == 200
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert http("POST", f"{proxy.url}/v1/chat/completions", chat)[0] == 200


def test_one_server_cannot_be_registered_under_two_spellings(cluster: Cluster):
    _, a_server = cluster.node("A")
    proxy = cluster.proxy()
    spellings = (
        a_server.url,
        f"http://127.0.0.1:0{a_server.port}",
        f"{a_server.url}/.",
        f"HTTP://127.0.0.1:{a_server.port}/./",
    )
    for url in spellings:
        status, body = http("POST", f"{proxy.url}/nodes/add", {"url": url}, ADMIN)
        assert status == 200 and body["url"] == a_server.url
    assert list(node_status(proxy)) == [a_server.url]
