"""From a problem to a supervised example with latent blocks (phase 1).

Each calculator mark is where a hard step happens, so that is where a block of
`k` latents goes. Three placements:

- `insert`: the block stands where the mark stood, after the written
  expression and before the result: `48/2 = [z z] 24 clips`. The model can
  still read the expression; the latents only have to carry the result.
- `replace`: the written expression (and its `=`) goes too:
  `Natalia sold [z z] 24 clips`. The computation can only happen inside the
  latents -- the sharper test of whether they are used, and fewer tokens.
- `step`: the whole line holding the mark goes, as Coconut replaces each
  reasoning step of its GSM8K-Aug and ProsQA answers with continuous thoughts:
  `Answer: [z z z z] #### 72`. Needed where a step's result is more than a
  number after an expression (a graph-search hop "Every wumpus is a yimpus.":
  `replace` leaves it written), and the setting of Coconut's published ladder.

Whitespace (and a currency sign) standing just before a mark moves after the block, to
the start of the result, so the result tokenises as it would in running text
(" 24", "$0.2"), not as a lone "24" after "= ".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rlatent.data.gsm8k import Problem
from rlatent.errors import ModelError
from rlatent.data.marks import Mark, Operation, canonical_number, operations, parse_marks, strip_marks

PLACEMENTS = ("insert", "replace", "step")
# Without a chat template; the answer follows after one space.
PLAIN_PROMPT = "Question: {question}\nAnswer:"
LATENT_TEXT = "[z]"

# Whitespace, then an optional currency sign, at the end of the text before a
# mark ("= $<<...>>" is common in GSM8K, "= €<<...>>" rare).
_LEAD = re.compile(r"([ \t]*)([$€£¢]?)$")


def answer_segments(answer: str, k: int | Sequence[int], placement: str = "insert",
                    latent_marks: int | None = None) -> list[str | int]:
    """The answer as text pieces and latent blocks (an int: that many latents).

    Marks are stripped. Each of the first `latent_marks` marks (all when None)
    becomes a block of `k` latents (`k[i]` for mark i when a sequence: blocks
    sized by their chains, `block_sizes`), `placement` saying whether the written
    expression before it stays (`insert`) or goes (`replace`), or its whole
    line goes (`step`: the block stands where the line stood; a later mark on
    a line already gone adds its `k` to that block). The marks after those
    stay written as text, as in a chain-of-thought answer (the stages of a
    Coconut-style curriculum). With `k == 0` no mark gets a block: `insert`
    gives the stripped answer (text CoT), `replace` removes the expressions
    too (no-CoT for those steps: the result is written with nothing before
    it), `step` removes the steps' lines (no-CoT: only the lines without a
    mark, such as the final `#### N`, remain).
    Adjacent text pieces are merged, so are adjacent blocks (consecutive
    latents are one block), and no text piece is empty.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(k, int) and k == 0 and placement == "insert" or latent_marks == 0:
        text = strip_marks(answer)
        return [text] if text else []
    segments: list[str | int] = []
    pending, cursor = "", 0
    for index, mark in enumerate(parse_marks(answer)):
        converted = latent_marks is None or index < latent_marks
        size = (k if isinstance(k, int) else k[index]) if converted else 0
        if placement == "step" and mark.start < cursor:  # its line went with an earlier mark's
            pending = _add_block(segments, pending, size)
            continue
        if placement == "step" and converted:  # its line goes, from the line's start to its line break
            pending += answer[cursor : answer.rfind("\n", cursor, mark.start) + 1]
            line_end = answer.find("\n", mark.end)
            cursor = len(answer) if line_end < 0 else line_end + 1
            pending = _add_block(segments, pending, size)
            continue
        before = answer[cursor : mark.start]
        if size and not before and segments and isinstance(segments[-1], int):
            segments[-1] += size  # back-to-back marks: one block; the carried space waits
            cursor = mark.end
            continue
        if not converted:  # still written: only the mark itself goes
            pending += before
            cursor = mark.end
            continue
        if placement == "replace":  # the space before the expression moves, not the one after "="
            cut, spaces, lead = _expression_cut(before)
        else:
            lead = _LEAD.search(before)
            cut, spaces = lead.start(), lead.group(1)
        pending = _add_block(segments, pending + before[:cut], size)
        pending, cursor = pending + spaces + lead.group(2), mark.end
    pending += answer[cursor:]
    if pending:
        segments.append(pending)
    return segments


