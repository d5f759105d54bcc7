"""Long variants of the reliability and hostile-input tests (``make soak``, i.e. ``pytest -m soak``).

Same checks as the fast tests in test_reliability.py and test_hostile.py, with more
uploads, bigger files, more faults and more connections. Each prints a
``FIGURES`` line (run with ``-s``); docs/reliability.md quotes them.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.harness import ServerProcess
from tests.integration.test_dataport import wait_for
from tests.integration.test_hostile import run_barrage
from tests.integration.test_reliability import (
    CLIENT_SCRIPT, MiB, Generation, ResumingUpload, Source, crash_campaign, disk_values, final_path,
    idle_connections_do_not_starve_uploads, print_figures, run_fsck,
)

pytestmark = pytest.mark.soak


@pytest.mark.timeout(1800)
def test_soak_25_sigkills_during_20_concurrent_uploads(tmp_path):
    """20 concurrent uploads of 8..48 MiB, 25 SIGKILLs (17 at random points of the byte stream, 8 in some
    upload's DONE-to-STORED window): all complete and verified, no durable byte lost, fsck clean."""
    rng = random.Random(1001)
    sizes = [rng.randint(8 * MiB, 48 * MiB) for _ in range(20)]
    figures = crash_campaign(tmp_path, sizes=sizes, kills=25, done_kills=8, rate=1.5 * MiB, seed=1001,
                             min_gap=0.5, deadline=1200.0)
    assert figures["uploads_completed"] == 20


@pytest.mark.timeout(900)
def test_soak_1000_idle_connections_do_not_stop_an_upload(tmp_path):
    """1000 idle connections held open while a 16 MiB upload finishes."""
    figures = idle_connections_do_not_starve_uploads(tmp_path, held=1000, size=16 * MiB)
    print_figures("idle-1000", figures)
    assert figures["upload_seconds"] < 60


@pytest.mark.timeout(1800)
def test_soak_data_port_barrage(tmp_path):
    """The data-port barrage with 100 000 random inputs on top of the structured ones."""
    figures = run_barrage(tmp_path, count=100_000, name="hostile-data-port-soak")
    assert figures["inputs_tried"] >= 95_000  # the few random inputs that happen to be valid are skipped


@pytest.mark.timeout(900)
def test_soak_ten_killed_client_processes_all_resume(tmp_path):
    """10 client processes SIGKILLed at random moments mid-upload; each file then resumes from its
    durable partial (offset > 0) and completes with the right digest; fsck finds nothing."""
    rng = random.Random(2002)
    sources = {f"c{i}": Source.make(tmp_path / "src" / f"c{i}", rng.randint(4 * MiB, 12 * MiB), rng)
               for i in range(10)}
    with ServerProcess(tmp_path / "data", limits=["checkpoint_bytes=1M"]) as server:
        job, files, session = server.job_with_files("clients", {n: s.size for n, s in sources.items()})
        host, port = server.data_addr
        procs = {n: subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, host, str(port), session["key"],
                                      files[n]["key"], str(s.size), str(s.path)], stdout=subprocess.PIPE, text=True)
                 for n, s in sources.items()}
        try:
            for name, proc in procs.items():
                assert proc.stdout.readline().strip() == "OFFSET 0", name
            for name in rng.sample(sorted(procs), len(procs)):
                time.sleep(rng.uniform(0.3, 1.2))
                procs[name].send_signal(signal.SIGKILL)
                procs[name].wait(10)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        wait_for(lambda: not server.api.get("/v1/uploads")["uploads"], timeout=30)
        partial = {n: server.api.file(files[n]["key"]) for n in sources}
        assert all(r["state"] == "partial" and r["received"] > 0 for r in partial.values()), partial
        generation = Generation()
        uploads = [ResumingUpload(server, generation, session["key"], files[n]["key"], s, rate=64 * MiB,
                                  deadline=time.monotonic() + 300) for n, s in sources.items()]
        for upload in uploads:
            upload.start()
        for upload in uploads:
            upload.join(300)
        assert not [u.error for u in uploads if u.error], [u.error for u in uploads]
        assert all(u.offsets[0][1] > 0 for u in uploads), [u.offsets for u in uploads]
        for name, src in sources.items():
            assert disk_values(final_path(server, job["id"], files[name]["key"])) == (src.size, src.crc32, src.digest)
    status, report = run_fsck(server.data_dir)
    print_figures("client-death-soak", {"clients_killed": len(procs),
                                        "received_at_death": {n: r["received"] for n, r in partial.items()},
                                        "resumed_and_completed": len(uploads),
                                        "fsck_findings": len(report["findings"])})
    assert report["findings"] == [], report
