"""``[relay] routes``: matching and precedence, next-hop resolution, TLS and AUTH per route,
and config errors; the relay with the in-memory DNS and the scripted deliver() of
test_queue_relay."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from mailsuite.config import ConfigError, load_config, parse_config
from mailsuite.outbound.relay import SMARTHOST_ROUTE
from mailsuite.outbound.result import Outcome
from tests.outbound_helpers import make, run


def routed(tmp_path: Path, routes: dict[str, Any], **relay: Any) -> Any:
    return make(tmp_path, routes=routes, **relay)


def test_precedence_exact_then_parent_then_star_then_mx(tmp_path: Path) -> None:
    relay, _ = routed(
        tmp_path,
        {
            "two.test": "[192.0.2.70]",
            ".two.test": "[192.0.2.71]",
            ".sub.two.test": "[192.0.2.72]",
            "*": "[192.0.2.73]",
        },
    )
    assert relay.route_key("u@two.test") == "[route two.test]"
    assert relay.route_key("u@a.two.test") == "[route .two.test]"
    assert relay.route_key("u@x.sub.two.test") == "[route .sub.two.test]"  # longest parent
    assert relay.route_key("u@sub.two.test") == "[route .two.test]"  # .x is not x itself
    assert relay.route_key("u@Elsewhere.TEST") == SMARTHOST_ROUTE == "[route *]"
    only_exact, _ = routed(tmp_path, {"two.test": "[192.0.2.70]"})
    assert only_exact.route_key("u@nomx.test") == "nomx.test"  # no route: MX, per domain


def test_bracketed_host_bypasses_mx(tmp_path: Path) -> None:
    relay, fake = routed(tmp_path, {"two.test": "[relay.test]:2600"})
    out = run(relay, relay.route_key("u@two.test"), ["u@two.test", "v@two.test"])
    (call,) = fake.calls
    assert (call["host"], call["addresses"], call["port"]) == ("relay.test", ["192.0.2.9"], 2600)
    assert call["tls"] == "opportunistic" and call["auth"] is None
    assert all(r.reply.positive for r in out.values())


def test_ip_address_route_and_default_port(tmp_path: Path) -> None:
    relay, fake = routed(tmp_path, {"two.test": "192.0.2.80"})
    run(relay, "[route two.test]", ["u@two.test"])
    assert fake.calls[0]["addresses"] == ["192.0.2.80"]
    assert fake.calls[0]["port"] == 2525  # no port given: [relay] port


def test_host_port_route_looks_up_the_mx_of_host(tmp_path: Path) -> None:
    relay, fake = routed(tmp_path, {"other.test": "two.test:2601", "third.test": "nomx.test"})
    fake.script["a.two.test"] = Outcome.CONNECT_FAILED
    out = run(relay, "[route other.test]", ["u@other.test"])
    assert [(c["host"], c["port"]) for c in fake.calls] == [
        ("a.two.test", 2601),
        ("b.two.test", 2601),
    ]
    assert out["u@other.test"].reply.positive and out["u@other.test"].host == "b.two.test"
    fake.calls.clear()
    run(relay, "[route third.test]", ["u@third.test"])  # no MX: the host's own address
    assert fake.calls[0]["addresses"] == ["192.0.2.3"]


def test_loop_rule_applies_to_mx_derived_hosts_only(tmp_path: Path) -> None:
    listen = {"smtp": ["tcp:25"]}  # a wildcard listener: every local address is ours
    relay, fake = routed(
        tmp_path, {"filter.test": "[127.0.0.1]:10025", "viamx.test": "lo.test:25"}, listen=listen
    )
    out = run(relay, "[route filter.test]", ["u@filter.test"])
    assert out["u@filter.test"].reply.positive  # a content filter on this machine
    assert fake.calls[0]["addresses"] == ["127.0.0.1"] and fake.calls[0]["port"] == 10025
    fake.calls.clear()
    reply = run(relay, "[route viamx.test]", ["u@viamx.test"])["u@viamx.test"].reply
    assert reply.transient and reply.status == "4.4.6" and "loops back to myself" in reply.text
    assert fake.calls == []


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("missing.test:25", "4.1.2"),  # NXDOMAIN
        ("null.test:25", "4.1.10"),  # null MX
        ("[missing.test]:25", "4.1.2"),
        ("broken.test:25", "4.4.3"),  # SERVFAIL
    ],
)
def test_a_broken_next_hop_keeps_the_mail_queued(tmp_path: Path, host: str, status: str) -> None:
    relay, fake = routed(tmp_path, {"x.test": host})
    reply = run(relay, "[route x.test]", ["u@x.test"])["u@x.test"].reply
    assert reply.transient and reply.status == status and not reply.remote
    assert f"route x.test to {host}" in reply.text
    assert fake.calls == []


def test_route_with_auth_over_required_tls(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pa ss\n")
    relay, fake = routed(
        tmp_path,
        {
            "two.test": {
                "host": "[relay.test]:587",
                "tls": "required",
                "user": "me",
                "password_file": "secret",
            }
        },
    )
    run(relay, "[route two.test]", ["u@two.test"])
    call = fake.calls[0]
    assert call["tls"] == "required" and call["tls_verify"] is True
    assert call["auth"] == ("me", "pa ss")


def test_tls_none_and_verify_defaults(tmp_path: Path) -> None:
    relay, fake = routed(
        tmp_path,
        {"a.test": {"host": "[relay.test]", "tls": "none"}, "b.test": "[relay.test]"},
        tls_verify=True,
    )
    run(relay, "[route a.test]", ["u@a.test"])
    run(relay, "[route b.test]", ["u@b.test"])
    assert [(c["tls"], c["tls_verify"]) for c in fake.calls] == [
        ("none", True),
        ("opportunistic", True),
    ]


def test_smarthost_password_file(tmp_path: Path) -> None:
    (tmp_path / "smarthost.secret").write_text("s3cret\n")
    relay, fake = make(
        tmp_path,
        smarthost="relay.test:587",
        smarthost_user="me",
        smarthost_password_file="smarthost.secret",
    )
    run(relay, SMARTHOST_ROUTE, ["u@two.test"])
    assert fake.calls[0]["auth"] == ("me", "s3cret")


def test_smarthost_is_the_star_route_and_exact_routes_win(tmp_path: Path) -> None:
    relay, fake = make(
        tmp_path,
        smarthost="relay.test:587",
        smarthost_user="me",
        smarthost_password="pw",
        routes={"two.test": "[192.0.2.70]:25"},
    )
    assert relay.route_key("u@two.test") == "[route two.test]"
    assert relay.route_key("u@nomx.test") == SMARTHOST_ROUTE
    run(relay, "[route two.test]", ["u@two.test"])
    assert fake.calls[0]["auth"] is None and fake.calls[0]["addresses"] == ["192.0.2.70"]


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[relay.routes]\n"x.test" = "a:b:c"\n', "[relay.routes.\"x.test\"] host: 'a:b:c': write"),
        ('[relay.routes]\n"x.test" = "[h"\n', "expected host:port (MX lookup of host) or [host]"),
        ('[relay.routes]\n"x.test" = "h:0"\n', "the port must be a number from 1 to 65535"),
        ('[relay.routes]\n"x.test" = {hots = "h"}\n', '[relay.routes."x.test"] hots: unknown key'),
        ('[relay.routes]\n"x.test" = {tls = "none"}\n', "host: missing"),
        ('[relay.routes]\n"x.test" = {host = "h", tls = "maybe"}\n', "tls: 'maybe': expected one"),
        (
            '[relay.routes]\n"x.test" = {host = "h", user = "u", password = "p"}\n',
            'tls: AUTH needs tls = "required" or "implicit"',
        ),
        (
            '[relay.routes]\n"x.test" = {host = "h", tls = "required", password = "p"}\n',
            "user: missing",
        ),
        (
            '[relay.routes]\n"x.test" = {host = "h", tls = "required", user = "u", password = "p", '
            'password_file = "f"}\n',
            "password_file: give password or password_file, not both",
        ),
        (
            '[relay.routes]\n"x.test" = {host = "h", tls = "required", user = "u", '
            'password_file = "nope"}\n',
            "password_file: cannot read",
        ),
        ('[relay.routes]\n"*.x.test" = "h"\n', "[relay] routes: '*.x.test': write .example.org"),
        ('[relay.routes]\n"bad..test" = "h"\n', "[relay] routes: 'bad..test' is not a valid"),
        (
            '[relay]\nsmarthost = "a:25"\n[relay.routes]\n"*" = "b:25"\n',
            '[relay] smarthost: both smarthost and routes."*" are set',
        ),
        ('[relay]\nroutes = "x"\n', "[relay] routes: expected dict"),
        (
            '[domains]\nlocal = ["here.test"]\n[relay.routes]\n"here.test" = "h"\n',
            "[relay] routes: 'here.test' is a local domain",
        ),
    ],
)
def test_config_errors_name_file_key_and_fix(tmp_path: Path, toml: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value).startswith(f"{f}: ")
    assert needle in str(err.value)


def test_password_is_not_in_the_repr(tmp_path: Path) -> None:
    cfg = parse_config(
        tomllib.loads(
            '[relay.routes]\n"x.test" = {host = "h:587", tls = "required", user = "u", '
            'password = "hunter2"}\n'
        ),
        None,
        tmp_path,
    )
    (route,) = cfg.relay.routes
    assert route.password == "hunter2" and "hunter2" not in repr(cfg)
