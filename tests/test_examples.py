import copy
import itertools
import os

import pytest

from rlatent.data.gsm8k import Problem, load_gsm8k
from rlatent.errors import ModelError
from rlatent.data.examples import (
    answer_segments,
    build_example,
    format_prompt,
    render_example,
)
from rlatent.data.marks import parse_marks, strip_marks
from rlatent.data.synthetic import generate_problems

NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
WENG = (
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n"
    "#### 10"
)


def test_insert_keeps_the_expression_and_moves_the_space_after_the_block():
    assert answer_segments(NATALIA, 2, "insert") == [
        "Natalia sold 48/2 =",
        2,
        " 24 clips in May.\nNatalia sold 48+24 =",
        2,
        " 72 clips altogether in April and May.\n#### 72",
    ]


def test_replace_removes_the_written_expression():
    assert answer_segments(NATALIA, 3, "replace") == [
        "Natalia sold",
        3,
        " 24 clips in May.\nNatalia sold",
        3,
        " 72 clips altogether in April and May.\n#### 72",
    ]


def test_dollar_sign_stays_with_the_result():
    assert answer_segments(WENG, 1, "insert") == [
        "Weng earns 12/60 =",
        1,
        " $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 =",
        1,
        " $10.\n#### 10",
    ]
    assert answer_segments(WENG, 1, "replace") == [
        "Weng earns",
        1,
        " $0.2 per minute.\nWorking 50 minutes, she earned",
        1,
        " $10.\n#### 10",
    ]


@pytest.mark.parametrize(
    "answer, replaced",
    [
        # An expression at the start of a line goes entirely; the newline stays.
        ("So far 3.\n100 - 50 - 30 = $<<100-50-30=20>>20 more.", ["So far 3.\n", 2, "$20 more."]),
        # No space before "=", none after.
        ("There are 24 - 10 =<<24-10=14>>14 cans", ["There are", 2, " 14 cans"]),
        # Commas inside numbers belong to the expression, the one after "so" does not.
        ("It is so, 1,000*2 = <<1000*2=2000>>2000 g", ["It is so,", 2, " 2000 g"]),
        # A sentence's full stop is not a decimal point.
        ("He has 5. 5+3 = <<5+3=8>>8 now", ["He has 5.", 2, " 8 now"]),
        # "x" as an unknown is not a multiplication sign.
        ("We know x=<<26=26>>26 goats", ["We know x", 2, "26 goats"]),
        # No written expression: nothing but the mark goes.
        ("Bruce scored <<4=4>>4 goals", ["Bruce scored", 2, " 4 goals"]),
        # Expressions with words in them stop at the first letter.
        ("for 4 hours * 125 watts=<<4*125=500>>500 Wh", ["for 4 hours * 125 watts", 2, "500 Wh"]),
    ],
)
def test_replace_scan_edge_cases(answer, replaced):
    assert answer_segments(answer, 2, "replace") == replaced


def test_mark_first_and_last_and_adjacent_blocks_merge():
    assert answer_segments("<<2+2=4>>4 and <<1+1=2>><<2*3=6>>", 2) == [2, "4 and", 4, " "]
    # Replace removes all the text between two marks: still one block.
    assert answer_segments("<<2+2=4>>4+2 = <<4+2=6>>6", 2, "replace") == [4, "6"]


def test_k_zero_insert_is_text_cot_and_replace_is_no_cot():
    """The control ladder's text rows: `insert` keeps the written expressions (CoT), `replace` removes them
    with nothing in their place (no-CoT for those steps)."""
    expected = NATALIA.replace("<<48/2=24>>", "").replace("<<48+24=72>>", "")
    assert answer_segments(NATALIA, 0, "insert") == [expected]
    assert answer_segments(NATALIA, 0, "replace") == [
        "Natalia sold 24 clips in May.\nNatalia sold 72 clips altogether in April and May.\n#### 72"]


