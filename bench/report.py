"""Render results JSON as the Markdown tables used in ``docs/benchmarks.md``.

    .venv/bin/python -m bench.report bench/results/suite-quick-cpu.json
    .venv/bin/python -m bench.report bench/results/overhead.json bench/results/model.json

Every number in the docs tables comes from a results file through this script (no hand edits).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PIPELINE_HEADERS", "main", "md_range", "md_table", "pipeline_rows", "render"]


def md_range(s: dict[str, Any], spec: str) -> str:
    """A summary's median, with its min-max range when the runs differ."""
    med = format(s["median"], spec)
    if s["min"] == s["max"]:
        return med
    return f"{med} ({format(s['min'], spec)}-{format(s['max'], spec)})"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 3) -> str:
    """A Markdown table: the first ``left`` columns left-aligned, the rest right-aligned."""
    out = ["| " + " | ".join(headers) + " |"]
    out.append("|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|")
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _machine(res: dict[str, Any]) -> str:
    m = res["machine"]
    v = m["versions"]
    loads = [f"{x:.2f}" for x in m["loadavg_at_start"]]
    end = m.get("loadavg_at_end")
    load = f"load avg at start {'/'.join(loads)}"
    if end:
        load += f", at end {'/'.join(f'{x:.2f}' for x in end)}"
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return (
        f"*{m['cpu']} x{m['cpus']} cores, {m['platform']}, Python {m['python']}; {vers}; "
        f"batchio commit {m.get('git_commit')}; {load}; run at {m['time_utc']}.*"
    )


