"""Shared prompt machinery for the NIAH and RULER generators: one sample, rendering, length fitting.

Length is hit the way RULER (NVIDIA, `scripts/data/synthetic/*.py`) hits it: with the evaluated
model's own tokenizer, counting the chat template and the generation budget, a haystack of `n` units
(sentences, lines, list words) is searched for the largest `n` whose prompt plus `gen_tokens` fits the
target length. Every random choice comes from a `random.Random` seeded by a string, so a sample is the
same on every machine and for every `n` tried during the search.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class Sample:
    """One prompt, ready for the model: `ids` fit in `length - gen_tokens` tokens."""
    task: str
    length: int                     # target length in tokens (prompt + generation budget)
    index: int                      # sample number within (task, length[, depth])
    ids: list[int]
    answers: list[str]              # every string the prediction should contain
    gen_tokens: int                 # generation budget (RULER's tokens_to_generate)
    meta: dict = field(default_factory=dict)


def rng_for(*parts) -> random.Random:
    """A generator seeded by the parts' text: stable across runs, machines and PYTHONHASHSEED."""
    return random.Random(":".join(str(p) for p in parts))


def render(tok, text: str, lead_in: str, *, chat: bool | None = None) -> list[int]:
    """Token ids of a task prompt. Instruct models (chat template) get `text` as the user turn and the
    answer's lead-in at the start of the assistant turn; base models get `text + lead_in` as a
    completion prompt. Both end in the lead-in, as RULER's prepare.py does (template + answer_prefix)."""
    use_chat = tok.has_chat_template if chat is None else chat
    if use_chat:
        return list(tok.chat(text)) + list(tok.encode(lead_in.lstrip(), add_special_tokens=False))
    return list(tok.encode(text + lead_in))


def fit(build: Callable[[int], list[int]], budget: int, *, lo: int = 1, what: str = "the task") -> tuple[int, list[int]]:
    """Largest n >= lo with len(build(n)) <= budget, and its ids (exponential then binary search).

    build(n) must be deterministic in n. Raises UserError when even `lo` units do not fit."""
    ids = build(lo)
    if len(ids) > budget:
        raise UserError(f"{what} needs {len(ids)} tokens even with the smallest haystack, more than the "
                        f"{budget} tokens available at this length; use a longer length")
    good, good_ids = lo, ids
    hi = lo * 2
    while True:                       # double until the prompt overshoots
        ids = build(hi)
        if len(ids) > budget:
            break
        good, good_ids, hi = hi, ids, hi * 2
    while hi - good > 1:              # invariant: build(good) fits, build(hi) does not
        mid = (good + hi) // 2
        ids = build(mid)
        if len(ids) <= budget:
            good, good_ids = mid, ids
        else:
            hi = mid
    return good, good_ids


def window(seq: Sequence[str], start: int, n: int) -> list[str]:
    """n items of seq from `start`, wrapping around (a corpus shorter than the haystack repeats)."""
    m = len(seq)
    if n <= m - start:
        return list(seq[start:start + n])
    return [seq[(start + i) % m] for i in range(n)]


def insert_at_depths(units: list[str], needles: Sequence[str], depths: Sequence[float]) -> list[str]:
    """Insert each needle between two units at fraction `depth` (0 = start, 1 = end) of the haystack's
    characters, so that depth means "how far into the text" whatever the unit lengths."""
    total = sum(len(u) + 1 for u in units)
    cum, c = [0], 0
    for u in units:
        c += len(u) + 1
        cum.append(c)
    places = []
    for d in depths:
        target = d * total
        # The unit boundary closest to the target character (boundaries are 0..len(units)).
        k = min(range(len(cum)), key=lambda i: abs(cum[i] - target))
        places.append(k)
    out = list(units)
    # Insert from the back so earlier positions stay valid; equal positions keep the needles' order.
    for k, nd in sorted(zip(places, needles), key=lambda x: x[0], reverse=True):
        out.insert(k, nd)
    return out


def parse_lengths(text: str, *, window_tokens: int | None = None, model: str = "the model") -> list[int]:
    """"1k,2k,4k" -> [1024, 2048, 4096] (k = 1024 as RULER's 4K = 4096); checks the model's window."""
    out = []
    for part in filter(None, (p.strip().lower() for p in str(text).split(","))):
        mult = 1024 if part.endswith("k") else 1
        try:
            n = int(float(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise UserError(f"--lengths: {part!r} is not a length (examples: 4096, 4k, 0.5k)") from None
        if n < 64:
            raise UserError(f"--lengths: {part!r} is too short (at least 64 tokens)")
        if window_tokens is not None and n > window_tokens:
            raise UserError(f"--lengths: {part} ({n} tokens) is longer than {model}'s trained window of "
                            f"{window_tokens} tokens; context extension is not available yet, use lengths "
                            f"up to {window_tokens}")
        out.append(n)
    if not out:
        raise UserError("--lengths is empty (example: --lengths 1k,2k,4k)")
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """"0:1:11" -> 11 evenly spaced depths from 0 to 1; "0,0.5,1" -> those depths (fractions)."""
    text = str(text).strip()
    try:
        if ":" in text:
            a, b, n = text.split(":")
            a, b, n = float(a), float(b), int(n)
            if n < 1:
                raise ValueError
            vals = [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]
        else:
            vals = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--depths: {text!r} should be START:STOP:COUNT (0:1:11) or a list (0,0.5,1)") from None
    if not vals:
        raise UserError("--depths is empty (example: --depths 0:1:11)")
    if any(not 0 <= v <= 1 for v in vals):
        raise UserError(f"--depths: {text!r} has values outside 0..1 (depths are fractions of the haystack)")
    return sorted(set(round(v, 4) for v in vals))


# --- scoring: RULER's scripts/eval/synthetic/constants.py -------------------------------------------
def clean_prediction(text: str) -> str:
    """RULER's post-processing: strip, control characters to newlines, strip again."""
    return "".join("\n" if ord(ch) < 0x20 else ch for ch in text.strip()).strip()


def string_match_all(pred: str, answers: Sequence[str]) -> float:
    """Share of the expected strings found (case-insensitive substring) in the prediction, 0..1."""
    if not answers:
        return 0.0
    p = clean_prediction(pred).lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def string_match_part(pred: str, answers: Sequence[str]) -> float:
    """1 when any expected string occurs in the prediction (RULER's QA metric)."""
    p = clean_prediction(pred).lower()
    return float(any(a.lower() in p for a in answers))
