"""The ProsQA-style graph-search generator: right answers (checked by an independent BFS over the
stated facts), hop counts, marks that the existing placement machinery turns into one block per hop."""

import re
from collections import deque

import pytest

from rlatent.data.examples import answer_segments, build_example
from rlatent.data.graphs import generate_graph_problems
from rlatent.data.marks import answers_match, extract_final_answer, parse_marks, strip_marks

FACT = re.compile(r"(?:Every ([a-z]+)|([A-Z][a-z]+)) is a ([a-z]+)\.")
QUESTION = re.compile(r"Is (?:every )?([A-Za-z]+) a ([a-z]+)\?$")


def facts_of(question: str) -> dict[str, list[str]]:
    """The stated facts as a graph: concept (or person) -> the concepts it is."""
    graph: dict[str, list[str]] = {}
    for every, person, what in FACT.findall(question):
        graph.setdefault(every or person, []).append(what)
    return graph


def reachable(graph: dict[str, list[str]], start: str) -> set[str]:
    seen, queue = {start}, deque([start])
    while queue:
        for nxt in graph.get(queue.popleft(), []):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def test_same_seed_same_problems():
    a = generate_graph_problems(30, seed=3)
    assert a == generate_graph_problems(30, seed=3)
    assert a != generate_graph_problems(30, seed=4)
    assert [p.source for p in a[:3]] == ["graph:0", "graph:1", "graph:2"]


@pytest.mark.parametrize("min_hops, max_hops, distractors", [(1, 1, 0), (2, 4, 4), (3, 6, 10)])
def test_answers_are_right_and_hops_in_range(min_hops, max_hops, distractors):
    problems = generate_graph_problems(200, seed=0, min_hops=min_hops, max_hops=max_hops, distractors=distractors)
    for p in problems:
        graph = facts_of(p.question)
        subject, target = QUESTION.search(p.question).groups()
        assert p.final_answer == ("Yes" if target in reachable(graph, subject) else "No"), p.source
        assert p.answer.endswith(f"\n#### {p.final_answer}")
        marks = parse_marks(p.answer, where=p.source)
        hops = len(marks)
        assert min_hops <= hops <= max_hops
        assert [m.value for m in marks] == list(range(1, hops + 1))
        assert sum(len(v) for v in graph.values()) == 2 * hops + distractors  # both chains and the extra facts
        # The walk: each hop a stated fact, from the subject to a concept with no facts of its own.
        walk = [subject] + [FACT.search(line).group(3) for line in strip_marks(p.answer).split("\n")[:hops]]
        for u, v in zip(walk, walk[1:]):
            assert v in graph[u], p.source
            assert sum(1 for w in graph[u] if w in graph) == (u != walk[-2]), p.source  # the unique way on
        assert walk[-1] not in graph and target not in graph  # both candidates are leaves
        assert (walk[-1] == target) == (p.final_answer == "Yes")
        assert len(set(walk)) == len(walk)


def test_facts_form_a_dag_of_pronounceable_names():
    for p in generate_graph_problems(100, seed=1, min_hops=3, max_hops=5, distractors=8):
        graph = facts_of(p.question)
        for node in graph:
            for other in graph[node]:
                assert node not in reachable(graph, other), f"{p.source}: cycle through {node}"
        concepts = {c for vs in graph.values() for c in vs} | {c for c in graph if c.islower()}
        assert all(re.fullmatch(r"[bdfgjklmnprstvwyz][a-z]*[aeiou][a-z]*", c) for c in concepts)


def test_yes_and_no_are_balanced():
    problems = generate_graph_problems(200, seed=0)
    yes = sum(p.final_answer == "Yes" for p in problems)
    assert 80 <= yes <= 120
    assert any("Is every " in p.question for p in problems) and any(re.search(r"Is [A-Z]", p.question) for p in problems)


@pytest.mark.parametrize("placement", ["insert", "replace"])
def test_one_latent_block_per_hop(placement, tiny_tokenizer):
    for p in generate_graph_problems(50, seed=2, min_hops=1, max_hops=5):
        hops = len(parse_marks(p.answer))
        segments = answer_segments(p.answer, k=2, placement=placement)
        assert [s for s in segments if isinstance(s, int)] == [2] * hops
        assert "".join(s for s in segments if isinstance(s, str)) == strip_marks(p.answer)
        # Each block stands right before a hop's new concept, whose space moved after the block.
        for before, block, after in zip(segments, segments[1:], segments[2:]):
            if isinstance(block, int):
                assert before.endswith(" is a") and re.match(r" [a-z]+\.", after)
        example = build_example(p, tiny_tokenizer, 2, placement)
        assert sum(example.latent_mask) == 2 * hops
        assert sum(example.next_step_mask) > 0


def test_step_placement_removes_every_hop(tiny_tokenizer):
    """`step`: each hop's line becomes its block (one block for the back-to-back hops), so the conclusion
    follows the latents directly; with k=0 it is no-CoT, the conclusion alone."""
    for p in generate_graph_problems(30, seed=3, min_hops=1, max_hops=5):
        hops = len(parse_marks(p.answer))
        conclusion = p.answer[p.answer.index("So "):]
        assert answer_segments(p.answer, k=2, placement="step") == [2 * hops, conclusion]
        assert answer_segments(p.answer, k=0, placement="step") == [conclusion]
        example = build_example(p, tiny_tokenizer, 2, "step")
        assert sum(example.latent_mask) == 2 * hops and sum(example.next_step_mask) > 0


def test_validation():
    with pytest.raises(ValueError, match="min_hops"):
        generate_graph_problems(1, seed=0, min_hops=3, max_hops=2)
    with pytest.raises(ValueError, match="distractors"):
        generate_graph_problems(1, seed=0, distractors=-1)


def test_yes_no_answers_are_graded():
    for p in generate_graph_problems(20, seed=0):
        assert extract_final_answer(p.answer) == p.final_answer
        assert answers_match(extract_final_answer(p.answer), p.final_answer)
        other = "No" if p.final_answer == "Yes" else "Yes"
        assert not answers_match(extract_final_answer(p.answer), other)
