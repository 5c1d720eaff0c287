"""Needle in a haystack: one fact hidden at a chosen depth of a long text, asked for at the end.

The grid (context length × needle depth, one heatmap) is gkamradt's LLMTest_NeedleInAHaystack; the
needle, question and answer lead-in are RULER's niah_single_2 (NVIDIA RULER,
`scripts/data/synthetic/constants.py`: "One of the special magic numbers for {key} is: {value}."), so
scoring is a plain substring match of the 7-digit value instead of gkamradt's LLM judge (as KVQuant's
and NIAH v2's exact-match scorers do). As in gkamradt's tester the needle goes at a sentence boundary
at the requested depth; as in RULER the haystack is sized with the evaluated model's own tokenizer,
chat template and generation budget included.

For one (length, sample) the haystack, key and value are the same at every depth, so a heatmap row
differs only in where the needle sits.
"""
from __future__ import annotations

from collections.abc import Iterator

from . import corpora, words
from .prompts import Sample, fit, insert_at_depths, render, rng_for, string_match_all, window

TASK = "niah"
NEEDLE = "One of the special magic numbers for {key} is: {value}."
TEMPLATE = ("A special magic number is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the number afterwards.\n{context}\n"
            "What is the special magic number for {key} mentioned in the provided text?")
LEAD_IN = " The special magic number for {key} mentioned in the provided text is"


def make_sample(tok, *, length: int, depth: float, index: int, seed: int, corpus: str = "auto",
                gen_tokens: int = 32, chat: bool | None = None) -> Sample:
    """One needle prompt of at most `length - gen_tokens` tokens with the needle at `depth` (0..1)."""
    c = corpora.get(corpus)
    sents = c.sentences()
    rng = rng_for(seed, TASK, length, index)     # no depth: every depth of a row shares the haystack
    key = words.key_pairs(1, rng)[0]
    value = str(rng.randint(1_000_000, 9_999_999))
    start = rng.randrange(len(sents))
    needle = NEEDLE.format(key=key, value=value)

    def build(n: int) -> list[int]:
        hay = insert_at_depths(window(sents, start, n), [needle], [depth])
        return render(tok, TEMPLATE.format(context=" ".join(hay), key=key), LEAD_IN.format(key=key), chat=chat)

    n, ids = fit(build, length - gen_tokens, what=f"a {length}-token needle prompt")
    return Sample(TASK, length, index, ids, [value], gen_tokens,
                  {"depth": depth, "key": key, "corpus": c.name, "haystack_sentences": n})


def samples(tok, *, lengths, depths, n: int, seed: int, corpus: str = "auto", gen_tokens: int = 32,
            chat: bool | None = None) -> Iterator[Sample]:
    """The grid in run order: length, then sample, then depth."""
    for length in lengths:
        for i in range(n):
            for d in depths:
                yield make_sample(tok, length=length, depth=d, index=i, seed=seed, corpus=corpus,
                                  gen_tokens=gen_tokens, chat=chat)


def score(pred: str, sample: Sample) -> float:
    """1.0 when the value occurs in the answer, else 0.0 (RULER's string_match_all on one value)."""
    return string_match_all(pred, sample.answers)
