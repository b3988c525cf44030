"""SentenceEmbedder and BatchedPipeline on tiny random-weight models, plus one real MiniLM check.

Each batched test fills exactly one batch (max_batch_size = requests sent, max_wait an hour), so
what is compared is deterministic: batched results against one-at-a-time results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch

from batchio.integrations.torch import CollationError
from batchio.integrations.transformers import BatchedPipeline, SentenceEmbedder

from .conftest import gather

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_blocking")]

HOUR = 3600.0


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def reference_embedding(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
    """Mean pooling + L2 norm of one unpadded text, computed here without batchio."""
    enc = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_batch_tokens", [None, 150])
async def test_batched_embeddings_equal_one_at_a_time(
    tiny_bert: Any,
    tokenizer: Any,
    texts: list[str],
    side: Any,
    max_batch_tokens: int | None,
    staged: bool,
) -> None:
    """Texts of 1 to 120 words, batched (and micro-batched), embed as they do alone: < 1e-4,
    through the staged batcher and the plain one."""
    embedder = SentenceEmbedder(
        tiny_bert,
        tokenizer,
        staged=staged,
        padding_side=side,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=len(texts),
        max_wait=HOUR,
    )
    async with embedder:
        batched = await gather(*(embedder(t) for t in texts))
        stats = embedder.statistics()
    assert stats.batches == 1
    one_at_a_time = [embedder.embed_batch([t])[0] for t in texts]
    independent = [reference_embedding(tiny_bert, tokenizer, t) for t in texts]
    assert max_abs_diff(batched, one_at_a_time) < 1e-4
    assert max_abs_diff(batched, independent) < 1e-4
    assert all(e.shape == (32,) and e.dtype == torch.float32 for e in batched)
    assert all(abs(float(e.norm()) - 1.0) < 1e-5 for e in batched)


async def test_map_and_unnormalized(tiny_bert: Any, tokenizer: Any, texts: list[str]) -> None:
    async with SentenceEmbedder(tiny_bert, tokenizer, normalize=False, max_wait=0) as embedder:
        vectors = await embedder.map(texts[:3])
    assert len(vectors) == 3
    assert any(abs(float(v.norm()) - 1.0) > 1e-3 for v in vectors)


async def test_max_length_truncates(tiny_bert: Any, tokenizer: Any, texts: list[str]) -> None:
    """Texts longer than max_length embed as their first max_length tokens."""
    long_text = texts[1]
    embedder = SentenceEmbedder(tiny_bert, tokenizer, max_length=8)
    truncated = tokenizer.decode(tokenizer(long_text)["input_ids"][1:7])
    got = embedder.embed_batch([long_text])[0]
    assert float((got - reference_embedding(tiny_bert, tokenizer, truncated)).abs().max()) < 1e-4


async def test_non_string_fails_alone(tiny_bert: Any, tokenizer: Any) -> None:
    async with SentenceEmbedder(tiny_bert, tokenizer, max_batch_size=3, max_wait=HOUR) as e:
        good, bad, other = await gather(e("the fox"), e(42), e("a dog"))  # type: ignore[arg-type]
    assert isinstance(bad, CollationError)
    assert "expected a str, got int" in str(bad)
    assert isinstance(good, torch.Tensor)
    assert isinstance(other, torch.Tensor)


def test_loaded_model_needs_its_tokenizer(tiny_bert: Any) -> None:
    with pytest.raises(TypeError, match="tokenizer"):
        SentenceEmbedder(tiny_bert)


async def test_pipeline_batched_equals_single(
    tiny_classifier: Any, tokenizer: Any, texts: list[str]
) -> None:
    """Concurrent text-classification calls share one pipeline call and match single calls."""
    pipe = transformers.pipeline(
        "text-classification", model=tiny_classifier, tokenizer=tokenizer, device="cpu"
    )
    async with BatchedPipeline(pipe, top_k=None, max_batch_size=len(texts), max_wait=HOUR) as clf:
        batched = await gather(*(clf(t) for t in texts))
        stats = clf.statistics()
    assert stats.batches == 1
    for text, got in zip(texts, batched, strict=True):
        alone = {d["label"]: d["score"] for d in pipe(text, top_k=None)}
        assert {d["label"] for d in got} == {"LABEL_0", "LABEL_1", "LABEL_2"}
        assert max(abs(d["score"] - alone[d["label"]]) for d in got) < 1e-4


async def test_pipeline_bad_input_fails_alone(tiny_classifier: Any, tokenizer: Any) -> None:
    """A batch that fails is re-run in halves, so only the bad input's request fails."""
    pipe = transformers.pipeline(
        "text-classification", model=tiny_classifier, tokenizer=tokenizer, device="cpu"
    )
    async with BatchedPipeline(pipe, max_batch_size=4, max_wait=HOUR) as clf:
        results = await gather(clf("the fox"), clf(None), clf.map(["a dog", "a cat"]))
    assert isinstance(results[1], ValueError)  # the tokenizer's own error, for None
    # Each result is what the pipeline yields for that input in a list call: here, a dict.
    assert results[0]["label"].startswith("LABEL_")
    assert [r["label"] for r in results[2]] == [
        pipe("a dog")[0]["label"],
        pipe("a cat")[0]["label"],
    ]