def _add_block(segments: list[str | int], pending: str, size: int) -> str:
    """Append the `pending` text (when any) and a block of `size` latents (none when 0) to `segments`,
    a block right after a block growing it (the text between two marks was all expression, or a
    step's line); the text still pending: "" once a block was added."""
    if not size:
        return pending
    if pending:
        segments.append(pending)
    if segments and isinstance(segments[-1], int):
        segments[-1] += size
    else:
        segments.append(size)
    return ""


def _expression_start(text: str, end: int) -> int:
    """Where the written expression `... =` that ends at `end` begins, scanning
    back over digits, operators, spaces, `$` and `%` to a letter, a line start
    or other punctuation; `end` itself when no `=` stands there."""
    i = end
    while i > 0 and text[i - 1] in " \t":
        i -= 1
    if i == 0 or text[i - 1] != "=":
        return end
    i -= 1
    while i > 0 and _in_expression(text, i - 1):
        i -= 1
    return i


def written_expression(line: str) -> str | None:
    """The expression a line writes before its last `=` ("(9 - 7) x 10" in "It has (9 - 7) x 10 = 20
    pens."), the span `replace` removes from a step; None without an `=` or with nothing before it.
    `rlatent diagnose --only steps` evaluates it to tell wrong operations from a wrong result."""
    head = line[: line.rfind("=") + 1]
    expression = head[_expression_start(head, len(head)) : -1].strip() if head else ""
    return expression or None


def split_marks(answer: str, most: int, latent_marks: int | None = None) -> tuple[str, list[int]]:
    """`answer` with each of its first `latent_marks` marks (all when None) that holds 2 to `most` operations
    written as one marked step per operation, in the order they are evaluated, the last keeping the mark's
    result: "has 12 * 7 + 5 = <<12*7+5=89>>89" -> "has 12 * 7 = <<12*7=84>>84, 84 + 5 = <<84+5=89>>89";
    and, per one of those marks, how many marks it became (1 where it stays whole: one operation, more than
    `most`, or a partial result that no decimal writes, such as 1/3).

    The stepwise teacher of self-distillation (`sft.distill.split_steps`) reads these answers, so that a
    latent block of `most` slots gets a state to match for each partial result, not only the last."""
    pieces, counts, cursor = [], [], 0
    for index, mark in enumerate(parse_marks(answer)):
        if latent_marks is not None and index >= latent_marks:
            break
        steps = _split_steps(mark, most)
        if not steps:
            counts.append(1)
            continue
        before = answer[cursor : mark.start]
        cut, space, lead = _expression_cut(before)
        partials = "".join(f"{_operation(step, ' ')} = <<{_operation(step, '')}={canonical_number(step.value)}>>"
                           f"{canonical_number(step.value)}, " for step in steps[:-1])
        pieces.append(f"{before[:cut]}{space}{partials}{_operation(steps[-1], ' ')} ={lead.group(1) or ' '}"
                      f"{lead.group(2)}<<{_operation(steps[-1], '')}={mark.result}>>")
        counts.append(len(steps))
        cursor = mark.end
    return "".join(pieces) + answer[cursor:], counts


