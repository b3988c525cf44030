"""The model wrappers schedule toward a latency target by default, take priorities per call, and
give way to a policy the user chose."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch

from batchio import BatcherOptions, MaxSizeOrWait
from batchio.integrations._wrap import DEFAULT_LATENCY_TARGET
from batchio.integrations.torch import BatchedModule
from batchio.integrations.transformers import BatchedPipeline, SentenceEmbedder

from .conftest import gather

pytestmark = pytest.mark.anyio


def test_every_wrapper_defaults_to_the_latency_target(tiny_bert: Any, tokenizer: Any) -> None:
    pipe = transformers.pipeline(
        "feature-extraction", model=tiny_bert, tokenizer=tokenizer, device="cpu"
    )
    wrappers = [
        BatchedModule(torch.nn.Linear(4, 2)),
        SentenceEmbedder(tiny_bert, tokenizer),
        BatchedPipeline(pipe),
    ]
    for w in wrappers:
        assert w.batcher.options.latency_target == DEFAULT_LATENCY_TARGET == 0.1
        assert w.statistics().scheduler.policy == "LatencyTarget"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "chosen",
    [{"max_wait": 0.002}, {"policy": MaxSizeOrWait(8, 0.0)}, {"latency_target": 0.02}],
    ids=["max_wait", "policy", "latency_target"],
)
def test_a_policy_the_user_chose_replaces_the_default(
    chosen: dict[str, Any], tiny_bert: Any, tokenizer: Any
) -> None:
    module = BatchedModule(torch.nn.Linear(4, 2), **chosen)
    embedder = SentenceEmbedder(tiny_bert, tokenizer, **chosen)
    for w in (module, embedder):
        expected = chosen.get("latency_target")
        assert w.batcher.options.latency_target == expected
    # Options given whole replace the wrapper's defaults, the latency target included.
    whole = BatchedModule(torch.nn.Linear(4, 2), options=BatcherOptions(max_wait=0.001))
    assert whole.batcher.options.latency_target is None


async def test_priorities_pass_through_the_wrappers(
    tiny_bert: Any, tokenizer: Any, texts: list[str]
) -> None:
    async with SentenceEmbedder(tiny_bert, tokenizer, max_batch_size=4) as embedder:
        plain = await gather(*(embedder(t) for t in texts[:3]))
        urgent = await gather(*(embedder(t, priority=3) for t in texts[:3]))
        mapped = await embedder.map(texts[:3], priority=-1)
        stats = embedder.statistics()
    for a, b, c in zip(plain, urgent, mapped, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    assert stats.completed == 7
    async with BatchedModule(torch.nn.Linear(4, 2), max_batch_size=4) as m:
        row = torch.ones(4)
        out = await m(row, priority=2)
        outs = await m.rows(torch.ones(3, 4), priority=1)
    assert out.shape == (2,)
    assert outs.shape == (3, 2)
