"""RULER-style synthetic long-context tasks (NVIDIA RULER, arXiv 2404.06654; github.com/NVIDIA/RULER).

The 11 tasks that need no outside data, with RULER's templates, answer prefixes, generation budgets
and scoring (`scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,
freq_words_extraction}.py`, `constants.py`, `scripts/eval/synthetic/constants.py`):
niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe.
Left out: qa_1 and qa_2, which need SQuAD v2 and HotpotQA; no PyPI or Debian package ships them and
this harness runs offline (the report says so).

Differences from upstream, all forced by running offline and all recorded in each result:
  - the "essay" haystack is a local corpus (Shakespeare or KJV when installed, see corpora.py)
    instead of Paul Graham's essays, split by a regex instead of nltk's punkt;
  - keys and CWE words come from embedded word lists (words.py) instead of `wonderwords`.
So scores are "RULER-style": comparable between caches and models here, not with the leaderboard.
"""
from __future__ import annotations

import string
import uuid
from dataclasses import dataclass

from ..errors import UserError
from . import corpora, words
from .prompts import Sample, fit, render, rng_for, string_match_all, window

LEFT_OUT = {"qa_1": "needs SQuAD v2.0 dev, which no PyPI/Debian package ships (no download here)",
            "qa_2": "needs HotpotQA dev-distractor, which no PyPI/Debian package ships (no download here)"}

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
                 "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_LEAD = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
VT_LEAD = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
           "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
CWE_LEAD = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three "
                "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
                "Please ignore the dots '....'. What are the three most frequently appeared words in the "
                "above coded text?")
FWE_LEAD = " Answer: According to the coded text above, the three most frequently appeared words are:"
DEPTHS = [round(100 * i / 39) for i in range(40)]       # np.round(np.linspace(0, 100, 40))


@dataclass(frozen=True)
class Niah:
    """One row of RULER's synthetic.yaml for the niah family."""
    haystack: str           # noise | essay | needle
    key: str                # words | uuids
    value: str              # numbers | uuids
    k: int = 1              # keys (needles) in the context
    v: int = 1              # values per key
    q: int = 1              # keys asked for


TASKS: dict[str, object] = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", v=4),
    "niah_multiquery": Niah("essay", "words", "numbers", k=4, q=4),
    "vt": "vt", "cwe": "cwe", "fwe": "fwe",
}
GEN_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}   # RULER's tokens_to_generate


def gen_tokens(task: str) -> int:
    return GEN_TOKENS["niah" if task.startswith("niah") else task]


