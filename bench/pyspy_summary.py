"""Summarise a ``py-spy record -f raw`` profile of the event-loop thread by function and by line.

    .venv/bin/py-spy record -r 2000 -f raw -o /tmp/spy.txt -- \\
        .venv/bin/python -m bench.bench_overhead --contenders batchio --loops asyncio --fn sync \\
        --repeats 1 --requests 600000 --quiet --json /tmp/spy.json
    .venv/bin/python -m bench.pyspy_summary /tmp/spy.txt

Only stacks under ``run_forever`` (the loop thread) count; shares are of those samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

__all__ = ["main", "summarize"]

_FRAME = re.compile(r"(.*) \((.*?):(\d+)\)")


def summarize(path: Path, top: int = 20) -> str:
    """Self time by function, inclusive time of batchio functions, self time by batchio line."""
    self_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        frames = stack.split(";")
        if not any("run_forever" in f for f in frames):
            continue
        n = int(count)
        total += n
        parsed = []
        for f in frames:
            m = _FRAME.match(f)
            parsed.append(
                (m.group(1), m.group(2).rsplit("/", 1)[-1], m.group(3)) if m else (f, "", "")
            )
        fn, file, line = parsed[-1]
        self_fn[f"{fn} ({file})"] += n
        self_line[f"{file}:{line} {fn}"] += n
        for name in {f"{a} ({b})" for a, b, _ in parsed}:
            incl[name] += n
    if not total:
        return "no event-loop samples"
    out = [f"loop-thread samples: {total}", "-- self, by function"]
    out += [f"{100 * c / total:5.1f}% {f}" for f, c in self_fn.most_common(top)]
    out.append("-- inclusive, batchio")
    out += [
        f"{100 * c / total:5.1f}% {f}"
        for f, c in incl.most_common()
        if f.endswith(("(_batcher.py)", "(_queue.py)", "(_worker.py)")) and c / total >= 0.005
    ]
    out.append("-- self, by batchio line")
    out += [
        f"{100 * c / total:5.1f}% {f}"
        for f, c in self_line.most_common()
        if f.startswith(("_batcher.py", "_queue.py", "_worker.py")) and c / total >= 0.01
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=20)
    a = p.parse_args(argv)
    print(summarize(a.profile, a.top))


if __name__ == "__main__":
    main()
