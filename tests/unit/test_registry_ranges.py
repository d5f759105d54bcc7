"""Range claims in the in-process upload registry: overlap takes over, disjoint ranges share the file."""

from __future__ import annotations

from filedock.server.registry import InProcessUploadRegistry

FILE, SESSION = "f", "s"


def claim(registry, start, end, asked, limit=16):
    got = []
    d = registry.acquire_range(FILE, start, end, SESSION, limit, lambda: asked.append((start, end)))
    d.addCallback(got.append)
    return got


def test_disjoint_ranges_hold_the_file_together():
    reg, asked = InProcessUploadRegistry(), []
    a, b = claim(reg, 0, 10, asked), claim(reg, 10, 20, asked)
    assert a and b and not asked and not a[0].took_over and not b[0].took_over
    assert reg.is_held(FILE).result is True
    assert reg.try_acquire(FILE).result is None  # a batch cannot take a file being uploaded in ranges
    reg.release(a[0])
    reg.release(b[0])
    assert reg.is_held(FILE).result is False and reg.session_slots(SESSION) == 0


def test_an_overlapping_range_takes_over_once_the_old_one_let_go():
    reg, asked = InProcessUploadRegistry(), []
    old = claim(reg, 0, 10, asked)
    other = claim(reg, 10, 20, asked)
    new = claim(reg, 5, 10, asked)
    assert asked == [(0, 10)] and new == []  # only the overlapping holder is asked
    reg.release(old[0])
    assert new and new[0].took_over
    assert reg.session_slots(SESSION) == 2
    del other


def test_plain_upload_takes_over_every_range_and_a_range_takes_over_a_plain_upload():
    reg, asked = InProcessUploadRegistry(), []
    r1, r2 = claim(reg, 0, 10, asked), claim(reg, 10, 20, asked)
    plain = []
    reg.acquire(FILE, SESSION, 16, lambda: asked.append("plain")).addCallback(plain.append)
    assert sorted(asked) == [(0, 10), (10, 20)] and plain == []
    reg.release(r1[0])
    assert plain == []
    reg.release(r2[0])
    assert plain and plain[0].took_over
    again = claim(reg, 0, 10, asked)
    assert asked[-1] == "plain" and again == []
    reg.release(plain[0])
    assert again and again[0].took_over


def test_session_slots_count_ranges():
    reg, asked = InProcessUploadRegistry(), []
    claim(reg, 0, 10, asked, limit=2)
    claim(reg, 10, 20, asked, limit=2)
    failed = []
    reg.acquire_range(FILE, 20, 30, SESSION, 2, lambda: None).addErrback(failed.append)
    assert failed and failed[0].value.code.value == "too-many-connections"
