"""A fixed, seeded corpus of English-like sentences of varied length (no downloads).

Words come from a small built-in list of common English words plus seeded pseudo-words (so the
tokenizer sees both whole-word and word-piece tokens). Sentence lengths follow a seeded
log-normal-ish spread between ``min_words`` and ``max_words``, so batches formed in arrival order
carry realistic padding.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["CORPUS_SEED", "corpus", "corpus_stats"]

CORPUS_SEED = 20261121

_COMMON_TEXT = """
the of and to in is was for that on as with by it at from his an were are which this be or has
had not but first one their its new after who they have her she two been other when there all
during into school time may years more most only over city some world would where later up
such used many can state about national out known university united then made team three under
while year people team season system several number part between group government each film
series since following same early high include called river region model data batch request
queue latency throughput service server network client memory language question answer search
music history water light small large north south east west energy market company research
design science power family water public local green
"""
_SYLLABLE_TEXT = "ka lo mi re tu sa ne vo pi da ral ten mor sil van dre qua zin hel obr ust"
_COMMON = tuple(_COMMON_TEXT.split())
_SYLLABLES = tuple(_SYLLABLE_TEXT.split())


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


@lru_cache(maxsize=8)
def corpus(
    n: int = 4096, *, seed: int = CORPUS_SEED, min_words: int = 3, max_words: int = 48
) -> tuple[str, ...]:
    """Return ``n`` sentences, the same for the same arguments on every machine."""
    rng = random.Random(seed)
    vocab = list(_COMMON) + _pseudo_words(rng, 400)
    weights = [8.0] * len(_COMMON) + [1.0] * 400  # common words dominate, as in real text
    out: list[str] = []
    for _ in range(n):
        k = round(rng.lognormvariate(2.2, 0.6))  # median ~9 words, long tail
        k = max(min_words, min(max_words, k))
        words = rng.choices(vocab, weights=weights, k=k)
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice(".?!."))
    return tuple(out)


def corpus_stats(sentences: Sequence[str]) -> dict[str, float]:
    """Word-count summary for the docs and the JSON results."""
    lengths = sorted(len(s.split()) for s in sentences)
    n = len(lengths)
    return {
        "sentences": n,
        "words_min": lengths[0],
        "words_median": lengths[n // 2],
        "words_p90": lengths[int(n * 0.9)],
        "words_max": lengths[-1],
        "words_mean": sum(lengths) / n,
    }