def block_chains(answer: str, most: int, latent_marks: int | None = None) -> list[str]:
    """Per each of the first `latent_marks` marks (all when None), the written text its `replace` block
    stands for, as it reads in running text: the expression and its `=` (" 10*7-18 =", "10*7-18=" at the
    start of a line), one step per
    operation when the mark splits (`split_marks` with `most`: " 10 * 7 = 70, 70 - 18 ="), the mark's own
    expression where the answer writes none. Compressed-chain training (`rlatent.sft.compress`) teaches a
    block's slots to stand for the pieces of this text."""
    chains, cursor = [], 0
    for index, mark in enumerate(parse_marks(answer)):
        if latent_marks is not None and index >= latent_marks:
            break
        before = answer[cursor : mark.start]
        cut, _, lead = _expression_cut(before)
        steps = _split_steps(mark, most)
        if steps:
            chain = "".join(f"{_operation(step, ' ')} = {canonical_number(step.value)}, " for step in steps[:-1])
            chain += f"{_operation(steps[-1], ' ')} ="
        else:
            chain = before[cut : lead.start()].strip() or f"{mark.expression} ="
        # Running text writes a space before the expression; an expression that starts its line (the
        # `equations` answer format) is written without one.
        at_line_start = (before[:cut] or (answer[cursor - 1] if cursor else "\n")).endswith("\n")
        chains.append(chain if at_line_start else " " + chain)
        cursor = mark.end
    return chains


