"""Review of the staged BatchedPipeline (``PipelineStages``): the defect it pinned is fixed.

Two stagings of one pipeline took turns at its tokenizer only within each staging; the lock is
now shared by every staging of the pipeline (keyed by its tokenizer).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from batchio.integrations.transformers import PipelineStages

from .test_pipeline_staged import build

GATE_SECONDS = 60.0  # only a guard against a hang
OVERLAP_SECONDS = 2.0  # how long the probe may take to get in; it never may while the gate holds


def test_two_stagings_of_one_pipe_never_tokenize_at_once(tokenizer: Any) -> None:
    pipe = build("text-classification", tokenizer)
    first = PipelineStages(pipe, {})
    second = PipelineStages(pipe, {"top_k": None})
    inside, gate, probe_in = threading.Event(), threading.Event(), threading.Event()
    preprocess = pipe.preprocess

    def gated(item: Any, **params: Any) -> Any:
        if item == "hold":
            inside.set()
            gate.wait(GATE_SECONDS)
        elif item == "probe":
            probe_in.set()
        return preprocess(item, **params)

    pipe.preprocess = gated
    holder = threading.Thread(target=first.prepare, args=(["hold"],))
    prober = threading.Thread(target=second.prepare, args=(["probe"],))
    holder.start()
    try:
        assert inside.wait(GATE_SECONDS)
        prober.start()
        # With one lock per tokenizer the probe cannot get in while "hold" is inside preprocess.
        overlapped = probe_in.wait(OVERLAP_SECONDS)
    finally:
        gate.set()
        holder.join(GATE_SECONDS)
        if prober.is_alive() or prober.ident is not None:
            prober.join(GATE_SECONDS)
    assert not overlapped, "two preprocess calls ran on the tokenizer at once"
