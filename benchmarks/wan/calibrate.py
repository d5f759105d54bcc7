"""Calibration of the WAN emulator: the figures docs/wan.md quotes, measured again on this machine.

    sudo .venv/bin/python benchmarks/wan/calibrate.py [--repeat 3] [--seconds 8]

Prints a Markdown table: ping RTT through a 100 ms link; the relay's ceiling (one BBR stream on
an unlimited, undelayed link) at MTU 1500 and 9000 for the C relay, the C relay without offloads
and relay.py, interleaved, with the ratio C / Python per round; the rate limit at 100 Mbit/s and
1 Gbit/s; one Reno and one CUBIC stream against the Mathis estimate at 40 ms / 1 % and 100 ms /
0.1 %; one BBR stream there. Each figure is the median of ``--repeat`` runs, with the range.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan import Link  # noqa: E402

PROBE = str(Path(__file__).resolve().parent / "probe.py")


def probe(ns, *args: str) -> dict:
    done = subprocess.run(ns.command([sys.executable, PROBE, *args]), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def stream(link: Link, cc: str, seconds: float, warmup: float) -> dict:
    sink = subprocess.Popen(link.receiver.command([sys.executable, PROBE, "tcp-sink", "--warmup", str(warmup)]),
                            stdout=subprocess.PIPE, text=True)
    sink.stdout.readline()
    try:
        return probe(link.sender, "tcp-source", "--to", f"{link.receiver_address}:5201", "--cc", cc,
                     "--seconds", str(seconds))
    finally:
        sink.kill()
        sink.wait()
        sink.stdout.close()


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    rows = []

    with Link(rtt_ms=100, rate_mbit=1000) as link:
        pings = probe(link.sender, "ping", "--to", link.receiver_address, "--count", "30", "--interval", "0.05")
    r = pings["rtt_ms"]
    rows.append((f"ping through a 100 ms, 1 Gbit/s link (30 echoes, {link.relay_kind} relay)",
                 f"min {min(r):.2f} / median {statistics.median(r):.2f} / max {max(r):.2f} ms", ""))

    relays = {"C relay": {"relay": "c"}, "C relay, no offload": {"relay": "c", "offload": False},
              "relay.py": {"relay": "python"}}
    for mtu in (1500, 9000):
        rates: dict[str, list[float]] = {name: [] for name in relays}
        for _ in range(args.repeat):
            for name, kind in relays.items():
                with Link(mtu=mtu, **kind) as link:
                    rates[name].append(stream(link, "bbr", args.seconds / 2, 1)["sink"]["steady_bytes_per_s"] / 1e6)
        for name in relays:
            ratio = [c / p for c, p in zip(rates[name], rates["relay.py"])]
            rows.append((f"{name} ceiling, MTU {mtu}: one BBR stream, no delay, no rate limit",
                         spread(rates[name]) + " MB/s", f"{spread(ratio, '{:.2f}')} x relay.py, same rounds"))

    for rate in (100, 1000):
        rates = []
        for _ in range(args.repeat):
            with Link(rtt_ms=10, rate_mbit=rate) as link:
                rates.append(stream(link, "bbr", args.seconds / 2, 1)["sink"]["steady_bytes_per_s"] / (rate * 1e6 / 8))
        rows.append((f"rate limit: one BBR stream, {rate} Mbit/s, 10 ms", spread(rates, "{:.3f}") + " x link", ""))

    for rtt, loss, rate in ((40, 0.01, 100), (100, 0.001, 1000)):
        for cc in ("reno", "cubic", "bbr"):
            got, ratio, retrans = [], [], []
            for seed in range(1, args.repeat + 1):
                with Link(rtt_ms=rtt, loss=loss, rate_mbit=rate, seed=seed) as link:
                    res = stream(link, cc, args.seconds, 2)
                mss = res["tcp_info"]["snd_mss"]
                mathis = mss / (rtt / 1000) * 1.22 / math.sqrt(loss)
                got.append(res["sink"]["steady_bytes_per_s"] / 1e6)
                ratio.append(res["sink"]["steady_bytes_per_s"] / mathis)
                retrans.append(res["tcp_info"]["total_retrans"] / max(1, res["tcp_info"]["data_segs_out"]))
            rows.append((f"one {cc} stream, {rtt} ms, {loss * 100:g} % loss, {rate} Mbit/s",
                         spread(got, "{:.2f}") + " MB/s",
                         f"{spread(ratio, '{:.2f}')} x Mathis ({mathis / 1e6:.2f} MB/s); "
                         f"retransmitted {spread([x * 100 for x in retrans], '{:.2f}')} %"))

    print("| figure | measured | notes |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
