"""Grading GSM8K answers: rlatent's numeric match (signs, fractions, names, truncation, number forms)
and lm-evaluation-harness's `strict-match` / `flexible-extract`, checked on strings whose lm-eval
grade was computed by lm-eval's own code (RegexFilter + exact_match_hf_evaluate, gsm8k.yaml v3.0)."""

from fractions import Fraction

import pytest

from rlatent.data.grading import (
    FLEXIBLE_PATTERN,
    INVALID,
    STRICT_PATTERN,
    answer_concentration,
    flexible_extract,
    grade,
    lm_eval_extract,
    lm_eval_normalize,
    numeric_match,
    strict_match,
)
from rlatent.data.marks import answers_match, extract_final_answer, parse_number


@pytest.mark.parametrize(
    "text, answer",
    [
        # a spaced minus is a subtraction, not a sign; a glued one is a sign
        ("The change is 10 - 3", None),
        ("The change is 10 - 3 = 7", "7"),
        ("-3", "-3"),
        ("x = -3", "-3"),
        ("so x = (-3)", "-3"),
        ("The temperature is -5 degrees.", "-5"),
        ("She owes $-5", "-5"),
        ("She owes -$5", "-5"),
        ("#### -3", "-3"),
        ("#### \u22123", "-3"),  # the Unicode minus sign
        ("#### - 3", None),
        ("#### 10 - 3", None),
        ("pages 10-20", None),
        # a fraction or other arithmetic is no answer (GSM8K answers are decimal numbers)
        ("#### 18/5", None),
        ("She ate 18/5 pies", None),
        ("#### 3 x 4", None),
        ("So 2 * 3 = 6", "6"),
        # a number glued to a letter before it is part of a name
        ("CO2", None),
        ("The gas is CO2", None),
        ("She drove 12 miles in her A4", "12"),
        ("v1.2", None),
        ("\u5171 5 \u4e2a", "5"),  # a number after non-Latin text is a number
        ("#### 5kg", "5"),  # a unit after it is fine
        # number forms
        ("#### 1,000", "1000"),
        ("#### $1,000.00", "1000"),
        ("#### 18.", "18"),
        ("#### 25%", "25"),
        ("#### 0.50", "0.5"),
        ("#### .5", "0.5"),
        ("#### 109,200,000", "109200000"),
        ("#### 72 clips", "72"),
        ("#### **72**", "72"),
        ("**#### 72**", "72"),
        ("####\n\n72", "72"),
        ("#### 7 (10 - 3)", "7"),
        ("first #### 3 then #### 4", "4"),  # the last #### line decides
        ("#### none\nso 72", None),  # a #### line without a number is no answer
        # \boxed{} when there is no ####: one number only
        ("so \\boxed{72}", "72"),
        ("\\boxed{\\$1{,}000}", "1000"),
        ("\\boxed{25\\%}", "25"),
        ("\\boxed{\\frac{18}{5}}", None),
        ("\\boxed{7} and #### 8", "8"),
    ],
)
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


@pytest.mark.parametrize(
    "text, finished, answer",
    [
        ("So the answer is 72.", True, "72"),
        ("So the answer is 72. Then 5 more and 9", False, None),  # rambled to the token cap
        ("#### 72\n", False, "72"),  # a complete #### line
        ("#### 72\nQuestion: 5 more", False, "72"),
        ("#### 12", False, None),  # may be "#### 125" cut at the cap
        ("#### 12", True, "12"),
        ("\\boxed{72} and then", False, "72"),
    ],
)
def test_truncated_completion_needs_a_complete_final_answer(text, finished, answer):
    assert extract_final_answer(text, finished=finished) == answer
    assert numeric_match(text, "72", finished) is (answer == "72")


