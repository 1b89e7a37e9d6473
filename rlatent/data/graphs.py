"""Synthetic ProsQA-style graph search: is a made-up concept reachable?

The arithmetic task (`rlatent.data.synthetic`) tests latents on computation;
this one tests them on search, the setting where Coconut-style latents are
known to matter (ProsQA): the question states facts about made-up concepts
("Every wumpus is a yimpus."), shuffled, and asks "Is Tom a zorpus?" (or "Is
every wumpus a zorpus?"). The answer walks the chain hop by hop and ends in
`#### Yes` or `#### No`. Training on short chains and evaluating on longer
ones (`min_hops`/`max_hops`) gives an out-of-distribution split.

The graph, a DAG: the asked chain `s -> m1 -> ... -> mh` (s is Tom, or the
concept of "every X"), a decoy chain of the same length and form, and
`distractors` extra facts: dead-end branches off both chains (a fact to a
concept with no facts of its own) and branches into both chains from new
concepts. Nothing leaves the asked chain but its own facts and dead ends, so
the walk is unique: at each concept follow the fact whose concept has facts
of its own, until a concept with none (`mh`). The question asks about `mh`
(Yes) or the decoy's last concept (No), both leaves at the same depth, so
neither the depth nor the shape of the target gives the answer away.

Marks. `rlatent.data.marks` parses `<<expression=result>>` with arithmetic
only, and the mark body never reaches the model (it is stripped, or becomes a
latent block), so each hop carries the mark `<<i=i>>`, i the hop's number:
"Every wumpus is a <<2=2>>yimpus." Every mark parses as it is today, its
value counts hops, and the latents stand where the search decides the next
concept. A hop has no written expression before its result (the rule is the
result), so placements `insert` and `replace` give the same sequence here.
"""

from __future__ import annotations

import random

from rlatent.data.gsm8k import Problem
from rlatent.data.synthetic import PEOPLE

ONSETS = ["b", "d", "f", "g", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
          "br", "gr", "sh", "st", "zh", "bl", "tr"]
VOWELS = "aeiou"
MIDDLES = ["mp", "rp", "mb", "nd", "lk", "rt", "sk", "ng"]
ENDINGS = ["us", "ix", "en", "or"]


def concept_name(rng: random.Random) -> str:
    """A pronounceable nonsense word ("wumpus", "zhorpix"); a consonant first, so "a" always fits."""
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(MIDDLES) + rng.choice(ENDINGS)


def generate_graph_problems(
    n: int, seed: int, min_hops: int = 2, max_hops: int = 4, distractors: int = 4
) -> list[Problem]:
    """`n` problems whose answers walk `min_hops`..`max_hops` marked hops,
    each question stating both chains and `distractors` extra facts.
    Same `seed`, same problems: all randomness comes from one `random.Random`."""
    if n < 0 or not 1 <= min_hops <= max_hops or distractors < 0:
        raise ValueError(
            "need n >= 0, 1 <= min_hops <= max_hops and distractors >= 0; "
            f"got n={n}, min_hops={min_hops}, max_hops={max_hops}, distractors={distractors}"
        )
    rng = random.Random(seed)
    return [_problem(rng, index, rng.randint(min_hops, max_hops), distractors) for index in range(n)]


def _problem(rng: random.Random, index: int, hops: int, distractors: int) -> Problem:
    person = rng.random() < 0.5  # "Is Tom a zorpus?" or "Is every wumpus a zorpus?"
    yes = rng.random() < 0.5
    names = _Names(rng)
    people = rng.sample(PEOPLE, 2)
    chain = [people[0][0] if person else names.new()] + [names.new() for _ in range(hops)]
    decoy = [people[1][0] if person else names.new()] + [names.new() for _ in range(hops)]
    facts = list(zip(chain, chain[1:])) + list(zip(decoy, decoy[1:]))
    facts += _distractors(rng, names, chain, decoy, distractors, set(facts))
    rng.shuffle(facts)

    people_names = {chain[0], decoy[0]} if person else set()
    question = " ".join(_fact(u, v, u in people_names) for u, v in facts)
    subject = chain[0] if person else f"every {chain[0]}"
    target = chain[-1] if yes else decoy[-1]
    question += f" Is {subject} a {target}?"
    answer = [_fact(u, v, u in people_names, mark=i) for i, (u, v) in enumerate(zip(chain, chain[1:]), 1)]
    if yes:
        answer.append(f"So {subject} is a {target}.")
    elif person:
        answer.append(f"So {subject} is not a {target}.")
    else:
        answer.append(f"So not {subject} is a {target}.")
    answer.append("#### " + ("Yes" if yes else "No"))
    return Problem(question, "\n".join(answer), "Yes" if yes else "No", f"graph:{index}")


def _fact(u: str, v: str, person: bool, mark: int | None = None) -> str:
    """ "Tom is a wumpus." or "Every wumpus is a yimpus.", with the hop's mark before the new concept."""
    marked = v if mark is None else f"<<{mark}={mark}>>{v}"
    return f"{u} is a {marked}." if person else f"Every {u} is a {marked}."


class _Names:
    """Concept names, each new one unused in this problem."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def new(self) -> str:
        while (name := concept_name(self.rng)) in self.used:
            pass
        self.used.add(name)
        return name


def _distractors(rng, names, chain, decoy, count, existing) -> list[tuple[str, str]]:
    """`count` facts that leave the walk from `chain[0]` unique and ending at `chain[-1]`:

    - a dead end: a fact from a chain concept before the last hop to a leaf (a
      concept with no facts of its own), off the asked and the decoy chain alike;
    - a branch in: a fact from a concept outside both chains (new, or one such
      already used) to a concept of either chain after its start, or to a leaf.

    The walk then follows, at each concept, the one fact whose concept has facts
    of its own; at the last hop there is only one fact.
    """
    hops = len(chain) - 1
    # Chain concepts before the last hop: the walk's choice there must not be a leaf ending.
    forks = chain[: hops - 1] + decoy[: hops - 1]
    inside = chain[1:] + decoy[1:]
    leaves: list[str] = []
    origins: list[str] = []
    facts: list[tuple[str, str]] = []
    while len(facts) < count:  # ends: a new concept, drawn with probability >= 0.7 in each branch, is a new fact
        if forks and rng.random() < 0.5:
            u = rng.choice(forks)
            v = rng.choice(leaves) if leaves and rng.random() < 0.3 else None
        else:
            u = rng.choice(origins) if origins and rng.random() < 0.3 else None
            v = rng.choice(inside + leaves)
        if (u, v) in existing:
            continue
        if u is None:
            u = names.new()
            origins.append(u)
        if v is None:
            v = names.new()
            leaves.append(v)
        existing.add((u, v))
        facts.append((u, v))
    return facts