def overhead_md(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        if "items_per_s" not in r:
            body.append([r["contender"], r["loop"], r["fn"], "error", r.get("error", ""), "", ""])
            continue
        body.append([
            r["contender"], r["loop"], r["fn"], md_range(r["items_per_s"], ",.0f"),
            f"{r['us_per_request']:.2f}", f"{r['ratio_to_floor']:.2f}",
            f"{r['mean_batch_size']['median']:.1f}",
        ])  # fmt: skip
    return md_table(
        [
            "contender",
            "loop",
            "fn",
            "requests/s, median (min-max)",
            "µs/request",
            "÷ floor",
            "mean batch",
        ],
        body,
    )


def baselines_md(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        p50 = md_range(r["p50_ms"], ".1f") if "p50_ms" in r else ""
        p99 = md_range(r["p99_ms"], ".1f") if "p99_ms" in r else ""
        body.append([r["key"], md_range(r["sentences_per_s"], ".1f"), p50, p99])
    return md_table(["baseline", "sentences/s", "p50 ms", "p99 ms"], body)


FORWARD_COLUMNS = {
    "ratio_to_forward_sorted": "÷ forward-only (sorted)",
    "ratio_to_forward_arrival": "÷ forward-only (arrival order)",
}


def closed_md(rows: list[dict[str, Any]], arrival_ceiling: float | None = None) -> str:
    # Results written before the forward-only limit existed render as they always did.
    fwd_keys = [k for k in FORWARD_COLUMNS if any(k in r for r in rows)]
    body = []
    for r in rows:
        head = [r["contender"], r["loop"], str(r["concurrency"])]
        if "sentences_per_s" not in r:
            body.append([*head, "error: " + r.get("error", ""), *[""] * (5 + len(fwd_keys))])
            continue
        arrival = r.get("ratio_to_arrival_ceiling")
        if arrival is None and arrival_ceiling:
            arrival = r["sentences_per_s"]["median"] / arrival_ceiling
        body.append([
            *head, md_range(r["sentences_per_s"], ".1f"), f"{r['ratio_to_ceiling']:.2f}",
            f"{arrival:.2f}" if arrival is not None else "",
            *[f"{r[k]:.2f}" if k in r else "" for k in fwd_keys],
            f"{r['mean_batch_size']['median']:.1f}", md_range(r["p50_ms"], ".0f"),
            md_range(r["p99_ms"], ".0f"),
        ])  # fmt: skip
    return md_table(
        [
            "contender",
            "loop",
            "clients",
            "sentences/s",
            "÷ ceiling (sorted)",
            "÷ ceiling (arrival order)",
            *[FORWARD_COLUMNS[k] for k in fwd_keys],
            "mean batch",
            "p50 ms",
            "p99 ms",
        ],
        body,
    )


PIPELINE_HEADERS = ["contender", "rows/s", "p50 ms", "p99 ms", "÷ limit", "mean batch",
                    "device busy", "new shapes"]  # fmt: skip
"""The columns of :func:`pipeline_rows`."""


def pipeline_rows(
    rows: Sequence[dict[str, Any]],
    fmt_range: Callable[[dict[str, Any], str], str],
    no_error: str = "",
) -> list[list[str]]:
    """``bench_pipeline``'s rows as table cells, a range written by ``fmt_range(summary, spec)``.

    A row that failed shows ``error: <its error>`` (``no_error`` when it names none).
    """
    body = []
    for r in rows:
        if "rows_per_s" not in r:
            body.append([r["contender"], "error: " + r.get("error", no_error), *[""] * 6])
            continue
        lat = [fmt_range(r[k], ".1f") if k in r else "" for k in ("p50_ms", "p99_ms")]
        body.append([
            r["contender"], fmt_range(r["rows_per_s"], ",.0f"), *lat,
            f"{r['ratio_to_limit']:.2f}", f"{r['mean_batch']['median']:.1f}",
            f"{r['device_busy']['median']:.2f}", f"{r['new_shapes']['median']:.0f}",
        ])  # fmt: skip
    return body


def pipeline_md(res: dict[str, Any]) -> str:
    """``bench_pipeline``: the device model's constants, then one row per contender."""
    m = res["device_model"]
    head = (
        f"Simulated device: {m['a'] * 1000:.2f} ms + {m['b'] * 1e9:.0f} ns per padded token, "
        f"+{m['new_shape'] * 1000:.1f} ms the first time a shape is seen; "
        f"{res['args']['clients']} clients, {res['args']['requests']:,} requests, "
        f"max_batch_size {res['spec']['max_batch_size']}, max_wait {res['spec']['max_wait']} s."
    )
    return head + "\n\n" + md_table(PIPELINE_HEADERS, pipeline_rows(res["rows"], md_range))


def open_md(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        head = [r["contender"], f"{r['level']:.0%}", f"{r['offered_rate']:.0f}"]
        if "p50_ms" not in r:
            body.append([*head, "error: " + r.get("error", ""), "", "", "", "", ""])
            continue
        body.append([
            *head, f"{r['completed_fraction']['median']:.0%}", md_range(r["throughput"], ".1f"),
            md_range(r["goodput"], ".1f"), md_range(r["p50_ms"], ",.0f"),
            md_range(r["p99_ms"], ",.0f"), f"{r['mean_batch_size']['median']:.1f}",
        ])  # fmt: skip
    return md_table(
        [
            "contender",
            "load",
            "offered/s",
            "completed",
            "done/s",
            "goodput/s",
            "p50 ms",
            "p99 ms",
            "mean batch",
        ],
        body,
    )


def idle_md(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        head = [r["contender"], r["loop"], f"{r['max_wait'] * 1000:g}"]
        if "added_p50_ms" not in r:
            body.append([*head, "error: " + r.get("error", ""), "", "", ""])
            continue
        body.append([
            *head, md_range(r["direct_p50_ms"], ".2f"), md_range(r["batched_p50_ms"], ".2f"),
            md_range(r["added_p50_ms"], ".2f"), md_range(r["added_p99_ms"], ".2f"),
        ])  # fmt: skip
    return md_table(
        [
            "contender",
            "loop",
            "max_wait ms",
            "direct p50 ms",
            "via batcher p50 ms",
            "added p50 ms",
            "added p99 ms",
        ],
        body,
    )


def render(res: dict[str, Any]) -> str:
    """All the tables of one results file, with its machine line."""
    parts = [_machine(res)]
    kind = res["benchmark"]
    if kind in ("overhead", "suite") and res.get("rows" if kind == "overhead" else "overhead"):
        parts.append(overhead_md(res["rows"] if kind == "overhead" else res["overhead"]))
    if kind == "pipeline":
        parts.append(pipeline_md(res))
    if kind in ("model", "suite"):
        parts.append(baselines_md(res["baselines"]))
        if res.get("closed"):
            arrival = next(
                (b["sentences_per_s"]["median"] for b in res["baselines"]
                 if b["key"] == "ceiling (arrival order)" and "sentences_per_s" in b),
                None,
            )  # fmt: skip
            parts.append(closed_md(res["closed"], arrival))
        if res.get("open"):
            parts.append(f"Goodput SLO: {res['slo_s'] * 1000:.0f} ms.\n\n" + open_md(res["open"]))
        if res.get("idle"):
            parts.append(idle_md(res["idle"]))
    if res.get("skipped"):
        parts.append("\n".join(f"- skipped {k}: {v}" for k, v in res["skipped"].items()))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    a = p.parse_args(argv)
    for f in a.files:
        print(f"<!-- from {f} -->")
        print(render(json.loads(f.read_text())))


if __name__ == "__main__":
    main()
