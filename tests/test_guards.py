from __future__ import annotations

import pytest

from broker import guards

H = b"x-token-broker"


def scope(headers, client=("127.0.0.1", 5000), server=("127.0.0.1", 8765)):
    return {
        "http_version": "1.1",
        "headers": [(k.lower(), v) for k, v in headers],
        "client": client,
        "server": server,
    }


OK = [(b"host", b"127.0.0.1:8765"), (H, b"1")]


def test_a_well_formed_local_request_passes():
    assert guards.refusal(scope(OK), H) is None


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        ([(b"host", b"127.0.0.1:8765")], "header"),
        ([(b"host", b"127.0.0.1:8765"), (H, b"  ")], "header"),
        ([(b"host", b"evil.com"), (H, b"1")], "host"),
        ([(b"host", b"localhost.evil.com"), (H, b"1")], "host"),
        ([(b"host", b"127.0.0.1:9999"), (H, b"1")], "host"),
        ([*OK, (b"origin", b"null")], "browser"),
        ([*OK, (b"sec-fetch-site", b"same-origin")], "browser"),
        ([*OK, (b"x-forwarded-for", b"127.0.0.1")], "proxied"),
        ([*OK, (b"forwarded", b"for=127.0.0.1")], "proxied"),
    ],
)
def test_rejections(headers, rule):
    rejection = guards.refusal(scope(headers), H)
    assert rejection is not None and rejection.http_status == 403 and rejection.rule == rule


def test_missing_header_names_the_header():
    rejection = guards.refusal(scope([(b"host", b"localhost")]), H)
    assert rejection is not None and "X-Token-Broker" in str(rejection)


@pytest.mark.parametrize("peer", ["10.0.0.1", "192.168.1.1", "::ffff:10.0.0.1", "2001:db8::1"])
def test_non_loopback_peer_is_refused(peer):
    rejection = guards.refusal(scope(OK, client=(peer, 1)), H)
    assert rejection is not None and rejection.rule == "peer"


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_loopback_peers(peer):
    assert guards.refusal(scope(OK, client=(peer, 1)), H) is None


def test_unix_socket_skips_host_and_peer_but_not_the_rest():
    unix = {"client": None, "server": ("/run/tb.sock", None)}
    assert guards.refusal(scope([(H, b"1"), (b"host", b"anything")], **unix), H) is None
    assert guards.refusal(scope([(b"host", b"x")], **unix), H).rule == "header"
    assert guards.refusal(scope([(H, b"1"), (b"origin", b"x")], **unix), H).rule == "browser"


def test_open_routes_need_no_header_but_keep_other_guards():
    assert guards.refusal(scope([(b"host", b"localhost")]), None) is None
    assert guards.refusal(scope([(b"host", b"evil")]), None).rule == "host"


def test_remote_peers_pass_only_with_allow_remote_and_keep_the_host_rule():
    remote = scope(
        [(b"host", b"10.0.0.5:8765"), (H, b"1")],
        client=("10.0.0.9", 4000),
        server=("10.0.0.5", 8765),
    )
    assert guards.refusal(remote, H).rule == "peer"
    assert guards.refusal(remote, H, remote=True) is None
    # DNS rebinding stays blocked: a name is not the literal address the request came to.
    rebound = scope(
        [(b"host", b"evil.example:8765"), (H, b"1")],
        client=("10.0.0.9", 4000),
        server=("10.0.0.5", 8765),
    )
    assert guards.refusal(rebound, H, remote=True).rule == "host"
    browser = scope(
        [(b"host", b"10.0.0.5"), (H, b"1"), (b"origin", b"http://x")],
        client=("10.0.0.9", 4000),
        server=("10.0.0.5", 8765),
    )
    assert guards.refusal(browser, H, remote=True).rule == "browser"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"evil"), (b"host", b"localhost"), (H, b"1")],
        [(b"host", b"localhost"), (b"host", b"localhost"), (H, b"1")],
        [(b"host", b"localhost"), (H, b""), (H, b"1")],
        [(b"host", b"localhost"), (H, b"1"), (b"authorization", b"a"), (b"authorization", b"b")],
        [(b"host", b"localhost"), (H, b"1"), (b"sec-fetch-site", b"none")] * 1
        + [(b"sec-fetch-site", b"none")],
    ],
)
def test_a_duplicate_of_a_guarded_header_is_refused(headers):
    rejection = guards.refusal(scope(headers), H)
    assert rejection is not None and rejection.http_status == 400 and rejection.rule == "duplicate"


@pytest.mark.parametrize("version, status", [("0.9", 400), ("2.0", 505), ("1.2", 505)])
def test_only_http_1_x_is_served(version, status):
    rejection = guards.refusal({**scope(OK), "http_version": version}, H)
    assert rejection is not None and rejection.http_status == status and rejection.rule == "version"
    assert guards.refusal({**scope(OK), "http_version": "1.0"}, H) is None


UNIX = {"client": None, "server": ("/run/tb.sock", None)}


@pytest.mark.parametrize("where", [{}, UNIX], ids=["tcp", "unix"])
@pytest.mark.parametrize(
    "host",
    [None, b"user@localhost", b"localhost/x", b"local host", b"localhost:80a", b"[::1", b"[::1]x",
     b"local\xffhost", b"%zz"],
)  # fmt: skip
def test_a_missing_or_malformed_host_is_400_on_every_listener(where, host):
    """RFC 9112 §3.2: an HTTP/1.1 request without Host, or with an invalid one, is 400."""
    headers = [(H, b"1")] + ([] if host is None else [(b"host", host)])
    rejection = guards.refusal(scope(headers, **where), H)
    assert rejection is not None and rejection.http_status == 400 and rejection.rule == "bad_host"


def test_a_well_formed_host_that_names_another_host_is_403_and_http_1_0_may_omit_it():
    for host in (b"evil.example", b"[2001:db8::1]:8765", b"a%41b", b"x.example:"):
        assert guards.refusal(scope([(b"host", host), (H, b"1")]), H).http_status == 403
        assert guards.refusal(scope([(b"host", host), (H, b"1")], **UNIX), H) is None
    one_oh = {**scope([(H, b"1")]), "http_version": "1.0"}
    assert guards.refusal(one_oh, H).rule == "host"  # TCP: the rebinding rule needs a Host
    assert guards.refusal({**one_oh, **UNIX}, H) is None


@pytest.mark.parametrize(
    "value, valid",
    [(b"localhost", True), (b"127.0.0.1:8765", True), (b"[::1]:8765", True), (b"", True),
     (b"[v1.fe80::a+en1]", True), (b"a:b", False), (b"[::1]x", False), (b"a@b", False),
     (b"a b", False), (b"a\r\n", False)],
)  # fmt: skip
def test_valid_host(value, valid):
    assert guards.valid_host(value) is valid
