"""The congestion control a ranged upload asks for, from the path it measured (client/pathtune.py)."""

from __future__ import annotations

import socket

import pytest

from filedock.client.pathtune import can_set, choose_congestion_control

EVERYTHING = lambda name: True  # noqa: E731 - a kernel offering every algorithm
NOTHING = lambda name: False  # noqa: E731


def test_a_long_path_from_a_cubic_machine_gets_bbr():
    """100 ms away, default CUBIC, BBR settable: BBR, and the reason names the path and the default."""
    name, why = choose_congestion_control(0.1, None, "cubic", EVERYTHING)
    assert name == "bbr"
    assert "long path" in why and "cubic" in why


def test_the_users_choice_always_wins():
    """``--congestion-control cubic`` stays CUBIC even on a long path."""
    assert choose_congestion_control(0.1, "cubic", "cubic", EVERYTHING) == ("cubic", "asked for")


@pytest.mark.parametrize("rtt", [None, 0.0001, 0.0019])
def test_short_or_unmeasured_paths_keep_the_default(rtt):
    """Loopback, a LAN, or ``--streams K`` (no RTT measured): nothing is set."""
    name, why = choose_congestion_control(rtt, None, "cubic", EVERYTHING)
    assert name is None and "system default" in why


def test_nothing_is_set_where_bbr_is_already_the_default_or_not_offered():
    """A BBR default needs nothing; a kernel without BBR (or refusing it to this user) keeps its default."""
    assert choose_congestion_control(0.1, None, "bbr", EVERYTHING)[0] is None
    name, why = choose_congestion_control(0.1, None, "cubic", NOTHING)
    assert name is None and "not offered" in why


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="no per-socket congestion control here")
def test_can_set_tells_an_offered_algorithm_from_an_unknown_one():
    """``reno`` is built into every Linux kernel; a made-up name is refused."""
    assert can_set("reno")
    assert not can_set("no-such-algorithm")
