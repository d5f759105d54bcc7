"""filedock benchmarks: one invocation measures every case side by side.

    .venv/bin/python benchmarks/run.py [--size 1G] [--runs 3] [--rss-size 4G]
                                       [--wan-size 64M] [--wan-lossy-size 32M] [--wan-baseline-size 4M]
                                       [--only NAME[,NAME]] [--out benchmarks/results]

Each figure is the median of ``--runs`` interleaved runs (A B C D A B C D ...) and
is printed as MB/s and as a ratio against (b), the raw limit measured in the same
invocation. Progress goes to stderr; the Markdown table to stdout at the end.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from filedock_bench.cases import concurrency, memory, resume, s3, several_servers, small_files, upload  # noqa: E402
from filedock_bench.external_tools import ensure_tools  # noqa: E402
from filedock_bench.measure import Figure, human_size, parse_size, say  # noqa: E402
from filedock_bench.report import markdown_table, write_all  # noqa: E402
from filedock_bench.workspace import BENCH_DIR, WORK  # noqa: E402
from wan import bench as wan  # noqa: E402

CASES = {"upload": "1", "rss": "2", "concurrency": "3", "resume": "4", "small-files": "5", "s3": "6", "wan": "7",
         "several-servers": "8"}
"""``--only`` names: the cases (or their numbers) and case 1's variants."""


