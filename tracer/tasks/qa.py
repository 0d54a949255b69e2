"""Generated-document QA: one gold document among distractor documents; the question names the document.

This is a synthetic stand-in for the paper's QA tasks, labelled ``qa_generated``: the documents are
generated town profiles, not SQuAD, QuALITY or TOEFL-QA passages, and its scores are not theirs.
"""

from __future__ import annotations

import re

from .base import Draft, TaskError, TaskSpec, rng
from .filler import words
from .scoring import answer_region, f1, first_line
from .story import NAMES, OCCUPATIONS, _article

SUFFIXES = ("ford", "bury", "ton", "field", "wick", "stead", "mouth", "dale", "brook", "haven")
COLOUR = ("The streets are narrow and paved with old grey stones.", "Visitors often praise the local bread.",
          "A small museum keeps the records of the town.", "Most houses have red roofs and green shutters.",
          "The old bridge is the most painted sight of the region.", "Fog covers the valley on most mornings.",
          "The railway station was closed many years ago.", "Children swim in the river during the summer.")
QUESTIONS = {
    "river": "on which river does the town lie?",
    "year": "in which year was the town founded?",
    "founder": "who founded the town?",
    "product": "what is the town best known for?",
    "mayor": "who is the mayor of the town?",
    "population": "how many people live in the town?",
}


def _town(gen, lists) -> dict[str, str]:
    """The facts and sentences of one generated town."""
    nouns, adjectives = lists["nouns"], lists["adjectives"]
    name = gen.choice(nouns).capitalize() + gen.choice(SUFFIXES)
    facts = {"name": name, "river": gen.choice(nouns).capitalize(), "year": str(gen.randint(1100, 1899)),
             "founder": f"{gen.choice(NAMES)} {gen.choice(nouns).capitalize()}",
             "product": f"{gen.choice(adjectives)} {gen.choice(nouns)}",
             "mayor": f"{gen.choice(NAMES)} {gen.choice(nouns).capitalize()}",
             "population": str(gen.randint(300, 9999))}
    occupation = _article(gen.choice(OCCUPATIONS))
    facts["sentences"] = [
        ("river", f"{name} is a small town on the banks of the {facts['river']} river."),
        ("year", f"It was founded in the year {facts['year']}."),
        ("founder", f"Its founder was {facts['founder']}, {occupation}."),
        ("colour", gen.choice(COLOUR)),
        ("product", f"The town is best known for its {facts['product']}."),
        ("mayor", f"Today the mayor is {facts['mayor']}."),
        ("population", f"About {facts['population']} people live there."),
    ]
    return facts


def _extract(text: str) -> str:
    return re.sub(r"(?i)^answer\s*:\s*", "", first_line(answer_region(text))).strip()


def build_qa(seed: int, size: int, p: dict) -> Draft:
    """``size`` town documents; a question about one fact of the document it names; token F1."""
    gen, lists = rng(seed, "qa_generated", "documents"), words()
    towns, names = [], set()
    while len(towns) < size:
        town = _town(gen, lists)
        if town["name"] not in names:
            names.add(town["name"])
            towns.append(town)
    ask = rng(seed, "qa_generated", "question")
    gold = min(size - 1, int(ask.random() * size))
    attribute = ask.choice(sorted(QUESTIONS))  # drawn even when given, so the gold document stays the same
    if p["attribute"]:
        if p["attribute"] not in QUESTIONS:
            known = ", ".join(sorted(QUESTIONS))
            raise TaskError(f"attribute must be one of {known} (or empty for a seeded choice), got {p['attribute']!r}")
        attribute = p["attribute"]
    pieces = []
    for i, town in enumerate(towns):
        gap = "" if i == 0 else "\n\n"
        pieces.append((f"{gap}Document {i + 1}: {town['name']}\n", False))
        for j, (kind, sentence) in enumerate(town["sentences"]):
            pieces.append((sentence if j == 0 else " " + sentence, i == gold and kind == attribute))
    return Draft(
        intro="Below are numbered documents, each about one town. Answer the question about the document it "
              "names, using that document only.",
        question=f"In Document {gold + 1}, {QUESTIONS[attribute]}", title="Documents", context=pieces, sep="",
        shape="a short phrase copied from that document", cue="Answer:", reference=towns[gold][attribute],
        extract=_extract, score=f1, direct_tokens=16, resolved={"attribute": attribute})


QA_GENERATED = TaskSpec("qa_generated", "f1", "generated-document QA (synthetic town profiles, not SQuAD/"
                        "QuALITY/TOEFL): one fact of the named document among distractors; token F1", {"attribute": ""},
                        build_qa, lambda p: 1)
