"""The OpenTelemetry SDK harness of the integration tests: in-memory exporter and reader."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, Tracer

from batchio import Batcher
from batchio.integrations.otel import instrument


class Otel:
    """An SDK tracer provider (in-memory exporter) and meter provider (in-memory reader)."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer: Tracer = self.tracer_provider.get_tracer("tests")

    def instrument(self, batcher: Batcher[Any, Any], **kwargs: Any) -> Any:
        return instrument(
            batcher,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **kwargs,
        )

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def points(self) -> dict[str, list[Any]]:
        """Every metric's data points, by instrument name, from one collection."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            m.name: list(m.data.data_points)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }

    async def call(self, batcher: Batcher[int, int], x: int) -> tuple[Any, SpanContext]:
        """``batcher(x)`` inside a span of its own (the caller's request span)."""
        with self.tracer.start_as_current_span(f"request {x}") as span:
            try:
                result: Any = await batcher(x)
            except Exception as exc:
                result = exc
            return result, span.get_span_context()
