"""Results: the Markdown table, results.json, results.md and concurrency.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from statistics import median

from filedock_bench.measure import MB, Figure

RAW = "1b"


def _rate(fig: Figure) -> str:
    return f"{fig.mbps:.0f}" if fig.mbps is not None else "—"


def _ratio(fig: Figure, raw: Figure | None) -> str:
    if fig.mbps is None or raw is None or raw.mbps is None:
        return "—"
    return f"{fig.mbps / raw.mbps:.2f}x"


def _notes(fig: Figure) -> str:
    parts = []
    if fig.skipped:
        parts.append(f"**skipped**: {fig.skipped}")
    if fig.failed:
        parts.append(f"**failed**: {fig.failed}")
    if fig.value is not None:
        sign = "+" if fig.value_unit == "MiB" and fig.value >= 0 else ""
        what = "peak RSS growth" if fig.value_unit == "MiB" else "median"
        parts.append(f"**{sign}{fig.value:.{1 if fig.value_unit == 'MiB' else 3}f} {fig.value_unit}** {what}")
    if fig.files_per_second is not None:
        parts.append(f"**{fig.files_per_second:.0f} files/s**")
    if len(fig.samples) > 1 and fig.nbytes:
        rates = sorted(fig.nbytes / s / MB for s in fig.seconds)
        parts.append(f"runs {rates[0]:.0f}–{rates[-1]:.0f} MB/s")
    elif len(fig.samples) == 1 and fig.value_unit == "MiB":
        parts.append("1 run")
    parts.extend(fig.notes)
    cpu = [s.extra["cpu_seconds"] / (fig.nbytes / 2**30) for s in fig.samples if "cpu_seconds" in s.extra
           and fig.nbytes]
    if cpu:
        busy = median(s.extra.get("busy_pct", 0) for s in fig.samples)
        parts.append(f"machine CPU {median(cpu):.2f} s/GiB, cores {busy:.0f}% busy")
    sides = {side: [s.extra[f"{side}_cpu_seconds"] / (fig.nbytes / 2**30) for s in fig.samples
                    if f"{side}_cpu_seconds" in s.extra] for side in ("client", "server")}
    if fig.nbytes and all(sides.values()):
        parts.append(f"of it the client {median(sides['client']):.2f} s/GiB, the server "
                     f"{median(sides['server']):.2f} s/GiB")
    steal = [s.extra.get("steal_pct", 0) for s in fig.samples]
    if steal and max(steal) >= 5:
        parts.append(f"host stole {max(steal):.0f}% of CPU time in its worst run")
    return "; ".join(parts).replace("|", "\\|")


def markdown_table(figures: list[Figure]) -> str:
    raw = next((f for f in figures if f.key == RAW), None)
    lines = ["| case | MB/s | ratio to (b) | notes |", "|---|---:|---:|---|"]
    for fig in figures:
        lines.append(f"| {fig.key} {fig.title} | {_rate(fig)} | {_ratio(fig, raw)} | {_notes(fig)} |")
    return "\n".join(lines)


def write_all(out: Path, figures: list[Figure], meta: dict[str, Any]) -> Path:
    """results.json, results.md and (when case 3 ran) concurrency.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    raw = next((f for f in figures if f.key == RAW), None)
    payload = {"meta": meta, "figures": [f.to_json() | {"ratio_to_b": _ratio_value(f, raw)} for f in figures]}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(_markdown_page(figures, meta))
    if any(f.key.startswith("3-") and f.samples for f in figures):
        plot_concurrency(out / "concurrency.png", figures)
    else:  # a plot from an earlier invocation would not match these results
        (out / "concurrency.png").unlink(missing_ok=True)
    return out


def _ratio_value(fig: Figure, raw: Figure | None) -> float | None:
    if fig.mbps is None or raw is None or raw.mbps is None:
        return None
    return fig.mbps / raw.mbps


def _markdown_page(figures: list[Figure], meta: dict[str, Any]) -> str:
    head = [
        "# filedock benchmark results", "",
        f"{meta['started']} on {meta['host']['cpus']} CPUs, {meta['host']['kernel']}; "
        f"`--size {meta['args']['size']} --runs {meta['args']['runs']} "
        f"--upload-runs {meta['args'].get('upload_runs', meta['args']['runs'])} --rss-size {meta['args']['rss_size']}`"
        f"{' --only ' + meta['args']['only'] if meta['args']['only'] else ''}; "
        f"load average {meta['load_before']} before, {meta['load_after']} after; {meta['seconds']:.0f} s in all.", "",
        "MB/s are 10^6 bytes per second, each the median of interleaved runs; ratios are against (b) "
        "from the same invocation. See benchmarks/README.md for what each case measures.", "",
    ]
    return "\n".join(head) + markdown_table(figures) + "\n"


def plot_concurrency(path: Path, figures: list[Figure]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [f for f in figures if f.key.startswith("3-c") and f.samples]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    xs = [int(f.key[3:]) for f in levels]
    ys = [f.mbps for f in levels]
    lows = [f.mbps - min(f.nbytes / s for s in f.seconds) / MB for f in levels]
    highs = [max(f.nbytes / s for s in f.seconds) / MB - f.mbps for f in levels]
    ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=4, label="filedock server, aggregate (median, min–max)")
    idle = next((f for f in figures if f.key == "3-idle" and f.samples), None)
    if idle:
        ax.plot([1], [idle.mbps], marker="s", linestyle="none", color="tab:red", label="1 upload + 1000 idle connections")
    for key, style, label in ((RAW, "--", "(b) raw limit, 1 upload"), ("1d", ":", "(d) filedock server, 1 upload (case 1)")):
        ref = next((f for f in figures if f.key == key and f.mbps), None)
        if ref:
            ax.axhline(ref.mbps, linestyle=style, color="gray", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs or [1, 4, 16])
    ax.set_xticklabels([str(x) for x in (xs or [1, 4, 16])])
    ax.set_xlabel("concurrent uploads")
    ax.set_ylabel("aggregate MB/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput against concurrency (loopback, durable)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
