"""The benchmarks still run: every workload of ``bench/`` at tiny sizes (seconds, not a measurement).

Performance is not asserted here, only that each piece produces sane, complete numbers, so the
benchmark code cannot rot silently. Peers that are not installed are skipped by the harness.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

import batchio
from bench import bench_overhead, suite
from bench._contenders import by_name
from bench._harness import BatchSpec, Progress

pytestmark = pytest.mark.filterwarnings(
    # transformers/torch may warn about things that are not ours while loading the model.
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore::UserWarning",
)


def test_overhead_floor_and_batchio() -> None:
    """The no-op closed loop runs for the floors and batchio, sync and async fn, and batches."""
    skipped: dict[str, str] = {}
    rows = bench_overhead.run_overhead(
        by_name("floor,floor+thread,batchio"),
        loops=["asyncio"],
        fn_kinds=["sync", "async"],
        spec=BatchSpec(max_batch_size=16, max_wait=0.005),
        requests=2_000,
        concurrency=64,
        repeats=1,
        progress=Progress(1, enabled=False),
        skipped=skipped,
    )
    got = {(r["contender"], r["fn"]) for r in rows}
    assert got == {
        ("floor", "sync"),
        ("floor", "async"),
        ("floor+thread", "sync"),
        ("batchio", "sync"),
        ("batchio", "async"),
    }
    for r in rows:
        assert "error" not in r, r
        assert r["items_per_s"]["median"] > 0
        assert r["ratio_to_floor"] > 0
        assert r["mean_batch_size"]["median"] > 1  # 64 clients really were batched
    assert "floor+thread (async fn)" in skipped


def test_suite_tiny_end_to_end(tmp_path: Path) -> None:
    """One tiny suite run with the real model: every workload, JSON results and plots."""
    out = tmp_path / "results.json"
    suite.main(
        [
            "--tiny",
            "--quiet",
            "--max-batch-size",
            "8",
            "--contenders",
            "floor,batchio,batchio.SentenceEmbedder",
            "--loops",
            "asyncio",
            "--json",
            str(out),
            "--plots",
            str(tmp_path),
        ]
    )
    results = json.loads(out.read_text())
    assert results["machine"]["cpus"] >= 1
    assert results["ceiling"]["sorted"] > 0
    assert results["ceiling"]["forward_sorted"] > 0
    assert results["ceiling"]["forward_arrival"] > 0
    closed = {(r["contender"], r["concurrency"]) for r in results["closed"] if "error" not in r}
    assert closed == {
        ("batchio", 1),
        ("batchio", 8),
        ("batchio.SentenceEmbedder", 1),
        ("batchio.SentenceEmbedder", 8),
    }
    for r in results["closed"]:
        assert r["ratio_to_forward_sorted"] > 0
        assert r["ratio_to_forward_arrival"] > 0
    for section in ("closed", "open", "idle", "overhead"):
        assert results[section], section
        for r in results[section]:
            assert "error" not in r, r
    assert all(r["completed_fraction"]["median"] == 1.0 for r in results["open"])
    for name in ("overhead", "throughput_vs_concurrency", "latency_vs_load"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_micro_experiments_run_at_tiny_sizes() -> None:
    """Each experiment behind docs/design.md runs and returns a positive cost."""
    from bench import micro
    from bench._harness import run_on_loop

    for loop in ("asyncio", "uvloop"):
        assert run_on_loop(loop, lambda: micro.hop_executor(20)) > 0
        assert run_on_loop(loop, lambda: micro.hop_anyio(20)) > 0
        assert run_on_loop(loop, lambda: micro.hop_batchio(20)) > 0
        assert run_on_loop(loop, lambda: micro.floor(True, requests=2_000, clients=16)) > 0
        assert run_on_loop(loop, lambda: micro.batchio_async_noop(8, 16, requests=2_000)) > 0
        for path in ("call", "nowait"):
            for use_async in (True, False):
                run = functools.partial(
                    micro.batchio_calls, batchio.Batcher, path, use_async, 8, 16, 512
                )
                assert run_on_loop(loop, run) > 0
        by_loop, by_thread = run_on_loop(loop, lambda: micro.loop_checks(1_000))
        assert isinstance(by_loop, float)
        assert isinstance(by_thread, float)


def test_pipeline_bench_runs_and_prints_its_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench_pipeline at tiny sizes: every contender runs, and the last line is the ratio."""
    import re

    from bench import bench_pipeline

    out = tmp_path / "pipeline.json"
    bench_pipeline.main(
        ["--quiet", "--clients", "32", "--requests", "600", "--batch-size", "16",
         "--repeats", "1", "--corpus-size", "256", "--json", str(out)]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    staged_skipped = bench_pipeline.staged_unavailable() is not None
    pattern = r"staged/limit = n/a" if staged_skipped else r"staged/limit = \d+\.\d\d"
    assert re.fullmatch(pattern, lines[-1]), lines[-1]
    results = json.loads(out.read_text())
    names = {r["contender"] for r in results["rows"] if "error" not in r}
    expected = {"limit", "single-worker"} | ({"async-batcher"} - set(results["skipped"]))
    assert expected | ({"staged"} if not staged_skipped else set()) == names
    for r in results["rows"]:
        assert r["rows_per_s"]["median"] > 0


def test_gpu_bench_runs_on_a_cpu_at_tiny_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench_gpu --quick on the CPU: the forward-only limit and both embedder forms run, and each
    configuration's line ends with its ratio."""
    import re

    from bench import bench_gpu

    out = tmp_path / "gpu.json"
    bench_gpu.main(["--device", "cpu", "--quick", "--json", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"embedder/forward-only = \d+\.\d\d \(plain \d+\.\d\d\)$", last), last
    (row,) = json.loads(out.read_text())["rows"]
    assert row["forward_only_rps"] > 0
    assert row["staged_rps"] > 0
    assert row["plain_rps"] > 0


def test_sched_bench_runs_at_tiny_sizes(tmp_path: Path) -> None:
    """bench_sched at tiny sizes on the simulated accelerator: every contender runs at every
    level, the oracle picks the best static grid cell, the controller's decisions are recorded
    from statistics(), the idle comparison has its three settings, and the plots are written."""
    from bench import bench_sched as bs

    out = tmp_path / "sched.json"
    grid0 = bs.grid_name(0.0, 64)
    names = [bs.LT, bs.LT_DEADLINE, bs.DEFAULT, grid0]
    bs.main(
        ["--tiny", "--quiet", "--workloads", "sim", "--contenders", ",".join(names),
         "--json", str(out), "--plots", str(tmp_path)]
    )  # fmt: skip
    res = json.loads(out.read_text())
    wl = res["workloads"]["sim"]
    assert wl["capacity"] > 0
    assert wl["slo_s"] > 0
    assert wl["grid"] == [bs.DEFAULT, grid0]
    rows = res["open"]
    levels = res["sizes"]["levels"]
    assert {(r["contender"], r["level"]) for r in rows} == {
        (n, lvl) for n in [*names, bs.ORACLE] for lvl in levels
    }
    for r in rows:
        assert "error" not in r, r
        med = {k: r[k]["median"] for k in ("throughput", "goodput", "p50_ms", "p99_ms")}
        assert 0 <= med["goodput"] <= med["throughput"]
        assert med["p50_ms"] <= med["p99_ms"]
        parts = ("completed_fraction", "failed_fraction", "unfinished_fraction")
        assert sum(r[k]["median"] for k in parts) == pytest.approx(1.0)
        assert r["mean_batch_size"]["median"] >= 1
    for r in rows:
        if r["contender"] != bs.ORACLE:
            assert r["controller"]["batches"] > 0
            assert r["controller"]["samples"] > 0
            # dispatches counted in the window vs batches finished in it: the ones in flight
            # at its two ends (one slot each) may differ
            reasons = r["controller"]["dispatch_reasons"]
            assert abs(sum(reasons.values()) - r["controller"]["batches"]) <= 2
            if r["contender"] in bs.CONTROLLED:
                assert r["controller"]["policy"] == "LatencyTarget"
            else:
                assert r["controller"]["policy"] == "MaxSizeOrWait"
                assert set(reasons) <= {"full", "max_wait"}
        if r["contender"] in bs.CONTROLLED:
            assert r["controller"]["model"] is not None
            assert 1 <= r["controller"]["cap"] <= 64
        if r["contender"] == bs.LT:
            assert r["failed_fraction"]["median"] == 0  # no deadline: nothing fails
    for level in levels:
        (oracle,) = [r for r in rows if r["contender"] == bs.ORACLE and r["level"] == level]
        cells = [r for r in rows if r["contender"] in wl["grid"] and r["level"] == level]
        best = max(c["goodput"]["median"] for c in cells)
        assert oracle["chosen"] in wl["grid"]
        assert oracle["goodput"]["median"] >= 0.98 * best
    kinds = {r["kind"] for r in res["idle"]}
    assert kinds == {"latency_target", "max_wait=0", "max_wait=5ms (default)"}
    for r in res["idle"]:
        assert r["direct_p50_ms"]["median"] > 0
    for name in ("sched-p99", "sched-goodput", "sched-controller"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


@pytest.mark.timeout(300)
def test_http_bench_runs_at_tiny_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench_http at tiny sizes, over real sockets: each mode's server starts, answers every
    request with a 384-wide embedding, reports its batches from /metrics, and stops cleanly on
    SIGTERM; the last line is each batched mode's ratio to the unbatched one."""
    import re
    import signal

    from bench import bench_http

    out = tmp_path / "http.json"
    bench_http.main(
        ["--quick", "--quiet", "--clients", "4", "--seconds", "0.5", "--warmup", "0",
         "--json", str(out)]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"wrote .*http\.json \(\d+ s\)", lines[-1]), lines[-1]
    pattern = r"÷ unbatched \(requests/s\): batched \d+\.\d\d, batched-padded \d+\.\d\d"
    assert re.fullmatch(pattern, lines[-2]), lines[-2]
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["rows"]] == list(bench_http.MODES)
    for r in res["rows"]:
        assert r["requests"] > 0
        assert r["errors"] == {}
        assert r["embedding_dim"] == 384
        assert r["server_exit_codes"] == [-signal.SIGTERM]  # uvicorn re-raises what it caught
        assert r["clean_shutdowns"] == [True]
        assert 0 < r["p50_ms"]["median"] <= r["p99_ms"]["median"]
        assert r["mean_batch_size"]["median"] >= 1
    (unbatched,) = [r for r in res["rows"] if r["mode"] == "unbatched"]
    assert unbatched["mean_batch_size"]["median"] == 1
    table = bench_http.render_markdown(res)
    assert "| batched-padded | 4 |" in table
