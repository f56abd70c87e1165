"""free_port: a port no outgoing connection can take before a server binds it."""

from __future__ import annotations

import socket

from deploy.lab.postgres import FREE_PORT_FLOOR, _ephemeral_range, free_port


def test_ports_come_from_below_the_ephemeral_range_and_are_free() -> None:
    low, _ = _ephemeral_range()
    ports = {free_port() for _ in range(50)}
    assert all(FREE_PORT_FLOOR <= port < low for port in ports), sorted(ports)
    assert len(ports) > 40  # chosen at random, not one port handed out again and again
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out() -> None:
    held = []
    try:
        # Hold a band of the range; every answer must fall outside it.
        for port in range(FREE_PORT_FLOOR, FREE_PORT_FLOOR + 2000):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        for _ in range(200):
            assert free_port() not in taken
    finally:
        for s in held:
            s.close()