def test_curriculum_stages_convert_the_first_marks_and_leave_the_rest_written():
    written = NATALIA.replace("<<48/2=24>>", "").replace("<<48+24=72>>", "")
    assert answer_segments(NATALIA, 2, "replace", latent_marks=0) == [written]
    first = answer_segments(NATALIA, 2, "replace", latent_marks=1)
    assert first[1] == 2 and "48+24 = 72" in first[2] and "48/2" not in first[0]
    assert answer_segments(NATALIA, 2, "replace", latent_marks=2) == answer_segments(NATALIA, 2, "replace")
    assert answer_segments(NATALIA, 2, "insert", latent_marks=5) == answer_segments(NATALIA, 2, "insert")


def test_step_placement_replaces_each_marked_line_as_coconut_does():
    """`step`: the mark's whole line goes and one block stands for it; with k=0 (no-CoT) only the lines
    without a mark remain; the curriculum converts the first lines and leaves the rest written."""
    assert answer_segments(NATALIA, 2, "step") == [4, "#### 72"]  # two lines back to back: one block
    assert answer_segments(NATALIA, 0, "step") == ["#### 72"]
    assert answer_segments(NATALIA, 3, "step", latent_marks=1) == [
        3, "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"]
    lead = "Intro line.\n" + NATALIA
    assert answer_segments(lead, 2, "step")[:2] == ["Intro line.\n", 4]


def test_step_placement_counts_every_mark_on_a_removed_line():
    answer = "a <<1+1=2>>2 and <<2+2=4>>4\nb <<3*3=9>>9\n#### 9"
    assert answer_segments(answer, 2, "step") == [6, "#### 9"]
    # The first mark converted takes its line, the second mark's with it; that mark adds no latents.
    assert answer_segments(answer, 2, "step", latent_marks=1) == [2, "b 9\n#### 9"]
    assert answer_segments(answer, 2, "step", latent_marks=2) == [4, "b 9\n#### 9"]


def test_unknown_placement():
    with pytest.raises(ValueError, match="placement"):
        answer_segments(NATALIA, 2, "before")


def test_no_empty_text_pieces_in_synthetic_answers():
    for problem in generate_problems(100, seed=0, operators="+-*/"):
        for placement in ("insert", "replace"):
            segments = answer_segments(problem.answer, 2, placement)
            assert all(s != "" for s in segments)
            assert all(type(a) is not type(b) for a, b in itertools.pairwise(segments))
            assert sum(isinstance(s, int) for s in segments) == problem.answer.count("<<")
        steps = answer_segments(problem.answer, 2, "step")
        assert all(s != "" for s in steps) and "<<" not in "".join(s for s in steps if isinstance(s, str))
        assert sum(s for s in steps if isinstance(s, int)) == 2 * problem.answer.count("<<")


PROBLEM = Problem("How many clips?", NATALIA, "72", "test:1")


def test_build_example_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    example = build_example(PROBLEM, tok, k=2, placement="insert")
    n = len(example.input_ids)
    assert len(example.latent_mask) == len(example.next_step_mask) == n

    prompt = format_prompt(PROBLEM.question, tok)
    assert example.prompt_length == len(prompt)
    assert example.input_ids[: len(prompt)] == prompt
    assert tok.decode(prompt) == "<|user|>How many clips?\n<|assistant|>"

    # Each text piece is tokenised on its own; each block is k pad ids.
    expected, latent = list(prompt), [False] * len(prompt)
    for segment in answer_segments(NATALIA, 2, "insert"):
        if isinstance(segment, int):
            expected += [tok.pad_token_id] * segment
            latent += [True] * segment
        else:
            ids = tok.encode(segment, add_special_tokens=False)
            expected += ids
            latent += [False] * len(ids)
    assert example.input_ids == expected + [tok.eos_token_id]
    assert example.latent_mask == latent + [False]
    assert not any(example.latent_mask[: example.prompt_length])
    assert render_example(
        example.input_ids[example.prompt_length :], example.latent_mask[example.prompt_length :], tok
    ) == (
        "Natalia sold 48/2 =[z][z] 24 clips in May.\nNatalia sold 48+24 =[z][z] 72 clips altogether in April and May.\n"
        "#### 72<|endoftext|>"
    )