def parse_tasks(text: str) -> list[str]:
    """"all" or a comma list of task names; unknown names (and qa_*) are UserErrors."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["all"] or not names:
        return list(TASKS)
    for t in names:
        if t in LEFT_OUT:
            raise UserError(f"task {t} is left out: it {LEFT_OUT[t]}")
        if t not in TASKS:
            raise UserError(f"unknown RULER task {t!r}; known: all, {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _random(kind: str, rng) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return words.key_pairs(1, rng)[0]


def _niah(tok, task, cfg: Niah, length, rng, corpus, chat):
    budget = length - gen_tokens(task)
    keys, values, needles = [], [], []
    for _ in range(max(cfg.k, cfg.q)):
        keys.append(_random(cfg.key, rng))
        vals = [_random(cfg.value, rng) for _ in range(cfg.v)]
        values.append(vals)
        needles += [NEEDLE.format(type_needle_v=cfg.value, key=keys[-1], value=x) for x in vals]
    rng.shuffle(needles)
    asked = rng.sample(range(len(keys)), cfg.q)
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if cfg.q > 1 else keys[asked[0]]
    answers = [x for i in asked for x in values[i]]
    template, lead, type_v = NIAH_TEMPLATE, NIAH_LEAD, cfg.value
    if cfg.q * cfg.v == 1:            # RULER's switch to the singular
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, lead = template.replace(a, b), lead.replace(a, b)
        type_v = type_v[:-1]
    sents = corpora.get(corpus).sentences() if cfg.haystack == "essay" else None
    seed = rng.getrandbits(64)

    def build(n: int) -> list[int]:
        r = rng_for(seed, n)
        if cfg.haystack == "essay":
            units = window(sents, seed % len(sents), n)
            pos = sorted(int(n * d / 100) for d in r.sample(DEPTHS, len(needles)))
            for j, (p, nd) in enumerate(zip(pos, needles)):
                units.insert(p + j, nd)
            context = " ".join(units)
        else:
            if cfg.haystack == "noise":
                units = [corpora.NOISE] * n
            else:                     # every line a distractor needle of the same form
                units = [NEEDLE.format(type_needle_v=cfg.value, key=_random(cfg.key, r), value=_random(cfg.value, r))
                         for _ in range(n)]
            for p, nd in zip(sorted(r.sample(range(n + 1), len(needles)), reverse=True), needles):
                units.insert(p, nd)
            context = "\n".join(units)
        text = template.format(type_needle_v=type_v, context=context, query=query)
        return render(tok, text, lead.format(type_needle_v=type_v, query=query), chat=chat)

    lo = max(1, len(needles)) if cfg.haystack != "essay" else 1
    n, ids = fit(build, budget, lo=lo, what=f"{task} at {length} tokens")
    corpus_name = corpora.get(corpus).name if cfg.haystack == "essay" else cfg.haystack
    return ids, answers, {"haystack_units": n, "corpus": corpus_name}


def _vt_text(rng, n_noise: int, *, k: int, value: str) -> tuple[str, list[str]]:
    """A 4-hop chain of k-letter variables hidden at sorted random lines of `n_noise` noise lines."""
    names: list[str] = []
    while len(names) < 5:
        nm = "".join(rng.choices(string.ascii_uppercase, k=k))
        if nm not in names:
            names.append(nm)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    lines = [corpora.NOISE] * n_noise
    for j, p in enumerate(sorted(rng.randint(0, n_noise) for _ in chain)):
        lines.insert(p + j, chain[j])
    text = VT_TEMPLATE.format(context="\n".join(lines), query=value)
    return text, names


def _vt(tok, length, rng, chat):
    seed = rng.getrandbits(64)
    # The one in-context example (RULER builds it at max_seq_length=500): 3-letter names, a solved answer.
    icl_noise = 12
    icl_value = str(rng.randint(10000, 99999))
    icl, icl_names = _vt_text(rng_for(seed, "icl"), icl_noise, k=3, value=icl_value)
    icl += VT_LEAD.format(num_v=5, query=icl_value) + " ".join(icl_names)
    value = str(rng.randint(10000, 99999))

    def build(n: int):
        text, _ = _vt_text(rng_for(seed, n), n, k=5, value=value)
        return render(tok, icl + "\n\n" + text, VT_LEAD.format(num_v=5, query=value), chat=chat)

    n, ids = fit(build, length - gen_tokens("vt"), lo=1, what=f"vt at {length} tokens")
    names = _vt_text(rng_for(seed, n), n, k=5, value=value)[1]     # the chain of the prompt we keep
    return ids, names, {"haystack_units": n, "corpus": "noise"}


def _cwe_example(rng, vocab, n_words, common_reps, uncommon_reps, real: int):
    # Real words first; made-up words join only when the list needs more than the `real` ones.
    chosen = rng.sample(vocab[:max(real, n_words)], n_words)
    common, uncommon = chosen[:10], chosen[10:]
    items = common * common_reps + uncommon * uncommon_reps
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common


def _cwe(tok, length, rng, chat):
    seed = rng.getrandbits(64)
    base = list(dict.fromkeys(words.ADJECTIVES + words.NOUNS + words.VERBS))   # a few words are in two lists
    vocab = base + words.pseudo_words(4 * len(base), rng_for(seed, "vocab"), exclude=set(base))
    short = length < 4096          # RULER lowers the repeat counts below 4K
    ex_ctx, ex_ans = _cwe_example(rng_for(seed, "shot"), vocab, 20 if short else 40, 3 if short else 10,
                                  1 if short else 3, len(base))
    shot = CWE_TEMPLATE.format(context=ex_ctx) + CWE_LEAD + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans))
    reps = (6, 1) if short else (30, 3)

    def build(n: int):
        if 10 + n > len(vocab):
            raise UserError(f"cwe at {length} tokens needs more than the {len(vocab)} distinct words it has")
        ctx, _ = _cwe_example(rng_for(seed, n), vocab, 10 + n, *reps, len(base))
        return render(tok, shot + "\n" + CWE_TEMPLATE.format(context=ctx), CWE_LEAD, chat=chat)

    n, ids = fit(build, length - gen_tokens("cwe"), lo=1, what=f"cwe at {length} tokens")
    common = _cwe_example(rng_for(seed, n), vocab, 10 + n, *reps, len(base))[1]
    return ids, common, {"haystack_units": n, "corpus": "words"}


def _zeta(a: float, terms: int = 10000) -> float:
    # Riemann zeta by partial sum plus the integral tail (scipy.special.zeta in RULER; no scipy here).
    return sum(k ** -a for k in range(1, terms + 1)) + terms ** (1 - a) / (a - 1)


def _fwe(tok, length, rng, chat, alpha: float = 2.0):
    seed = rng.getrandbits(64)
    size = max(8, (length - gen_tokens("fwe")) // 50)       # RULER's vocab_size
    vocab: list[str] = []
    while len(set(vocab)) < size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."                   # the most frequent "word" is noise, as in RULER
    z = _zeta(alpha)

    def build(n: int):
        counts = [int(n * (k + 1) ** -alpha / z) for k in range(len(vocab))]
        text = [w for w, c in zip(vocab, counts) for _ in range(c)]
        rng_for(seed, n).shuffle(text)
        return render(tok, FWE_TEMPLATE.format(context=" ".join(text)), FWE_LEAD, chat=chat)

    n, ids = fit(build, length - gen_tokens("fwe"), lo=50, what=f"fwe at {length} tokens")
    return ids, vocab[1:4], {"haystack_units": n, "corpus": "words"}


def make_sample(tok, task: str, *, length: int, index: int, seed: int, corpus: str = "auto",
                chat: bool | None = None) -> Sample:
    """Sample `index` of `task` at `length` tokens (prompt + RULER's generation budget)."""
    if task not in TASKS:
        raise UserError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    rng = rng_for(seed, task, length, index)
    cfg = TASKS[task]
    if isinstance(cfg, Niah):
        ids, answers, meta = _niah(tok, task, cfg, length, rng, corpus, chat)
    else:
        ids, answers, meta = {"vt": _vt, "cwe": _cwe, "fwe": _fwe}[task](tok, length, rng, chat)
    return Sample(task, length, index, ids, answers, gen_tokens(task), meta)


def score(pred: str, sample: Sample) -> float:
    """RULER's string_match_all: the share of expected strings found in the prediction (0..1)."""
    return string_match_all(pred, sample.answers)