def parse_only(raw: str | None) -> tuple[set[str], set[str]]:
    """(cases, case-1 variants) that ``--only`` selects; everything when not given."""
    if not raw:
        return set(CASES), set(upload.VARIANTS)
    cases, variants = set(), set()
    by_number = {number: name for name, number in CASES.items()}
    for name in (n.strip().lower() for n in raw.split(",") if n.strip()):
        if name in CASES or name in by_number:
            cases.add(by_number.get(name, name))
        elif name in upload.VARIANTS:
            variants.add(name)
        else:
            known = ", ".join([*CASES, *upload.VARIANTS])
            raise SystemExit(f"run.py: --only: unknown name {name!r}; known: {known} (or case numbers 1-6)")
    if variants:
        cases.add("upload")
    elif "upload" in cases:
        variants = set(upload.VARIANTS)
    return cases, variants


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="cases: upload (1), rss (2), concurrency (3), resume (4), small-files (5), s3 (6), "
                                       "wan (7), several-servers (8); "
                                       "case 1 variants: " + ", ".join(upload.VARIANTS) +
                                       ". (b) 'raw' always runs: every ratio is against it.")
    p.add_argument("--size", default="1G", help="bytes per upload in cases 1, 3, 4 and 6 (K/M/G suffixes; default 1G)")
    p.add_argument("--runs", type=int, default=None, help="interleaved runs per figure; the median is reported (default 3)")
    p.add_argument("--upload-runs", type=int, default=None,
                   help="interleaved runs per figure of case 1 (default: --runs if given, else 5: its rows are ratios "
                        "of one another, and one run of a row spreads +-15%% on a shared machine; five cost ~1 min "
                        "more than three)")
    p.add_argument("--rss-size", default="4G", help="upload size for the memory case (default 4G)")
    p.add_argument("--wan-size", default="64M",
                   help="upload size on the emulated clean 100 ms link in case 7 (default 64M, to keep the case "
                        "short; the issue's: 2G)")
    p.add_argument("--wan-lossy-size", default="32M",
                   help="upload size on the emulated 100 ms, 0.1%% loss link in case 7 (default 32M; the issue's: 2G)")
    p.add_argument("--wan-baseline-size", default="4M",
                   help="upload size on the 0.1%% loss link of the rows far below the link rate (one stream: "
                        "filedock, rsync, scp; every CUBIC sender: about 1 MB/s a stream) (default 4M)")
    p.add_argument("--wan-tools-size", default=None,
                   help="upload size of rsync and scp on the clean link in case 7 (default: --wan-size); they move "
                        "about 0.15x the link, so 2 GiB each takes two minutes")
    p.add_argument("--only", metavar="NAME[,NAME]", help="run only these cases or case-1 variants")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where results go")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        size, rss_size = parse_size(args.size), parse_size(args.rss_size)
        wan_size, wan_lossy_size = parse_size(args.wan_size), parse_size(args.wan_lossy_size)
        wan_baseline_size = parse_size(args.wan_baseline_size)
    except ValueError as exc:
        raise SystemExit(f"run.py: {exc}")
    upload_runs = args.upload_runs if args.upload_runs is not None else args.runs if args.runs is not None else 5
    args.runs, args.upload_runs = (args.runs if args.runs is not None else 3), upload_runs
    if args.runs < 1 or upload_runs < 1:
        raise SystemExit("run.py: --runs and --upload-runs must be at least 1")
    cases, variants = parse_only(args.only)
    started, load_before = time.time(), _load()
    t0 = time.monotonic()
    say(f"filedock benchmarks: --size {human_size(size)} --runs {args.runs} (case 1: {upload_runs}) "
        f"--rss-size {human_size(rss_size)}; "
        f"cases {', '.join(sorted(cases, key=CASES.get))}; load average {load_before}")
    if cases & {"upload", "small-files"} or variants & {"rsync", "socat"}:
        ensure_tools()
    _byte_compile()
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    # (b) is the reference for every ratio, so case 1 runs (with (b) alone at least) whatever was chosen
    for name, run in (("upload", lambda: upload.run(size, upload_runs, variants if "upload" in cases else set())),
                      ("rss", lambda: memory.run(rss_size)),
                      ("concurrency", lambda: concurrency.run(size, args.runs)),
                      ("resume", lambda: resume.run(size, args.runs)),
                      ("small-files", lambda: small_files.run(args.runs)),
                      ("s3", lambda: s3.run(size, args.runs)),
                      ("wan", lambda: wan.run(wan_size, wan_lossy_size, args.runs, wan_baseline_size,
                                                     parse_size(args.wan_tools_size) if args.wan_tools_size else None)),
                      ("several-servers", lambda: several_servers.run(size, args.runs))):
        if name != "upload" and name not in cases:
            continue
        case_started = time.monotonic()
        figures += run()
        timings[name] = round(time.monotonic() - case_started, 1)
        say(f"  ({name}: {timings[name]:.0f} s)")
    meta = _meta(args, size, rss_size, started, load_before, time.monotonic() - t0, timings)
    out = write_all(args.out, figures, meta)
    _remove_empty(WORK)
    print(f"\nfiledock benchmarks, --size {args.size} --runs {args.runs} (case 1: {args.upload_runs}): "
          f"MB/s (10^6 B/s), medians of interleaved runs; ratios against (b) from this run\n")
    print(markdown_table(figures))
    written = ", ".join(n for n in ("results.json", "results.md", "concurrency.png") if (out / n).exists())
    print(f"\nresults in {out}/ ({written}); {meta['seconds']:.0f} s in all")
    return 0


def _byte_compile() -> None:
    """Byte-compile filedock's sources, as ``pip install`` does for an installed package.

    An editable install (``make``'s) leaves that to the first import, and where
    ``PYTHONDONTWRITEBYTECODE`` is set (this machine's environment) nothing is ever written:
    every ``filedock`` command compiled all its modules again, 0.15-0.2 s of each whole-command
    figure (a 1 KB upload: 0.50-0.72 s without, 0.30-0.47 s with). Stale files are redone.
    """
    import compileall

    import filedock

    compileall.compile_dir(str(Path(filedock.__file__).parent), quiet=1)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _meta(args, size, rss_size, started, load_before, seconds, timings) -> dict:
    import twisted

    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "args": {"size": args.size, "size_bytes": size, "runs": args.runs, "upload_runs": args.upload_runs, "rss_size": args.rss_size,
                 "rss_size_bytes": rss_size, "wan_size": args.wan_size, "wan_lossy_size": args.wan_lossy_size,
                 "wan_baseline_size": args.wan_baseline_size, "wan_tools_size": args.wan_tools_size,
                 "only": args.only},
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                 "twisted": twisted.__version__, "tools": ensure_tools()},
        "load_before": load_before, "load_after": _load(), "seconds": seconds, "case_seconds": timings,
    }


def _remove_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
