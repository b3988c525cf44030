"""Issue 10: the FastAPI example under load, over real sockets, with and without batching.

For each mode the bench starts ``examples/fastapi_app.py`` under uvicorn in a subprocess on
127.0.0.1 (a free port), waits for ``/health``, and runs a closed loop: ``--clients`` clients
(one keep-alive connection each, see :class:`LoadConnection`), each posting one sentence to
``/embed`` and sending the next as soon as the answer comes, for ``--warmup`` seconds (not
measured) and then ``--seconds`` seconds (measured; the requests still in flight at the end are
waited for and counted). Then it stops the server with
SIGTERM (uvicorn's graceful shutdown, then the lifespan's drain) and checks it exited cleanly.

* ``batched``: the example as served (``BATCHIO_BATCHING=1``: ``max_batch_size`` 64, ``max_wait``
  5 ms, and the embedder's token budget: on a CPU 256 padded tokens, each batch sorted by length
  and run in micro-batches under it; ``--max-batch-tokens N`` sets another);
* ``batched-padded``: the same with ``BATCHIO_MAX_BATCH_TOKENS=none``: one forward pass per batch,
  in arrival order, padded to its longest text (the embedder's CPU default before issue 10);
* ``unbatched``: the same app, model, torch threads and limits with ``BATCHIO_BATCHING=0``: the
  model runs once per request (``max_batch_size=1``).

Reported per mode: requests/s, p50/p99 latency (client side, over loopback), errors by kind, and
the mean batch size from the server's own ``/metrics`` (``batchio_rows_total`` over
``batchio_batches_total`` across the measured window, drain included). The sentences are the
suite's seeded corpus (``bench/_corpus.py``).

    .venv/bin/python -m bench.bench_http                             # 64 clients, 20 s a side
    .venv/bin/python -m bench.bench_http --quick                     # 16 clients, 3 s a side
    .venv/bin/python -m bench.bench_http --report bench/results/http.json   # Markdown table

Only loopback addresses; bounded in clients, time and requests. Writes
``bench/results/http.json`` (``http-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ._corpus import corpus
from ._harness import (
    ROOT,
    machine_info,
    percentile,
    print_table,
    run_on_loop,
    summarize,
    write_json,
)
from .report import md_range, md_table

__all__ = ["MODES", "main", "render_markdown", "run_http", "scrape_batches"]

MODES = ("batched", "batched-padded", "unbatched")
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 180.0  # seconds for the model to load on a busy 2-core machine
STOP_TIMEOUT = 60.0


def free_port() -> int:
    """A port nobody listens on now (the OS's pick for port 0) on the loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) of process ``pid`` (this one by default); ``None`` off Linux."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_batches(text: str) -> tuple[float, float]:
    """``(rows, batches)`` summed over the batchers of a ``/metrics`` text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    rows = batches = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "batchio_rows_total":
                rows += sample.value
            elif sample.name == "batchio_batches_total":
                batches += sample.value
    return rows, batches


def start_server(
    mode: str, port: int, a: argparse.Namespace, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """uvicorn serving the example in a subprocess, configured through its environment; its
    log (uvicorn's lifecycle lines, no access log) goes to ``log``."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "BATCHIO_BATCHING": "0" if mode == "unbatched" else "1",
        "BATCHIO_MAX_BATCH_TOKENS": (
            "none" if mode == "batched-padded" else str(a.max_batch_tokens or "auto")
        ),
        "BATCHIO_MAX_BATCH_SIZE": str(a.max_batch_size),
        "BATCHIO_MAX_WAIT": str(a.max_wait),
        "BATCHIO_TORCH_THREADS": str(a.torch_threads),
        # Room for every client: this bench measures throughput, not load shedding.
        "BATCHIO_MAX_QUEUE_SIZE": str(max(1024, 2 * a.clients)),
        "BATCHIO_REQUEST_TIMEOUT": "none",
    }
    if a.model:
        env["BATCHIO_MODEL"] = a.model
    env.update(a.server_env)
    cmd = [
        sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", HOST,
        "--port", str(port), "--log-level", "info", "--no-access-log",
        "--timeout-graceful-shutdown", str(int(STOP_TIMEOUT / 2)),
        # Longer than any stall of a client on a busy box: a keep-alive connection closed by the
        # server just as the client reuses it would count as an error of the service.
        "--timeout-keep-alive", "60",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (graceful shutdown: in-flight requests answered, then the batcher drained).

    Returns the exit status: ``-SIGTERM`` after a clean shutdown too, since uvicorn re-raises
    the signal it caught once it has shut down.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError("the server did not stop within its graceful shutdown") from None


async def wait_ready(client: Any, proc: subprocess.Popen[bytes]) -> None:
    """Poll ``/health`` until it answers 200: the one poll, while the server starts."""
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the server was not ready after {STARTUP_TIMEOUT:.0f} s")


class LoadConnection:
    """One keep-alive HTTP/1.1 connection of the load generator: one request at a time.

    The load must cost the box little, since it shares two cores with the server: httpx spends
    about 5 ms of CPU per request at 64 connections here (its own closed loop against
    ``/health`` tops out near 200 requests/s with the client at 100 % of a core), which would
    measure the client. This writes a prebuilt request and reads the response by its
    ``Content-Length`` (uvicorn sends one for every JSON response), for tens of microseconds.
    Anything unexpected (a reset, a close, a response without a length) raises, and the next
    request reconnects. httpx still does the readiness check, the scrapes and the answer check.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request(text: str) -> bytes:
        """The bytes of ``POST /embed`` with ``{"text": text}``."""
        body = json.dumps({"text": text}).encode()
        head = (
            f"POST /embed HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one prebuilt request; its status and body."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = close = None
            for line in head.lower().split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
                elif line.startswith(b"connection:") and b"close" in line:
                    close = True
            if length is None:
                raise ConnectionError("a response without content-length")
            body = await reader.readexactly(length)
        except BaseException:
            await self.close()
            raise
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        """Close the connection (the next :meth:`send` opens another)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def closed_loop_http(
    conns: Sequence[LoadConnection],
    requests: Sequence[bytes],
    *,
    seconds: float,
    record: bool,
) -> dict[str, Any]:
    """One client per connection, each posting to ``/embed`` back to back for ``seconds``
    (sentence ``k, k + clients, ...``); then the requests still in flight are waited for.

    Returns the completed count, the window (first send to last answer), latencies and errors.
    """
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    perf = time.perf_counter
    start = perf()
    end = start + seconds
    last = [start]
    clients = len(conns)

    async def one_client(k: int) -> None:
        conn, j = conns[k], k
        while perf() < end:
            t0 = perf()
            try:
                status, _body = await conn.send(requests[j % len(requests)])
            except Exception as exc:  # a failed request is a result here, not a crash
                errors[type(exc).__name__] += 1
            else:
                if status != 200:
                    errors[f"HTTP {status}"] += 1
                elif record:
                    latencies.append(perf() - t0)
            last[0] = max(last[0], perf())
            j += clients

    await asyncio.gather(*(one_client(k) for k in range(clients)))
    return {
        "completed": len(latencies),
        "elapsed": last[0] - start,
        "latencies": latencies,
        "errors": dict(errors),
    }


def run_one(mode: str, a: argparse.Namespace, texts: Sequence[str]) -> dict[str, Any]:
    """Serve the example in ``mode``, load it, and stop it; the row of this run."""
    import httpx

    port = free_port()

    async def load(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=120.0) as client:
            await wait_ready(client, proc)
            check = await client.post("/embed", json={"text": texts[0]})
            check.raise_for_status()
            dim = len(check.json()["embedding"])
            conns = [LoadConnection(port) for _ in range(a.clients)]
            requests = [LoadConnection.request(t) for t in texts]
            try:
                if a.warmup > 0:
                    await closed_loop_http(conns, requests, seconds=a.warmup, record=False)
                rows0, batches0 = scrape_batches((await client.get("/metrics")).text)
                cpu0 = cpu_seconds(proc.pid), cpu_seconds()
                res = await closed_loop_http(conns, requests, seconds=a.seconds, record=True)
                cpu1 = cpu_seconds(proc.pid), cpu_seconds()
                rows1, batches1 = scrape_batches((await client.get("/metrics")).text)
            finally:
                for conn in conns:
                    await conn.close()
        res["dim"] = dim
        res["rows"] = rows1 - rows0
        res["batches"] = batches1 - batches0
        # Cores busy over the window: on a shared 2-core box, who had the CPU.
        for i, who in enumerate(("server", "client")):
            before, after = cpu0[i], cpu1[i]
            res[f"{who}_cores"] = (
                (after - before) / res["elapsed"] if before is not None and after is not None
                else None
            )  # fmt: skip
        return res

    t_start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = start_server(mode, port, a, log)
        try:
            res = run_on_loop("asyncio", lambda: load(proc))
        finally:
            exit_code = stop_server(proc)
            log.seek(0)
            server_log = log.read().decode(errors="replace").splitlines()
    lat = res.pop("latencies")
    return {
        "mode": mode,
        "clients": a.clients,
        "seconds": a.seconds,
        "requests": res["completed"],
        "elapsed_s": res["elapsed"],
        "requests_per_s": res["completed"] / res["elapsed"],
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "mean_batch_size": res["rows"] / res["batches"] if res["batches"] else 0.0,
        "batches": res["batches"],
        "errors": res["errors"],
        "embedding_dim": res["dim"],
        "server_cores": res["server_cores"],
        "client_cores": res["client_cores"],
        "server_exit_code": exit_code,
        # uvicorn's last lines after SIGTERM: the lifespan (and so the batcher's drain) ended
        "clean_shutdown": "Application shutdown complete." in " ".join(server_log[-3:]),
        "server_log_tail": server_log[-5:],
        "wall_s": time.perf_counter() - t_start,
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: runs[0][k] for k in ("mode", "clients", "seconds", "embedding_dim")}
    for key in ("requests_per_s", "p50_ms", "p99_ms", "mean_batch_size"):
        out[key] = summarize([r[key] for r in runs])
    for key in ("server_cores", "client_cores"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = summarize(values) if values else None
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum((Counter(r["errors"]) for r in runs), Counter())
    out["server_exit_codes"] = [r["server_exit_code"] for r in runs]
    out["clean_shutdowns"] = [r["clean_shutdown"] for r in runs]
    out["runs"] = runs
    return out


def run_http(a: argparse.Namespace) -> dict[str, Any]:
    """Every mode, ``repeats`` times, interleaved (so drift hits both alike); the results."""
    texts = corpus(a.corpus_size)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    info = machine_info()
    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(a.repeats):
        for mode in modes:
            if not a.quiet:
                print(f"[repeat {r + 1}/{a.repeats}] {mode}: {a.clients} clients, "
                      f"{a.warmup:g} s warm-up + {a.seconds:g} s", flush=True)  # fmt: skip
            runs[mode].append(run_one(mode, a, texts))
    info["loadavg_at_end"] = os.getloadavg()
    rows = [_merge(runs[m]) for m in modes]
    by = {r["mode"]: r for r in rows}
    ratios = {}
    if "unbatched" in by:
        base = by["unbatched"]["requests_per_s"]["median"]
        for mode in modes:
            if mode != "unbatched" and base > 0:
                ratios[mode] = by[mode]["requests_per_s"]["median"] / base
    return {
        "benchmark": "http",
        "machine": info,
        "mode": "quick" if a.quick else "full",
        "config": {
            "clients": a.clients,
            "seconds": a.seconds,
            "warmup_s": a.warmup,
            "repeats": a.repeats,
            "max_batch_size": a.max_batch_size,
            "max_wait": a.max_wait,
            "torch_threads": a.torch_threads,
            "corpus_size": a.corpus_size,
            "model": a.model or "packaged all-MiniLM-L6-v2",
            "server": "uvicorn examples.fastapi_app:app (subprocess, 127.0.0.1)",
        },
        "rows": rows,
        "over_unbatched": ratios,
        "wall_s": time.perf_counter() - t0,
    }


HEADERS = [
    "mode", "clients", "requests/s", "p50 ms", "p99 ms", "mean batch", "server cores",
    "client cores", "errors",
]  # fmt: skip


def _cells(r: dict[str, Any], fmt: Any) -> list[str]:
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
    return [
        r["mode"], str(r["clients"]), fmt(r["requests_per_s"], ",.1f"), fmt(r["p50_ms"], ",.0f"),
        fmt(r["p99_ms"], ",.0f"), fmt(r["mean_batch_size"], ".1f"),
        *[fmt(r[k], ".2f") if r.get(k) else "n/a" for k in ("server_cores", "client_cores")],
        errors,
    ]  # fmt: skip


def render_markdown(results: dict[str, Any]) -> str:
    """The table of ``docs/benchmarks.md`` section 8, from a results file."""
    m = results["machine"]
    c = results["config"]
    head = (
        f"*{m['cpu']} x{m['cpus']}, {m['platform']}, Python {m['python']}, batchio commit "
        f"{m.get('git_commit')}, torch threads {c['torch_threads']}, load avg "
        f"{'/'.join(f'{x:.2f}' for x in m['loadavg_at_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in m.get('loadavg_at_end', []))} at end; "
        f"{c['clients']} clients, {c['warmup_s']:g} s warm-up + {c['seconds']:g} s measured per "
        f"run, {c['repeats']} repeat(s); run at {m['time_utc']}.*"
    )
    table = md_table(HEADERS, [_cells(r, md_range) for r in results["rows"]], left=1)
    return f"{head}\n\n{table}\n\n{_ratio_line(results, markdown=True)}\n"


def _ratio_line(results: dict[str, Any], *, markdown: bool = False) -> str:
    ratios = results["over_unbatched"]
    if not ratios:
        return "÷ unbatched: n/a"
    form = "**{:.2f}**" if markdown else "{:.2f}"
    return "÷ unbatched (requests/s): " + ", ".join(
        f"{mode} {form.format(r)}" for mode, r in ratios.items()
    )


def print_results(results: dict[str, Any]) -> None:
    """The table on the terminal, then the ratio as the last line."""

    def median(s: dict[str, Any], spec: str) -> str:
        return format(s["median"], spec)

    print_table("HTTP under load", HEADERS, [_cells(r, median) for r in results["rows"]])
    print(_ratio_line(results))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m bench.bench_http --help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="16 clients, 1 s warm-up + 3 s per mode (unless given)")  # fmt: skip
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 64)")
    p.add_argument("--seconds", type=float, default=None,
                   help="measured seconds per run (default 20)")  # fmt: skip
    p.add_argument("--warmup", type=float, default=None,
                   help="unmeasured seconds of the same load first (default 5)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait", type=float, default=0.005)
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="the batched mode's padded-token budget (default: the embedder's)"
                   )  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=1,
                   help="the server's torch threads, the same in both modes (0: torch's default)"
                   )  # fmt: skip
    p.add_argument("--model", default=None, help="local model dir (default: packaged MiniLM)")
    p.add_argument("--corpus-size", type=int, default=2048)
    p.add_argument("--env", dest="server_env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every server (BATCHIO_LATENCY_TARGET=0.1, "
                   "say); repeatable")  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", type=Path, default=None,
                   help="print the Markdown table of a results file and exit")  # fmt: skip
    a = p.parse_args(argv)
    try:
        a.server_env = dict(kv.split("=", 1) for kv in a.server_env)
    except ValueError:
        p.error("--env takes NAME=VALUE")
    if a.report is not None:
        print(render_markdown(json.loads(a.report.read_text())), end="")
        return
    defaults = (16, 3.0, 1.0) if a.quick else (64, 20.0, 5.0)
    a.clients = a.clients if a.clients is not None else defaults[0]
    a.seconds = a.seconds if a.seconds is not None else defaults[1]
    a.warmup = a.warmup if a.warmup is not None else defaults[2]
    if not (1 <= a.clients <= 1024 and 0 < a.seconds <= 600 and 0 <= a.warmup <= 600):
        p.error("bounded load only: 1-1024 clients, up to 600 s measured and 600 s warm-up")
    results = run_http(a)
    print_results(results)
    out = a.json or ROOT / (
        "bench/results/http-quick.json" if a.quick else "bench/results/http.json"
    )
    write_json(out, results)
    print(f"wrote {out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