def test_next_step_mask_covers_the_step_after_each_block(tiny_tokenizer):
    tok = tiny_tokenizer
    example = build_example(PROBLEM, tok, k=2, placement="replace")
    blocks = [i for i in range(len(example.input_ids)) if example.latent_mask[i] and not example.latent_mask[i + 1]]
    assert len(blocks) == 2
    steps = []
    for last_latent in blocks:
        i = last_latent + 1
        span = []
        while i < len(example.input_ids) and example.next_step_mask[i]:
            span.append(example.input_ids[i])
            i += 1
        steps.append(tok.decode(span))
    assert steps == [" 24 clips in May.\n", " 72 clips altogether in April and May.\n"]
    # Exactly those positions, nothing in the prompt, at latents or in "#### 72".
    covered = sum(len(tok.encode(s, add_special_tokens=False)) for s in steps)
    assert sum(example.next_step_mask) == covered


def test_next_step_mask_runs_to_eos_without_a_newline(tiny_tokenizer):
    problem = Problem("q", "So 2+2 = <<2+2=4>>4 #### 4", "4", "test:2")
    example = build_example(problem, tiny_tokenizer, k=1, placement="insert")
    start = example.latent_mask.index(True) + 1
    assert all(example.next_step_mask[start:]) and not any(example.next_step_mask[:start])
    assert example.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_k_zero_example_has_no_latents(tiny_tokenizer):
    example = build_example(PROBLEM, tiny_tokenizer, k=0, placement="insert")
    assert not any(example.latent_mask) and not any(example.next_step_mask)
    answer = tiny_tokenizer.decode(example.input_ids[example.prompt_length : -1])
    assert answer == NATALIA.replace("<<48/2=24>>", "").replace("<<48+24=72>>", "")
    no_cot = build_example(PROBLEM, tiny_tokenizer, k=0, placement="replace")
    assert not any(no_cot.latent_mask) and len(no_cot.input_ids) < len(example.input_ids)


def test_plain_prompt_without_chat_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    example = build_example(PROBLEM, tok, k=1, placement="replace")
    assert tok.decode(example.input_ids[: example.prompt_length]) == "Question: How many clips?\nAnswer:"
    rendered = render_example(example.input_ids, example.latent_mask, tok)
    assert rendered.startswith("Question: How many clips?\nAnswer: Natalia sold[z] 24 clips")


@pytest.mark.parametrize("missing, message", [("eos_token", "has no EOS token"), ("pad_token", "has no pad token")])
def test_tokenizer_without_eos_or_pad(tiny_tokenizer, missing, message):
    tok = copy.deepcopy(tiny_tokenizer)
    setattr(tok, missing, None)
    with pytest.raises(ModelError, match=message):
        build_example(PROBLEM, tok, k=2, placement="insert")


def text_of(segments):
    return "".join(s for s in segments if isinstance(s, str))


def test_insert_only_moves_text_across_blocks():
    """Insert drops nothing: the text pieces joined are the stripped answer."""
    for text in [NATALIA, WENG] + [p.answer for p in generate_problems(100, seed=1, operators="+-*/")]:
        assert text_of(answer_segments(text, 2, "insert")) == strip_marks(text)


GSM8K_DIR = os.environ.get("RLATENT_GSM8K_DIR")


@pytest.mark.skipif(not GSM8K_DIR, reason="RLATENT_GSM8K_DIR is not set (directory with GSM8K train.jsonl, test.jsonl)")
def test_real_gsm8k_segments_and_examples(tiny_tokenizer):
    for split in ("train", "test"):
        problems, _ = load_gsm8k(split, path=GSM8K_DIR)
        for p in problems:
            n_marks = len(parse_marks(p.answer))
            inserted = answer_segments(p.answer, 2, "insert")
            replaced = answer_segments(p.answer, 2, "replace")
            assert text_of(inserted) == strip_marks(p.answer), p.source
            assert sum(s for s in inserted if isinstance(s, int)) == 2 * n_marks, p.source
            assert sum(s for s in replaced if isinstance(s, int)) == 2 * n_marks, p.source
            assert len(text_of(replaced)) <= len(text_of(inserted)), p.source
            assert text_of(replaced).endswith("#### " + p.answer.rpartition("#### ")[2]), p.source
        for p in problems[:200]:
            example = build_example(p, tiny_tokenizer, k=2, placement="replace")
            assert sum(example.latent_mask) == 2 * len(parse_marks(p.answer))
