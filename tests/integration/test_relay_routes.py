"""``[relay] routes`` end to end: the real server, the loopback DNS and recording SMTP servers
on 127.0.0.x (see test_relay.py), each route target on a port of its own so the test shows
the route's port was used and not ``[relay] port``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import ALICE as SENDER
from tests.harness import Server, ServerFactory, free_port, wait_until
from tests.loopback import MX, Net, queue_ids, send, show, with_subject
from tests.tls_helpers import CertAuthority

ZONE = {
    "internal.test": {"MX": [[10, "mx2.test"]]},  # a route sends it elsewhere
    "plain.test": {"MX": [[10, "mx2.test"]]},  # no route: by MX
    "mx2.test": {"A": ["127.0.0.2"]},
    "hub.test": {"MX": [[10, "hubmx.test"]]},  # the next hop of viamx.test, by MX
    "hubmx.test": {"A": ["127.0.0.13"]},
    "viamx.test": {"MX": [[10, "mx2.test"]]},
    "secure-relay.test": {"A": ["127.0.0.16"]},
}


class Hop:
    """A recording SMTP server on ADDRESS and a port of its own, in ``net`` once started."""

    def __init__(self, net: Net, address: str, script: dict[str, Any] | None = None) -> None:
        self.net = net
        self.address = address
        self.port = free_port(address)
        self.script = script
        self.mx: MX | None = None

    def start(self) -> MX:
        self.mx = self.net.mx(self.address, self.script, self.port)
        return self.mx


@pytest.fixture(scope="module")
def env(
    loopback_net: Callable[[dict[str, Any]], Net], module_servers: ServerFactory, ca: CertAuthority
) -> dict[str, Any]:
    net = loopback_net(ZONE)
    root = net.root
    by_mx = net.mx("127.0.0.2")
    cert, key = ca.issue("secure-relay.test", stem="secure-relay")
    # next to the server's folder: the route names it relative to the configuration file
    (module_servers.root / "relay.secret").write_text("relay-secret\n")
    hops = {
        "internal": Hop(net, "127.0.0.12"),
        "hub": Hop(net, "127.0.0.13"),
        "flaky": Hop(net, "127.0.0.15"),  # not started at first: connections are refused
        "secure": Hop(
            net,
            "127.0.0.16",
            {
                "starttls": {"cert": str(cert), "key": str(key)},
                "auth": {"relayuser": "relay-secret"},
            },
        ),
        "star": Hop(net, "127.0.0.14"),
    }
    for name in ("internal", "hub", "secure", "star"):
        hops[name].start()
    routes = (
        f'tls_ca = "{ca.ca_file}"\n'
        "[relay.routes]\n"
        f'"internal.test" = "[127.0.0.12]:{hops["internal"].port}"\n'
        f'"viamx.test" = "hub.test:{hops["hub"].port}"\n'
        f'"flaky.test" = "[127.0.0.15]:{hops["flaky"].port}"\n'
        f'"secure.test" = {{ host = "[secure-relay.test]:{hops["secure"].port}", '
        'tls = "required", user = "relayuser", password_file = "../relay.secret" }\n'
    )
    server = module_servers(("smtp",), users=(SENDER,), extra_toml=net.relay_toml(routes))
    return {"net": net, "by_mx": by_mx, "hops": hops, "srv": server, "root": root}


def delivered(hop: Hop | MX, subject: str) -> list[dict[str, Any]]:
    mx = hop.mx if isinstance(hop, Hop) else hop
    assert mx is not None
    return with_subject(mx.transactions(), subject)


def test_bracketed_route_bypasses_the_mx(env: dict[str, Any]) -> None:
    send(env["srv"], ["ann@internal.test"], "route-literal")
    got = wait_until(lambda: delivered(env["hops"]["internal"], "route-literal"), what="delivery")
    assert got[0]["rcpts"] == ["ann@internal.test"]
    assert delivered(env["by_mx"], "route-literal") == []  # internal.test's MX never saw it
    check = env["srv"].cli("check").stdout  # the admin command shows the routes
    port = env["hops"]["secure"].port
    assert (
        f"route secure.test  -> [secure-relay.test]:{port} (TLS required, AUTH as relayuser)"
    ) in check


def test_host_port_route_looks_up_the_mx_of_host(env: dict[str, Any]) -> None:
    send(env["srv"], ["ben@viamx.test"], "route-mx")
    got = wait_until(lambda: delivered(env["hops"]["hub"], "route-mx"), what="delivery")
    assert got[0]["rcpts"] == ["ben@viamx.test"]
    assert delivered(env["by_mx"], "route-mx") == []


def test_domains_without_a_route_still_go_by_mx(env: dict[str, Any]) -> None:
    send(env["srv"], ["cat@plain.test", "dan@internal.test"], "route-mixed")
    got = wait_until(lambda: delivered(env["by_mx"], "route-mixed"), what="MX delivery")
    assert got[0]["rcpts"] == ["cat@plain.test"]
    routed = wait_until(
        lambda: delivered(env["hops"]["internal"], "route-mixed"), what="routed delivery"
    )
    assert routed[0]["rcpts"] == ["dan@internal.test"]


def test_route_with_auth_over_tls(env: dict[str, Any]) -> None:
    send(env["srv"], ["eve@secure.test"], "route-auth")
    got = wait_until(lambda: delivered(env["hops"]["secure"], "route-auth"), what="delivery")
    assert got[0]["tls"] is True and got[0]["auth_user"] == "relayuser"
    assert got[0]["rcpts"] == ["eve@secure.test"]


def test_queue_retries_when_the_routes_host_fails(env: dict[str, Any]) -> None:
    srv: Server = env["srv"]
    send(srv, ["fay@flaky.test"], "route-retry")

    def refused_attempt() -> bool:
        return any(
            "fay@flaky.test" in out and "4.4.1" in out
            for out in (show(srv, q) for q in queue_ids(srv))
        )

    wait_until(refused_attempt, what="a refused attempt")
    mx = env["hops"]["flaky"].start()
    got = wait_until(
        lambda: with_subject(mx.transactions(), "route-retry"), timeout=30, what="the retry"
    )
    assert got[0]["rcpts"] == ["fay@flaky.test"]
    wait_until(
        lambda: not [q for q in queue_ids(srv) if "fay@" in show(srv, q)],
        what="the entry to leave the queue",
    )
    assert "Traceback" not in srv.log.read_text(errors="replace")


def test_star_route_takes_every_domain_without_its_own_route(
    env: dict[str, Any], servers: ServerFactory
) -> None:
    hops = env["hops"]
    routes = (
        "[relay.routes]\n"
        f'"*" = "[127.0.0.14]:{hops["star"].port}"\n'
        f'"internal.test" = "[127.0.0.12]:{hops["internal"].port}"\n'
    )
    server = servers(
        ("smtp",), users=(SENDER,), extra_toml=env["net"].relay_toml(routes), start=False
    )
    with server:
        send(server, ["gus@plain.test", "hal@nowhere.test", "ivy@internal.test"], "route-star")
        got = wait_until(lambda: delivered(hops["star"], "route-star"), what="delivery")
        exact = wait_until(lambda: delivered(hops["internal"], "route-star"), what="delivery")
    # one transaction for every domain the "*" route serves (even one that does not exist)
    assert sorted(got[0]["rcpts"]) == ["gus@plain.test", "hal@nowhere.test"]
    assert exact[0]["rcpts"] == ["ivy@internal.test"]  # the exact route wins over "*"
    assert delivered(env["by_mx"], "route-star") == []
