"""Ranged uploads (``filedock upload --streams 4``) through HAProxy to two servers sharing PostgreSQL
and one data dir: the ranges spread over both servers, one of them is SIGKILLed mid-upload, and
the CLI finishes through the other, sending again only what was not durable.

Real processes throughout (``tests/integration/cluster.py``): PostgreSQL, two ``filedock serve``
on ``haproxy:tcp:...`` endpoints, HAProxy, and the CLI.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import psycopg

from tests.integration.cluster import Cluster, shared_data_dir
from tests.integration.test_several_servers import cli, sha256_of, write_random

MB = 1_000_000
LIMITS = ["checkpoint_bytes=8M", "checkpoint_seconds=1"]

RANGE_START = re.compile(r"ranged upload of \S+: range (?P<start>\d+)-(?P<end>\d+) from (?P<offset>\d+);")


def range_holders(dsn: str) -> dict[int, int]:
    """{pid of a server: range claims it holds} from the shared registry."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT s.label, count(*) FROM upload_range_claims r "
                            "JOIN registry_servers s USING (server_id) GROUP BY s.label").fetchall()
    return {int(label.rsplit(" ", 1)[1]): n for label, n in rows}


def test_four_streams_through_haproxy_survive_a_sigkill_of_one_server(tmp_path, postgres_dsn):
    """``--streams 4`` through HAProxy: the four ranges are held by both servers at once (PUTR is no
    longer refused on PostgreSQL). Once a quarter of the file is durable, the server holding the most
    ranges is SIGKILLed; its ranges reconnect through HAProxy to the other server, which takes them at
    once (the dead server's range claims are free) and resumes each past its durable blocks: no range
    starts again from its start, and the bytes sent again stay within what was not yet checkpointed.
    The file is byte-identical from either server and fsck is clean."""
    size = 320 * MB + 12345
    source = tmp_path / "ranged.bin"
    digest = write_random(source, size)
    cluster = Cluster(tmp_path, postgres_dsn, shared_data_dir, LIMITS).start()
    shared = cluster.servers[0].data_dir
    try:
        client = subprocess.Popen([sys.executable, "-m", "filedock", "upload", "--job", "ranged", "--create",
                                   "--streams", "4", "--json", str(source)], env=cluster.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        spread: set[int] = set()
        deadline = time.monotonic() + 120
        while cluster.received_bytes() < size // 4 and time.monotonic() < deadline and client.poll() is None:
            spread |= set(range_holders(postgres_dsn))
            time.sleep(0.01)
        holders = range_holders(postgres_dsn)
        spread |= set(holders)
        assert holders, f"no range held when a quarter was durable (client exit {client.poll()})"
        victim = cluster.server_of_pid(max(holders, key=holders.get))
        durable_at_kill = cluster.received_bytes()
        victim.kill()
        out, err = client.communicate(timeout=600)
        assert client.returncode == 0, f"exit {client.returncode}\n{err}\n{cluster.logs()[-3000:]}"
        row = json.loads(out.strip().splitlines()[-1])
        victim.start()  # for the downloads from either server
        cluster.balancer.wait_backends("UP")
        logs = cluster.logs()
        starts: dict[tuple[int, int], list[int]] = {}
        for m in RANGE_START.finditer(logs):
            starts.setdefault((int(m["start"]), int(m["end"])), []).append(int(m["offset"]))
        print(f"FIGURES several_servers_ranges {json.dumps({'durable_at_kill': durable_at_kill, 'sent': row['sent'], 'ranges': row['streams']['ranges'], 'starts': {f'{a}-{b}': v for (a, b), v in starts.items()}})}")
        assert row["state"] == "complete", row
        assert row["streams"]["streams"] == 4 and len(row["streams"]["ranges"]) == 4
        assert all(r["sent"] > 0 for r in row["streams"]["ranges"]), "a range went by PUT, not PUTR"
        assert len(spread) == 2, f"the ranges were all on one server: {spread}"
        # only the bytes that were not durable went again: a checkpoint (8 MB), a block (4 MiB) and what
        # was in flight per range on the dead server, never a range from its start
        resent = row["sent"] - size
        assert 0 <= resent < 4 * 40 * MB, f"{row['sent']} bytes sent for {size}"
        resumed = [(rng, offsets) for rng, offsets in starts.items() if len(offsets) > 1]
        assert resumed, f"no range reconnected after the kill: {starts}"
        for (start, _end), offsets in starts.items():
            assert offsets.count(start) <= 1, f"range {start} sent again from its start: {offsets}"
        assert any(max(offsets) > start for (start, _), offsets in resumed), starts
        for n, server in enumerate(cluster.servers):
            other = cluster.servers[1 - n]
            other.stop()
            cluster.balancer.wait_backends("DOWN", names=[f"fd{1 - n}"])
            back = tmp_path / f"back{n}"
            down = cli(cluster.env(), "download", "--job", "ranged", "--all", str(back))
            assert down.returncode == 0, down.stderr
            assert sha256_of(back / "ranged.bin") == digest, f"from server {n}"
            other.start()
            cluster.balancer.wait_backends("UP")
        check = cli(cluster.env(), "fsck", "--data-dir", str(shared), "--metadata", postgres_dsn, "--json")
        assert check.returncode == 0, check.stdout + check.stderr
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM upload_range_claims").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM range_blocks").fetchone()[0] == 0
    finally:
        cluster.stop()
