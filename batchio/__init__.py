"""batchio: asyncio-native dynamic batching.

``await batcher(item)`` for one input; concurrent calls are grouped into batches, run through your
function together (on a worker thread for a sync function), and each caller gets its own result.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from ._batcher import AsyncBatchFn as AsyncBatchFn
from ._batcher import Batcher as Batcher
from ._batcher import SyncBatchFn as SyncBatchFn
from ._decorator import BatchedFunction as BatchedFunction
from ._decorator import BatchedMethod as BatchedMethod
from ._decorator import batch as batch
from ._devexec import DeviceExecutor as DeviceExecutor
from ._devexec import Share as Share
from ._estimates import RunTimeModel as RunTimeModel
from ._estimates import SizeUnit as SizeUnit
from ._exceptions import BatcherBrokenError as BatcherBrokenError
from ._exceptions import BatcherClosedError as BatcherClosedError
from ._exceptions import BatcherLoopError as BatcherLoopError
from ._exceptions import BatchFunctionError as BatchFunctionError
from ._exceptions import BatchioError as BatchioError
from ._exceptions import BatchOutputError as BatchOutputError
from ._exceptions import BatchSizeMismatchError as BatchSizeMismatchError
from ._exceptions import BatchStalledError as BatchStalledError
from ._exceptions import DeviceClosedError as DeviceClosedError
from ._exceptions import QueueFullError as QueueFullError
from ._exceptions import RequestShedError as RequestShedError
from ._exceptions import RequestTimeoutError as RequestTimeoutError
from ._observe import BatchObserver as BatchObserver
from ._observe import BatchRecord as BatchRecord
from ._observe import live_batchers as live_batchers
from ._options import DEFAULT as DEFAULT
from ._options import BatcherOptions as BatcherOptions
from ._options import BatcherOptionsKw as BatcherOptionsKw
from ._options import DefaultTimeout as DefaultTimeout
from ._options import ReconfigureKw as ReconfigureKw
from ._options import TimeoutArg as TimeoutArg
from ._options import WhenFull as WhenFull
from ._policy import BatchPolicy as BatchPolicy
from ._policy import Dispatch as Dispatch
from ._policy import LatencyTarget as LatencyTarget
from ._policy import MaxSizeOrWait as MaxSizeOrWait
from ._policy import Plan as Plan
from ._policy import QueueState as QueueState
from ._policy import Wait as Wait
from ._stages import Stages as Stages
from ._stats import TIME_BUCKETS as TIME_BUCKETS
from ._stats import BatcherStatistics as BatcherStatistics
from ._stats import Histogram as Histogram
from ._stats import Percentiles as Percentiles
from ._stats import SchedulerStatistics as SchedulerStatistics
from ._stats import StageStatistics as StageStatistics
from ._thread import BatcherThread as BatcherThread

try:
    __version__ = _version("batchio")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = (
    "DEFAULT",
    "TIME_BUCKETS",
    "AsyncBatchFn",
    "BatchFunctionError",
    "BatchObserver",
    "BatchOutputError",
    "BatchPolicy",
    "BatchRecord",
    "BatchSizeMismatchError",
    "BatchStalledError",
    "BatchedFunction",
    "BatchedMethod",
    "Batcher",
    "BatcherBrokenError",
    "BatcherClosedError",
    "BatcherLoopError",
    "BatcherOptions",
    "BatcherOptionsKw",
    "BatcherStatistics",
    "BatcherThread",
    "BatchioError",
    "DefaultTimeout",
    "DeviceClosedError",
    "DeviceExecutor",
    "Dispatch",
    "Histogram",
    "LatencyTarget",
    "MaxSizeOrWait",
    "Percentiles",
    "Plan",
    "QueueFullError",
    "QueueState",
    "ReconfigureKw",
    "RequestShedError",
    "RequestTimeoutError",
    "RunTimeModel",
    "SchedulerStatistics",
    "Share",
    "SizeUnit",
    "StageStatistics",
    "Stages",
    "SyncBatchFn",
    "TimeoutArg",
    "Wait",
    "WhenFull",
    "__version__",
    "batch",
    "live_batchers",
)

# Reprs and tracebacks say batchio.Batcher, not batchio._batcher.Batcher.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("batchio._"):
        try:
            _obj.__module__ = "batchio"
        except (AttributeError, TypeError):  # pragma: no cover - aliases that refuse it
            pass
del _name, _obj