async def test_real_minilm_matches_sentence_transformers(minilm_path: Path) -> None:
    """The packaged all-MiniLM-L6-v2, batched, gives sentence-transformers' own embeddings."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome and everybody in the theatre applauded at the end.",
        "Stock markets fell sharply today.",
    ]
    # Loading reads files: off the event loop, as an application should do it too.
    embedder = await anyio.to_thread.run_sync(
        lambda: SentenceEmbedder(
            minilm_path, padding_side="left", max_batch_size=len(texts), max_wait=HOUR
        )
    )
    async with embedder:
        batched = await gather(*(embedder(t) for t in texts))

    def encode_with_sentence_transformers() -> Any:
        model = sentence_transformers.SentenceTransformer(str(minilm_path), device="cpu")
        return model.encode(texts, convert_to_tensor=True, batch_size=1)

    reference = await anyio.to_thread.run_sync(encode_with_sentence_transformers)
    assert max_abs_diff(batched, list(reference)) < 1e-4
    similar = float(batched[0] @ batched[1])
    unrelated = float(batched[0] @ batched[3])
    assert similar > unrelated


async def test_wrappers_share_the_batcher_options_and_take_a_per_call_timeout(
    tiny_bert: Any, tiny_classifier: Any, tokenizer: Any
) -> None:
    """Every batcher option is accepted and validated the same way as on Batcher; the calls take
    ``timeout=`` with its one meaning."""
    import batchio

    with pytest.raises(TypeError, match="max_batch_size must be an int"):
        SentenceEmbedder(tiny_bert, tokenizer, max_batch_size=2.5)  # type: ignore[arg-type]
    pipe = transformers.pipeline(
        "text-classification", model=tiny_classifier, tokenizer=tokenizer, device="cpu"
    )
    with pytest.raises(ValueError, match="max_wait"):
        BatchedPipeline(pipe, max_wait=-1)
    clf = BatchedPipeline(pipe, top_k=None, batch_time_limit=60.0)
    assert clf.call_kwargs == {"top_k": None}
    opts = clf.batcher.options
    assert (opts.batch_time_limit, opts.isolate_errors) == (60.0, True)  # its own default kept
    assert clf.batcher.name == "pipeline:text-classification"
    shared = batchio.BatcherOptions(max_batch_size=3, timeout=30.0)
    async with SentenceEmbedder(tiny_bert, tokenizer, options=shared, max_wait=0) as e:
        assert e.batcher.options == shared.replace(max_wait=0)
        one = await e("the fox", timeout=None)
        many = await e.map(["a dog", "a cat"], timeout=5.0)
        with pytest.raises(ValueError, match="timeout"):
            await e("x", timeout=0)
    assert one.shape == many[0].shape


@pytest.mark.parametrize("staged", [True, False])
def test_on_the_cpu_the_embedder_runs_under_a_token_budget_by_default(
    tiny_bert: Any, tokenizer: Any, staged: bool
) -> None:
    """Length-sorted micro-batches under 256 padded tokens about double a CPU's throughput
    (docs/benchmarks.md sections 2 and 8): the CPU default; ``None`` turns it off."""
    from batchio.integrations.transformers import CPU_TEXT_TOKEN_BUDGET

    default = SentenceEmbedder(tiny_bert, tokenizer, staged=staged)
    assert default.embed_batch.forward.max_batch_tokens == CPU_TEXT_TOKEN_BUDGET == 256
    if staged:
        assert default.staged_forward is not None
        assert default.staged_forward.max_batch_tokens == 256
    off = SentenceEmbedder(tiny_bert, tokenizer, staged=staged, max_batch_tokens=None)
    assert off.embed_batch.forward.max_batch_tokens is None
