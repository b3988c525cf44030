"""BatchedModule: a real (tiny) model behind a Batcher, driven by concurrent async callers.

Every test fills exactly one batch (max_batch_size = the number of rows sent, max_wait an hour),
so batching is deterministic without sleeps.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytest.importorskip("torch")

import torch

from batchio.integrations.torch import BatchedModule, CollationError

from .conftest import gather

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_blocking")]

HOUR = 3600.0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def token_rows(tokenizer: Any, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.tensor(v) for k, v in tokenizer(t).items()} for t in texts]


@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
async def test_concurrent_rows_match_one_at_a_time(
    tiny_bert: Any, tokenizer: Any, texts: list[str], side: Any, staged: bool
) -> None:
    """Rows of very different lengths, batched together, get what each gets alone (< 1e-4),
    through the staged batcher and the plain one."""
    rows = token_rows(tokenizer, texts)
    async with BatchedModule(
        tiny_bert,
        staged=staged,
        padding_side=side,
        position_ids="position_ids",  # BERT's absolute positions must not shift under left padding
        strip_padding={"last_hidden_state"},
        max_batch_size=len(rows),
        max_wait=HOUR,
    ) as m:
        outs = await gather(*(m(r) for r in rows))
        stats = m.statistics()
    assert stats.batches == 1
    with torch.inference_mode():
        alone = [tiny_bert(**{k: v[None] for k, v in r.items()}) for r in rows]
    for out, ref, row in zip(outs, alone, rows, strict=True):
        assert out.last_hidden_state.shape == (len(row["input_ids"]), 32)
        assert float((out.last_hidden_state - ref.last_hidden_state[0]).abs().max()) < 1e-4
        assert out.last_hidden_state.device.type == "cpu"
        if side == "right":
            # BERT's pooler reads position 0, which left padding fills with a pad token: a
            # property of the model, so only right padding keeps pooler_output unchanged.
            assert float((out.pooler_output - ref.pooler_output[0]).abs().max()) < 1e-4


async def test_rows_count_toward_batch_and_restack() -> None:
    """A k-row request shares a batch with a single-row request and gets k rows back."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    single = torch.randn(4)
    async with BatchedModule(linear, max_batch_size=6, max_wait=HOUR) as m:
        many, one = await gather(m.rows(x), m(single))
        stats = m.statistics()
    assert (stats.batches, stats.rows) == (1, 6)
    with torch.inference_mode():
        assert torch.allclose(many, linear(x), atol=1e-6)
        assert torch.allclose(one, linear(single), atol=1e-6)
    assert many.shape == (5, 3)


async def test_rows_of_a_padded_tokenizer_batch(
    tiny_bert: Any, tokenizer: Any, texts: list[str]
) -> None:
    """A padded tokenizer batch is split into rows, trimmed, batched and re-stacked; its real
    tokens match the model run on the padded batch directly."""
    enc = tokenizer(texts[:4], padding=True, return_tensors="pt")
    async with BatchedModule(
        tiny_bert, strip_padding={"last_hidden_state"}, max_batch_size=4, max_wait=HOUR
    ) as m:
        out = await m.rows(enc)
        with pytest.raises(CollationError, match="no rows"):
            await m.rows(torch.ones(0, 3))
        many = await m.map(
            [{k: v[i] for k, v in enc.items()} for i in range(4)],
        )
    with torch.inference_mode():
        ref = tiny_bert(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    assert out.last_hidden_state.shape == ref.shape
    assert float((out.last_hidden_state[mask] - ref[mask]).abs().max()) < 1e-4
    assert not mask.all()
    assert int(torch.count_nonzero(out.last_hidden_state[~mask])) == 0  # re-padded with zeros
    assert float((many[0].last_hidden_state - out.last_hidden_state[0][mask[0]]).abs().max()) < 1e-4


async def test_model_runs_off_the_event_loop_thread() -> None:
    threads: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        threads.append(threading.get_ident())
        return x + 1

    async with BatchedModule(model, max_batch_size=2, max_wait=HOUR) as m:
        out = await gather(m(torch.zeros(1)), m(torch.ones(1)))
    assert [o.item() for o in out] == [1.0, 2.0]
    assert threads
    assert threading.get_ident() not in threads


@needs_cuda
@pytest.mark.gpu
async def test_cuda_matches_cpu(tiny_bert: Any, tokenizer: Any, texts: list[str]) -> None:
    """On CUDA (pinned inputs, the worker's own stream) results match the CPU and come back on
    the CPU by default, or stay on the device with output_device=None."""
    rows = token_rows(tokenizer, texts)
    with torch.inference_mode():
        cpu = [tiny_bert(**{k: v[None] for k, v in r.items()}).pooler_output[0] for r in rows]
    gpu_model = type(tiny_bert)(tiny_bert.config)
    gpu_model.load_state_dict(tiny_bert.state_dict())
    async with BatchedModule(
        gpu_model, device="cuda", max_batch_size=len(rows), max_wait=HOUR
    ) as m:
        outs = await gather(*(m(r) for r in rows))
    for out, ref in zip(outs, cpu, strict=True):
        assert out.pooler_output.device.type == "cpu"
        assert float((out.pooler_output - ref).abs().max()) < 1e-3
    async with BatchedModule(gpu_model, device="cuda", output_device=None, max_wait=0) as m:
        on_device = await m(rows[0])
    assert on_device.pooler_output.device.type == "cuda"