def block_sizes(answer: str, tokenizer, tokens_per_latent: int, most_slots: int, split_up_to: int,
                latent_marks: int | None = None) -> list[int]:
    """Per each of the first `latent_marks` marks (all when None), the slots of its block at compression
    factor `tokens_per_latent` (c): ceil(tokens of its chain / c), at most `most_slots`; the chain is
    `block_chains(answer, split_up_to)`'s, tokenized as `rlatent.sft.compress` cuts it. CoLaR's factor:
    at c = 1 a slot per chain token, at c = 2 one per two, so a block is as long as its step needs."""
    chains = block_chains(answer, split_up_to, latent_marks)
    lengths = [len(tokenizer.encode(chain, add_special_tokens=False)) for chain in chains]
    return [min(most_slots, max(1, -(-length // tokens_per_latent))) for length in lengths]


def block_spans(latent_mask: list[bool]) -> list[tuple[int, int]]:
    """(first slot, position after the last) of each latent block of an example, in order."""
    return [(i, latent_mask.index(False, i)) for i, slot in enumerate(latent_mask)
            if slot and (i == 0 or not latent_mask[i - 1])]


def _split_steps(mark: Mark, most: int) -> list[Operation] | None:
    """The operations of `mark` in evaluation order when `split_marks` writes it stepwise: 2 to `most` of
    them, every number a finite decimal (not 1/3); None when it stays whole."""
    steps = operations(mark.expression)
    written = [canonical_number(v) for step in steps for v in (step.left, step.right, step.value)]
    return steps if 2 <= len(steps) <= most and not any("/" in number for number in written) else None


def _expression_cut(before: str) -> tuple[int, str, re.Match]:
    """For the text `before` a mark: where its written expression starts, the whitespace that stood before
    that expression (which stays before whatever replaces it), and the match of the mark's lead (the
    whitespace and currency sign just before the mark)."""
    lead = _LEAD.search(before)
    cut = _expression_start(before, lead.start())
    removed = before[cut : lead.start()]
    space = removed[: len(removed) - len(removed.lstrip(" \t"))] if removed else lead.group(1)
    return cut, space, lead


def _operation(step: Operation, space: str) -> str:
    """`step` written as an expression ("84 + 5"), a negative right operand in parentheses."""
    right = canonical_number(step.right)
    return f"{canonical_number(step.left)}{space}{step.op}{space}{right if step.right >= 0 else f'({right})'}"


def _in_expression(text: str, j: int) -> bool:
    """Whether `text[j]` can belong to a written expression: a comma or point
    only inside a number ("1,000", "0.5", not "so, 5" or "5. Then"), an "x"
    only as a multiplication sign between spaces or digits ("3 x 4", not
    "box" or the unknown in "x=")."""
    c = text[j]
    before = text[j - 1] if j > 0 else " "
    after = text[j + 1] if j + 1 < len(text) else " "
    if c.isdigit() or c in " \t+-*/()$€£¢%×÷–":  # noqa: RUF001 (GSM8K writes times signs, en dashes)
        return True
    if c == ",":
        return before.isdigit() and after.isdigit()
    if c == ".":
        return after.isdigit()
    if c in "xX":
        return all(n.isdigit() or n in " \t" for n in (before, after))
    return False


@dataclass(frozen=True)
class SFTExample:
    """One supervised sequence: prompt, then answer with latent slots, then EOS.

    `latent_mask` is True at latent slots, whose `input_ids` entry is the pad id
    (never read: the slot's input is the previous hidden state). The answer
    starts at `prompt_length`. `next_step_mask` is True at the answer tokens
    that follow a latent block, up to and including the first token holding a
    newline (or to the next block or EOS): the tokens of the step that the
    latents should help predict, whose loss measures the latent gain. Masks
    mark target positions: the token at `i` is predicted from position `i - 1`.
    `anchors` are the positions a written chain lines up with a latent one's
    blocks (`rlatent.sft.distill`); `slot_chains`, per latent slot in order,
    the written tokens that slot stands for (`rlatent.sft.compress`); both
    empty elsewhere.
    """

    input_ids: list[int]
    latent_mask: list[bool]
    prompt_length: int
    next_step_mask: list[bool]
    anchors: tuple[int, ...] = ()
    slot_chains: tuple[tuple[int, ...], ...] = ()


def format_prompt(question: str, tokenizer) -> list[int]:
    """Prompt token ids: the chat template with one user message when the
    tokenizer has one, else `PLAIN_PROMPT`."""
    if getattr(tokenizer, "chat_template", None) is not None:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes any BOS itself; encoding must not add another.
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(PLAIN_PROMPT.format(question=question))


def answer_lead(tokenizer) -> str:
    """What separates prompt and answer: a space after the plain "Answer:"
    (so the answer's first word tokenises as in text), nothing after a chat
    template's generation prompt."""
    return "" if getattr(tokenizer, "chat_template", None) is not None else " "


def build_example(problem: Problem, tokenizer, k: int | Sequence[int], placement: str = "insert",
                  latent_marks: int | None = None) -> SFTExample:
    """The supervised example for `problem` with `k` latents (`k[i]` at mark i) at each of its first
    `latent_marks` marks (all when None; see `answer_segments`).

    Each text piece is tokenised on its own (no special tokens), so no token
    straddles a latent block.
    """
    eos_id, pad_id = special_token_ids(tokenizer)
    input_ids = format_prompt(problem.question, tokenizer)
    prompt_length = len(input_ids)
    latent_mask = [False] * prompt_length
    next_step_mask = [False] * prompt_length
    in_next_step = False
    for segment in answer_segments(answer_lead(tokenizer) + problem.answer, k, placement, latent_marks):
        if isinstance(segment, int):
            input_ids += [pad_id] * segment
            latent_mask += [True] * segment
            next_step_mask += [False] * segment
            in_next_step = True
            continue
        for token_id in tokenizer.encode(segment, add_special_tokens=False):
            input_ids.append(token_id)
            latent_mask.append(False)
            next_step_mask.append(in_next_step)
            if in_next_step and "\n" in tokenizer.decode([token_id]):
                in_next_step = False
    input_ids.append(eos_id)
    latent_mask.append(False)
    next_step_mask.append(in_next_step)
    return SFTExample(input_ids, latent_mask, prompt_length, next_step_mask)


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(EOS id, pad id), or a `ModelError` naming the one that is missing:
    answers must end in EOS to teach the model to stop, and latent slots
    (and batch padding) need a pad id."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer '{name}' has no EOS token (eos_token_id is None)")
    if tokenizer.pad_token_id is None:
        raise ModelError(f"tokenizer '{name}' has no pad token (pad_token_id is None); set one, e.g. the EOS token")
    return tokenizer.eos_token_id, tokenizer.pad_token_id


def encode_stop_sequences(stops: list[str], tokenizer) -> tuple[tuple[int, ...], ...]:
    """Stop strings as the token-id sequences the sampler matches (each string tokenized alone)."""
    return tuple(tuple(tokenizer.encode(stop, add_special_tokens=False)) for stop in stops if stop)


def render_example(input_ids: list[int], latent_mask: list[bool], tokenizer) -> str:
    """The sequence as text with each latent slot shown as `[z]`, for logs and
    evaluation samples."""
    parts, run = [], []
    for token_id, is_latent in zip(input_ids, latent_mask, strict=True):
        if is_latent:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(LATENT_TEXT)
        else:
            run.append(token_id)
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)
