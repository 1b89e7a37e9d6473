from fractions import Fraction

import pytest

from rlatent.errors import DataError
from rlatent.data.marks import (
    Mark,
    answers_match,
    canonical_number,
    evaluate_expression,
    extract_final_answer,
    parse_marks,
    strip_marks,
)


@pytest.mark.parametrize(
    "text, value",
    [
        ("48/2", Fraction(24)),
        ("12/60", Fraction(1, 5)),
        ("0.2*50", Fraction(10)),
        (".5+1", Fraction(3, 2)),
        ("1,000+2,500.5", Fraction(7001, 2)),
        ("-14+-8+1", Fraction(-21)),
        ("-48+21+(-3)", Fraction(-30)),
        ("100-50-30-15", Fraction(5)),
        ("6*(20/60)", Fraction(2)),
        ("2+3*4", Fraction(14)),
        ("(2+3)*4", Fraction(20)),
        ("8/4/2", Fraction(1)),
        ("10-2-3", Fraction(5)),
        ("25%*80", Fraction(20)),
        ("560//10", Fraction(56)),
        ("7//2", Fraction(3)),
        (" 3 * ( 4 - 1 ) ", Fraction(9)),
    ],
)
def test_evaluate_expression(text, value):
    assert evaluate_expression(text) == value


@pytest.mark.parametrize(
    "text, reason",
    [
        ("1/0", "division by zero in '1/0'"),
        ("2/(3-3)", "division by zero in '2/(3-3)'"),
        ("2**3", "unexpected '*' in '2**3'"),
        ("__import__('os')", "unexpected '_' in \"__import__('os')\""),
        ("2+", "expression '2+' ends too early"),
        ("(2+3", "expression '(2+3' ends too early"),
        ("2+3)", "unexpected ')' in '2+3)'"),
        ("", "empty expression ''"),
        ("3 4", "unexpected '4' in '3 4'"),
    ],
)
def test_evaluate_expression_rejects(text, reason):
    with pytest.raises(DataError) as error:
        evaluate_expression(text)
    assert str(error.value) == reason


def test_parse_marks_offsets_and_values():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10."
    first, second = parse_marks(text)
    assert first == Mark(20, 31, "48/2", "24", Fraction(24))
    assert text[first.start : first.end] == "<<48/2=24>>"
    assert text[second.start : second.end] == "<<0.2*50=10>>"
    assert second.value == 10


def test_parse_marks_negative_decimal_and_fraction_results():
    text = "<<100-150=-50>> <<1.5*3=4.50>> <<3/4=3/4>> <<1,000*2=2,000>>"
    assert [m.value for m in parse_marks(text)] == [-50, Fraction(9, 2), Fraction(3, 4), 2000]


def test_mark_whose_value_disagrees_keeps_the_written_result():
    (mark,) = parse_marks("She has 7+5 = <<7+5=13>>13 pens.")
    assert (mark.expression, mark.result, mark.value) == ("7+5", "13", Fraction(13))


def test_text_without_marks():
    assert parse_marks("No marks here; 3 < 4 and 5 > 2.") == []


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "a <<48/2>>24",
            "train.jsonl:17: calculator mark '<<48/2>>' does not parse: expected exactly one '=', found 0",
        ),
        ("<<1=2=3>>", "train.jsonl:17: calculator mark '<<1=2=3>>' does not parse: expected exactly one '=', found 2"),
        ("<<48/2=24 clips", "train.jsonl:17: calculator mark '<<48/2=24 clips...' does not parse: '<<' without '>>'"),
        (
            "<<1+1=2 <<2+2=4>>",
            "train.jsonl:17: calculator mark '<<1+1=2 <<2+2=4>>...' does not parse: '<<' without '>>'",
        ),
        ("so 24>> clips", "train.jsonl:17: calculator mark '...so 24>>' does not parse: '>>' without '<<'"),
        ("<<5/0=1>>", "train.jsonl:17: calculator mark '<<5/0=1>>' does not parse: division by zero in '5/0'"),
        (
            "<<2 apples=2>>",
            "train.jsonl:17: calculator mark '<<2 apples=2>>' does not parse: unexpected 'a' in '2 apples'",
        ),
        ("<<2+2=four>>", "train.jsonl:17: calculator mark '<<2+2=four>>' does not parse: unexpected 'f' in 'four'"),
        ("<<2+2=>>", "train.jsonl:17: calculator mark '<<2+2=>>' does not parse: empty expression ''"),
    ],
)
def test_malformed_marks_name_file_and_line(text, message):
    with pytest.raises(DataError) as error:
        parse_marks(text, where="train.jsonl:17")
    assert str(error.value) == message


def test_strip_marks():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nShe earned $<<0.2*50=10>>10.\n#### 72"
    assert strip_marks(text) == "Natalia sold 48/2 = 24 clips.\nShe earned $10.\n#### 72"


@pytest.mark.parametrize(
    "text, answer",
    [
        ("So 72 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### -5", "-5"),
        ("#### $3.50", "3.5"),
        ("#### 7.", "7"),
        ("#### 7.00", "7"),
        ("#### 0.5", "0.5"),
        ("#### -3.5", "-3.5"),
        ("#### 109,200,000", "109200000"),
        ("first #### 3 then #### 4", "4"),
        ("She has 3 apples, so the answer is 12.", "12"),
        ("It costs $1,250.", "1250"),
        ("pages 10-20", None),  # a range or a subtraction: 20 is an operand, not an answer
        ("The change is 10 - 3", None),  # not -3
        ("The temperature is -5 degrees.", "-5"),
        ("no number at all", None),
        ("#### none", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


def test_canonical_number():
    assert canonical_number(Fraction(7)) == "7"
    assert canonical_number(Fraction(-7, 2)) == "-3.5"
    assert canonical_number(Fraction(1, 8)) == "0.125"
    assert canonical_number(Fraction(1, 3)) == "1/3"


@pytest.mark.parametrize(
    "predicted, reference, same",
    [
        ("1000", "1,000.0", True),
        ("$1,000.", "1000", True),
        ("0.50", "0.5", True),
        ("-3", "-3.0", True),
        ("3", "-3", False),
        ("72", "73", False),
        (None, "72", False),
        ("seventy-two", "72", False),
    ],
)
def test_answers_match(predicted, reference, same):
    assert answers_match(predicted, reference) is same
