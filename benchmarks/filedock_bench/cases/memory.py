"""Case 2: peak resident memory of the filedock server and client during one large upload.

The server's growth is its peak (VmHWM, and the largest sampled VmRSS) during the
upload over its idle VmRSS just before (after a 1 MiB warm-up upload, so one-time
imports are not counted as growth). The client's growth is its peak RSS (from
``wait4``, exact) over the peak of the same command uploading 1 MiB.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from filedock_bench.cases import http_upload
from filedock_bench.cases.upload import cli_available
from filedock_bench.measure import Figure, Sample, human_size, say
from filedock_bench.memory import RssSampler, status_kib
from filedock_bench.processes import HERE, run_timed
from filedock_bench.workspace import PYTHON, ServerProcess, Workspace, filedock_server, random_file

WARMUP = 1 << 20


def _client(server: ServerProcess, path: Path, cli: bool) -> list[str]:
    """The command that uploads ``path`` into a fresh job (it creates what it needs)."""
    name = f"bench-rss-{uuid.uuid4().hex[:8]}"
    if cli:
        return [PYTHON, "-m", "filedock", "upload", "--job", name, "--create", "--json", str(path)]
    job, files, session = server.job_with_files(name, {path.name: path.stat().st_size})
    host, port = server.data_addr
    return [PYTHON, str(HERE / "library_upload.py"), host, str(port), session["key"],
            files[path.name]["key"], str(path)]


def _upload(server: ServerProcess, path: Path, cli: bool, sampler: RssSampler | None = None):
    done = run_timed(_client(server, path, cli), env=server.env(),
                     on_start=sampler.add if sampler else None)
    if done.returncode != 0:
        raise RuntimeError(f"upload client exited {done.returncode}: {done.stderr[-500:]}")
    return done


def run(size: int) -> list[Figure]:
    """One upload of ``size`` bytes (a single run: memory peaks are not noisy the way times are)."""
    reason = cli_available()
    cli = reason is None
    client_name = "filedock upload (CLI)" if cli else "library DataPortClient.upload_file (CLI missing)"
    with Workspace("memory") as work:
        say(f"case 2: peak RSS during one {human_size(size)} upload with {client_name}; creating the source file")
        source = random_file(work / "big.bin", size)
        tiny = random_file(work / "tiny.bin", WARMUP)
        server = filedock_server(work / "filedock-data")
        try:
            pid = server.proc.pid
            start_rss = status_kib(pid)["VmRSS"]
            warm = _upload(server, tiny, cli)
            time.sleep(1.0)
            idle = status_kib(pid)["VmRSS"]
            with RssSampler() as sampler:
                sampler.add(pid)
                big = _upload(server, source, cli, sampler)
            after = status_kib(pid)
            tus = http_upload.tus_rss(server, source)
        finally:
            server.stop()
    return _figures(size, client_name, start_rss, idle, sampler, pid, after, warm, big, reason) + [tus]


def _figures(size, client_name, start_rss, idle, sampler, pid, after, warm, big, reason) -> list[Figure]:
    mib = 1024
    server_peak = max(sampler.hwm.get(pid, 0), after.get("VmHWM", 0))
    srv = Figure("2-server", f"server peak RSS growth during a {human_size(size)} upload",
                 nbytes=size, samples=[Sample(big.seconds)])
    srv.value, srv.value_unit = (server_peak - idle) / mib, "MiB"
    srv.notes.append(f"idle {idle / mib:.1f} MiB (at start {start_rss / mib:.1f}), VmHWM {server_peak / mib:.1f} MiB, "
                     f"largest sampled VmRSS {sampler.max_rss.get(pid, 0) / mib:.1f} MiB, "
                     f"{sampler.samples} samples")
    cli = Figure("2-client", f"client peak RSS growth ({client_name})", nbytes=size, samples=[Sample(big.seconds)])
    cli.value, cli.value_unit = (big.max_rss_kib - warm.max_rss_kib) / mib, "MiB"
    sampled = sampler.max_rss.get(big.pid, 0)
    cli.notes.append(f"peak {big.max_rss_kib / mib:.1f} MiB (wait4) vs {warm.max_rss_kib / mib:.1f} MiB "
                     f"for a 1 MiB upload; largest sampled VmRSS {sampled / mib:.1f} MiB")
    if reason:
        cli.notes.append(reason)
    return [srv, cli]