@pytest.mark.parametrize(
    "text, value",
    [("$1,000.", Fraction(1000)), ("-3.50", Fraction(-7, 2)), ("-$5", Fraction(-5)), ("\u22123", Fraction(-3)),
     ("- 3", None), ("18/5", None), ("CO2", None), ("seventy-two", None), ("3 4", None)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "predicted, reference, same",
    [("1000", "1,000", True), ("$1,000.00", "1000", True), ("0.50", "0.5", True), ("18.", "18", True),
     ("-3", "-3.0", True), ("- 3", "-3", False), ("18/5", "18", False), ("3", "-3", False)],
)
def test_answers_match(predicted, reference, same):
    assert answers_match(predicted, reference) is same


# lm-eval's grades, computed with lm-eval's own RegexFilter and exact_match_hf_evaluate (gsm8k.yaml 3.0):
# (completion, reference, strict-match, flexible-extract)
LM_EVAL = [
    ("#### 72", "72", True, True),
    ("So 72.\n#### 72", "72", True, True),
    ("#### 1,000", "1000", True, True),
    ("#### $1,000.00", "1000", False, False),  # "$" breaks strict; "1000.00" is not "1000"
    ("#### 18/5", "18", True, False),  # strict reads 18
    ("#### 0.50", "0.5", False, False),  # compared as strings
    ("The answer is 72.", "72", False, True),
    ("CO2", "2", False, True),
    ("The change is 10 - 3", "3", False, True),
    ("The change is 10 - 3", "-3", False, False),
    ("#### -3", "-3", True, True),
    ("= -3", "-3", False, True),
    ("#### 72\n#### 73", "72", True, False),  # strict takes the first, flexible the last
    ("#### 72\n#### 73", "73", False, True),
    ("no number", "3", False, False),
    ("It is 72...", "72", False, False),
    ("#### 72.", "72", True, True),
    ("####72", "72", False, True),
    ("- 5", "-5", False, False),
    ("3,4", "34", False, True),
    ("x #### 1,200 y", "Natalia sold 1,200 clips.\n#### 1,200", True, True),  # a whole GSM8K answer as reference
]


@pytest.mark.parametrize("completion, reference, strict, flexible", LM_EVAL)
def test_lm_eval_grades(completion, reference, strict, flexible):
    assert strict_match(completion, reference) is strict
    assert flexible_extract(completion, reference) is flexible
    assert grade(completion, reference) == {"correct": numeric_match(completion, reference),
                                            "strict_match": strict, "flexible_extract": flexible}


def test_lm_eval_patterns_and_extraction():
    assert STRICT_PATTERN == r"#### (\-?[0-9\.\,]+)" and FLEXIBLE_PATTERN == r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
    import re

    strict, flexible = re.compile(STRICT_PATTERN), re.compile(FLEXIBLE_PATTERN)
    assert lm_eval_extract("a #### 1,000.\n#### 5", strict, 0) == "1,000."
    assert lm_eval_extract("no answer", strict, 0) == INVALID
    assert lm_eval_extract("It is $1,000.00 or 7", flexible, -1) == "7"
    assert lm_eval_extract("It is $1,000.00.", flexible, -1) == "$1,000.00."
    assert lm_eval_extract("CO2", flexible, -1) == "2"
    assert lm_eval_normalize("$1,000.") == "1000"
    assert lm_eval_normalize("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert lm_eval_normalize(INVALID) == "[invalid]"


def test_answer_concentration_counts_one_answer_across_problems():
    # Five problems; "0" (written two ways) is said three times and is right once; 7 is right once.
    predicted = ["0", "0.0", "7", None, "0"]
    references = ["0", "5", "7", "3", "12"]
    assert answer_concentration(predicted, references) == {"answer_top_share": 0.6, "accuracy_top_answer": 0.2}
    # Yes/No answers (as `extract_final_answer` writes them); no answers at all give zeros.
    assert answer_concentration(["Yes", "Yes", "No", "Yes"], ["Yes", "No", "No", "No"]) == {
        "answer_top_share": 0.75, "accuracy_top_answer": 0.25}
    assert answer_concentration([None, None], ["1", "2"]) == {"answer_top_share": 0.0, "accuracy_top_answer": 0.0}
    assert answer_concentration([], []) == {"answer_top_share": 0.0, "accuracy_top_answer": 0.0}
