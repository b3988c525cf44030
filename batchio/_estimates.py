"""What the executor learns online for the adaptive policy: batch run time against batch size, and
the arrival rate. Both are plain arithmetic on numbers the executor hands in (no clock, no loop), so
they are tested with made-up observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = ["RunTimeModel", "SizeUnit"]

SizeUnit: TypeAlias = Literal["rows", "cost"]
"""What a batch's size is counted in: rows, or the sum of ``batch_cost`` (padded, if asked)."""

_INF: Final = float("inf")


@dataclass(frozen=True, slots=True)
class RunTimeModel:
    """The fitted cost model: a batch of size ``x`` is predicted to take
    ``intercept + slope * x`` seconds from dispatch until its results are delivered.

    Attributes:
        intercept: seconds per batch, whatever its size (launch, transfer, Python overhead).
        slope: seconds per unit of size (a row, or a unit of ``batch_cost``).
        samples: batches observed so far.
        unit: ``"rows"``, or ``"cost"`` when the batcher has a ``batch_cost``.
    """

    intercept: float
    slope: float
    samples: int
    unit: SizeUnit = "rows"

    def predict(self, size: float) -> float:
        """Predicted seconds for a batch of ``size``."""
        if not self.slope:  # (0 * inf would be NaN: an unbounded batch of a flat cost)
            return self.intercept
        return self.intercept + self.slope * size

    def largest_within(self, seconds: float) -> float:
        """The largest size predicted to finish within ``seconds`` (``inf``: no limit seen;
        ``0.0``: not even an empty batch does)."""
        spare = seconds - self.intercept
        if spare < 0:
            return 0.0
        return _INF if self.slope <= 0 else spare / self.slope


class RunTimeLearner:
    """Exponentially weighted least squares of run time on batch size.

    Each observation's weight decays by ``decay`` per later observation (about ``1 / (1 -
    decay)`` batches remembered), so the model follows a device that speeds up or slows down.
    While the batches seen have (nearly) one size, the slope cannot be told apart from the
    intercept: the model is then proportional (intercept 0), which overestimates larger batches,
    and so errs toward smaller ones until it has seen a spread of sizes.
    """

    __slots__ = ("_model", "_samples", "_sw", "_sx", "_sxx", "_sxy", "_sy", "decay", "unit")

    def __init__(self, unit: SizeUnit = "rows", decay: float = 0.95) -> None:
        self.unit: SizeUnit = unit
        self.decay = decay
        self._sw = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._samples = 0
        self._model: RunTimeModel | None = None

    @property
    def model(self) -> RunTimeModel | None:
        """The model fitted to what was observed (refitted when read after an observation)."""
        model = self._model
        if self._samples and (model is None or model.samples != self._samples):
            model = self._model = self._fit(self._samples)
        return model

    def add(self, size: float, seconds: float) -> None:
        """Add one batch of ``size`` that took ``seconds`` (the fit waits until it is read:
        a batcher whose policy never reads it pays a few additions per batch)."""
        if not (size > 0 and math.isfinite(size) and seconds >= 0 and math.isfinite(seconds)):
            return
        d = self.decay
        self._sw = self._sw * d + 1.0
        self._sx = self._sx * d + size
        self._sy = self._sy * d + seconds
        self._sxx = self._sxx * d + size * size
        self._sxy = self._sxy * d + size * seconds
        self._samples += 1

    def observe(self, size: float, seconds: float) -> RunTimeModel | None:
        """Add one batch of ``size`` that took ``seconds``; returns the refitted model."""
        self.add(size, seconds)
        return self.model

    def _fit(self, samples: int) -> RunTimeModel:
        sw = self._sw
        mx, my = self._sx / sw, self._sy / sw
        var = self._sxx / sw - mx * mx
        if var <= (0.05 * mx) ** 2:  # one size, give or take: assume proportional
            return RunTimeModel(0.0, my / mx, samples, self.unit)
        slope = (self._sxy / sw - mx * my) / var
        intercept = my - slope * mx
        if slope < 0:  # noise: bigger batches cannot be faster
            slope, intercept = 0.0, my
        elif intercept < 0:
            slope, intercept = self._sxy / self._sxx, 0.0
        return RunTimeModel(intercept, slope, samples, self.unit)


class RateMeter:
    """An exponentially weighted arrival rate over irregular samples of a running total.

    ``rate`` follows the total's growth per second with time constant ``tau``: a burst moves it
    within a fraction of a second, and a lull decays it.
    """

    __slots__ = ("_at", "_total", "rate", "tau")

    def __init__(self, tau: float = 0.5) -> None:
        self.tau = tau
        self._at: float | None = None
        self._total = 0.0
        self.rate = 0.0

    def sample(self, now: float, total: float) -> float:
        """Note that ``total`` had arrived by ``now``; returns the current rate."""
        at = self._at
        if at is None:
            self._at, self._total = now, total
            return self.rate
        dt = now - at
        if dt <= 0:
            return self.rate
        instant = (total - self._total) / dt
        self.rate += (1.0 - math.exp(-dt / self.tau)) * (instant - self.rate)
        self._at, self._total = now, total
        return self.rate
