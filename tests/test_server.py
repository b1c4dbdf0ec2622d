from __future__ import annotations

import socket

import helpers
import pytest

from broker import server
from broker.errors import ConfigError


def test_tcp_listeners_disable_nagle(tmp_path):
    # Without TCP_NODELAY, keep-alive answers written in two pieces wait ~40 ms for an ACK.
    number = helpers.reserve_port()
    settings = helpers.settings(server={"listen": [f"127.0.0.1:{number}"]})
    (sock,) = server.open_listeners(settings.server)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockname() == ("127.0.0.1", number)
    finally:
        sock.close()


def test_unix_listener_refuses_a_live_socket_and_a_regular_file(tmp_path):
    path = tmp_path / "b.sock"
    settings = helpers.settings(server={"listen": [f"unix:{path}"], "socket_mode": "0640"})
    (first,) = server.open_listeners(settings.server)
    try:
        assert (path.stat().st_mode & 0o777) == 0o640
        with pytest.raises(ConfigError, match="another process is listening there"):
            server.open_listeners(settings.server)
    finally:
        first.close()
    # A stale socket file (nobody listening) is replaced.
    (again,) = server.open_listeners(settings.server)
    again.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        server.open_listeners(settings.server)
    assert path.read_text() == "not a socket"


def test_unknown_socket_group_names_the_key(tmp_path):
    settings = helpers.settings(
        server={"listen": [f"unix:{tmp_path}/s.sock"], "socket_group": "no-such-group-x"}
    )
    with pytest.raises(ConfigError, match=r"\[server\] socket_group: no group named"):
        server.open_listeners(settings.server)
