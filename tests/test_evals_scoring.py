"""RULER's scorers on hand-made answers: right, partly right, wrong."""
from longkv.evals import niah, ruler
from longkv.evals.prompts import Sample, clean_prediction, string_match_all, string_match_part


def _s(answers):
    return Sample("t", 1024, 0, [1, 2, 3], answers, 32)


def test_string_match_all():
    assert string_match_all(" The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("7654321", ["1234567"]) == 0.0
    assert string_match_all("1234567 and 2345678", ["1234567", "2345678", "3456789", "4567890"]) == 0.5
    assert string_match_all("APPLE, Banana", ["apple", "banana"]) == 1.0          # case-insensitive
    assert string_match_all("anything", []) == 0.0


def test_clean_prediction_and_part():
    assert clean_prediction("  a\x00b\tc \n") == "a\nb\nc"
    assert string_match_part("the answer is Paris", ["London", "paris"]) == 1.0
    assert string_match_part("Rome", ["London", "Paris"]) == 0.0


def test_task_scorers():
    assert niah.score(" 7324419.", _s(["7324419"])) == 1.0
    assert niah.score(" 732441.", _s(["7324419"])) == 0.0                          # a digit short is wrong
    vt = _s(["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"])
    assert ruler.score("ABCDE FGHIJ KLMNO PQRST UVWXY", vt) == 1.0
    assert ruler.score("ABCDE, FGHIJ and ZZZZZ", vt) == 0.4
    assert ruler.score("I do not know", vt) == 0.0
