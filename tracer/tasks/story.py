"""Procedurally generated chapter narratives and the three story tasks: retrieval, multi-hop, filtering.

Each chapter sends the protagonist to one location, where they meet one character and buy one item (in
the filtering task a few chapters have no purchase); sometimes they also sell an item bought earlier.
Names, occupations and places are small word lists written here; items and place adjectives come from
wonderwords' word lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial

from .base import Draft, TaskError, TaskSpec, rng
from .filler import words
from .scoring import answer_region, exact_match, first_candidate, iou, numbered_answers

NAMES = (
    "Abel", "Ada", "Alba", "Anton", "Bea", "Bruno", "Carmen", "Cyril", "Dalia", "Dorian", "Edith", "Elias",
    "Elsa", "Emil", "Fabian", "Flora", "Gideon", "Greta", "Hana", "Hugo", "Ida", "Ivo", "Jasper", "Julia",
    "Karl", "Klara", "Leon", "Lina", "Lorenzo", "Lucia", "Magnus", "Marta", "Milo", "Nadia", "Nico", "Nora",
    "Oskar", "Olga", "Pablo", "Petra", "Quentin", "Rosa", "Rufus", "Sabine", "Silas", "Sonja", "Tobias",
    "Tessa", "Ulric", "Vera", "Viktor", "Wanda", "Xavier", "Yara", "Yusuf", "Zelda", "Zoran", "Greer",
)
OCCUPATIONS = (
    "baker", "blacksmith", "weaver", "fisherman", "carpenter", "potter", "shepherd", "innkeeper", "merchant",
    "tailor", "miller", "cobbler", "herbalist", "scribe", "glassblower", "ferryman", "beekeeper", "jeweller",
    "candlemaker", "apothecary", "cartographer", "stonemason", "brewer", "tanner",
)
PLACES = (
    "market", "harbor", "library", "inn", "bakery", "forge", "tower", "garden", "chapel", "mill", "bridge",
    "square", "theatre", "orchard", "lighthouse", "monastery", "workshop", "tavern", "quarry", "vineyard",
    "observatory", "bathhouse", "museum", "armory", "greenhouse", "stable", "castle", "courtyard",
)

ARRIVE = ("{p} arrived at {loc} early in the morning.", "After a long walk, {p} reached {loc}.",
          "{p} came to {loc} just before noon.", "The road led {p} to {loc}.",
          "In the evening, {p} entered {loc}.")
REASON = ("{p} had heard that travellers often rested there.", "A letter from an old friend had asked {p} to come.",
          "{p} hoped to find news about the northern roads.", "The weather had turned, and {p} needed shelter.",
          "Rumours of a coming festival had drawn {p} there.", "{p} was curious about the place.")
MEET = ("There {p} met {c}, {occ}.", "Inside, {p} was greeted by {c}, {occ}.",
        "{p} soon got talking with {c}, who worked as {occ}.")
TALK = ("They spoke for a while about the harvest and the price of bread.",
        "{c} told a long story about a storm many years ago.", "{p} asked about the safest road to the coast.",
        "They shared a pot of tea and laughed about old mistakes.",
        "{c} complained that the winter had been hard on everyone.",
        "{p} listened to the gossip of the town with great interest.",
        "{c} explained how the trade had changed over the years.")
BUY = ("{p} bought the {item} from {c}.", "Before leaving, {p} purchased the {item} from {c}.",
       "{p} paid {c} {coins} coins for the {item}.")
NO_BUY = ("{p} looked over the goods but bought nothing.", "Nothing caught the eye of {p}, who bought nothing.",
          "{p} decided to buy nothing that day.")
SELL = ("{p} also sold the {item} to {c}.", "{p} sold the {item} to {c} for a few coins.")
FAREWELL = ("{p} thanked {c} and said goodbye.", "{c} waved as {p} set off again.", "They parted as friends.")
END = ("The sun was setting when {p} left {loc}.", "That night {p} slept soundly.", "The day ended quietly.")
INTRO = "Below is a story in numbered chapters about the travels of {p}."


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass
class Chapter:
    """One chapter: its facts and its sentences, each labelled with what it states."""

    number: int
    location: str
    character: str
    bought: str | None
    sold: str | None
    sentences: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)


def make_story(seed: int, task: str, n: int, protagonist: str, no_purchase: set[int]) -> list[Chapter]:
    """``n`` chapters; every chapter buys a new item except those in ``no_purchase``."""
    gen = rng(seed, task, "story")
    lists = words()
    seen_items: set[str] = set()
    owned: list[str] = []
    chapters = []
    for number in range(1, n + 1):
        loc = f"the {gen.choice(lists['adjectives'])} {gen.choice(PLACES)}"
        char = gen.choice(NAMES)
        fill = {"p": protagonist, "loc": loc, "c": char, "occ": _article(gen.choice(OCCUPATIONS))}
        says = [("arrive", gen.choice(ARRIVE)), ("reason", gen.choice(REASON)), ("meet", gen.choice(MEET))]
        says += [("talk", t) for t in gen.sample(TALK, 2)]
        bought = sold = None
        if number in no_purchase:
            says.append(("no_buy", gen.choice(NO_BUY)))
        else:
            while bought is None or bought in seen_items:
                bought = f"{gen.choice(lists['adjectives'])} {gen.choice(lists['nouns'])}"
            seen_items.add(bought)
            says.append(("buy", gen.choice(BUY)))
        if owned and gen.random() < 0.4:
            sold = owned.pop(gen.randrange(len(owned)))
            says.append(("sell", gen.choice(SELL)))
        if bought:
            owned.append(bought)
        says += [("farewell", gen.choice(FAREWELL)), ("end", gen.choice(END))]
        chapter = Chapter(number, loc, char, bought, sold)
        for kind, template in says:
            item = sold if kind == "sell" else bought
            text = template.format(**fill, item=item, coins=gen.randint(2, 40))
            chapter.sentences.append((kind, text[0].upper() + text[1:]))
        chapters.append(chapter)
    return chapters


def story_pieces(chapters: list[Chapter], marked: set[tuple[int, str]]) -> list[tuple[str, bool]]:
    """Context pieces (joined without separator); sentences whose (chapter, kind) is in ``marked`` are answers."""
    pieces = []
    for ch in chapters:
        gap = "" if ch.number == 1 else "\n\n"
        pieces.append((f"{gap}Chapter {ch.number}.\n", False))
        for i, (kind, text) in enumerate(ch.sentences):
            pieces.append((text if i == 0 else " " + text, (ch.number, kind) in marked))
    return pieces


def _check_protagonist(name: str) -> None:
    if not name or not name.isalpha() or name in NAMES:
        raise TaskError(f"protagonist must be one alphabetic name not among the characters, got {name!r}")


def _retrieval_extract(text: str, kinds: list[str], candidates: dict[str, list[str]]) -> list[str]:
    """Per question, the first place, person or item (of the asked kind) named in its numbered answer."""
    answers = numbered_answers(answer_region(text))
    out = []
    for i, kind in enumerate(kinds, start=1):
        block = answers.get(i, "")
        out.append(first_candidate(block, candidates[kind]) or (block.splitlines() or [""])[0])
    return out


def _mean_exact(prediction: list[str], reference: list[str]) -> float:
    return sum(exact_match(p, r) for p, r in zip(prediction, reference, strict=True)) / len(reference)


def build_retrieval(seed: int, size: int, p: dict) -> Draft:
    """Questions on the location, character or item of given chapters; exact match per question."""
    _check_protagonist(p["protagonist"])
    if p["n_questions"] < 1:
        raise TaskError("n_questions must be at least 1")
    chapters = make_story(seed, "story_retrieval", size, p["protagonist"], set())
    gen = rng(seed, "story_retrieval", "questions")
    n_q = min(p["n_questions"], size)
    asked = gen.sample(chapters, n_q)
    kinds = [gen.choice(("location", "character", "item")) for _ in asked]
    pr = p["protagonist"]
    wording = {"location": "Which place did {p} visit in Chapter {n}?",
               "character": "Whom did {p} meet in Chapter {n}?", "item": "What did {p} buy in Chapter {n}?"}
    pairs = list(zip(asked, kinds, strict=True))
    questions = [f"{i}. " + wording[k].format(p=pr, n=ch.number) for i, (ch, k) in enumerate(pairs, 1)]
    fact = {"location": "arrive", "character": "meet", "item": "buy"}
    reference = [{"location": ch.location, "character": ch.character, "item": ch.bought}[k]
                 for ch, k in pairs]
    candidates = {"location": sorted({c.location for c in chapters}),
                  "character": sorted({c.character for c in chapters}),
                  "item": sorted({c.bought for c in chapters if c.bought})}
    return Draft(
        intro=INTRO.format(p=pr) + " Answer the numbered questions about it.",
        question="\n" + "\n".join(questions), title="Story",
        context=story_pieces(chapters, {(ch.number, fact[k]) for ch, k in pairs}), sep="",
        shape="one numbered line per question, giving only the place, person or item", cue="1.",
        reference=reference, extract=partial(_retrieval_extract, kinds=kinds, candidates=candidates),
        score=_mean_exact, direct_tokens=12 * n_q + 8, stop=("\n\n",), resolved={"n_questions": n_q})


def _item_extract(text: str, items: list[str], target: str, cue: str) -> str:
    """The first item other than the named one; else the named one itself; else the first line."""
    region = answer_region(text.removeprefix(cue))
    found = first_candidate(region, items, exclude=[target]) or first_candidate(region, [target])
    return found if found is not None else (region.splitlines() or [""])[0].strip().rstrip(".")


def build_multihop(seed: int, size: int, p: dict) -> Draft:
    """Which item was bought just before a named item (told in the chapter before its own); exact match."""
    _check_protagonist(p["protagonist"])
    chapters = make_story(seed, "story_multihop", size, p["protagonist"], set())
    gen = rng(seed, "story_multihop", "questions")
    target = gen.randrange(1, size)  # index of the chapter whose item is named; the previous one is the answer
    item, before = chapters[target].bought, chapters[target - 1].bought
    pr = p["protagonist"]
    cue = f"Just before the {item}, {pr} bought the"
    return Draft(
        intro=INTRO.format(p=pr) + " Each purchase is told in the chapter where it happened.",
        question=f"Which item did {pr} buy just before buying the {item}?", title="Story",
        context=story_pieces(chapters, {(target + 1, "buy"), (target, "buy")}), sep="",
        shape="only the name of the item", cue=cue, reference=before,
        extract=partial(_item_extract, items=sorted({c.bought for c in chapters}), target=item, cue=cue),
        score=exact_match, direct_tokens=16)


def _chapters_extract(text: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\d+", answer_region(text))))


def build_filtering(seed: int, size: int, p: dict) -> Draft:
    """The chapters in which nothing was bought; IoU."""
    _check_protagonist(p["protagonist"])
    k = p["n_no_purchase"]
    if k < 1:
        raise TaskError("n_no_purchase must be at least 1")
    chosen = sorted(rng(seed, "story_filtering", "questions").sample(range(1, size + 1), k))
    chapters = make_story(seed, "story_filtering", size, p["protagonist"], set(chosen))
    pr = p["protagonist"]
    return Draft(
        intro=INTRO.format(p=pr) + f" In most chapters {pr} buys something, in a few {pr} buys nothing.",
        question=f"In which chapters did {pr} buy nothing?", title="Story",
        context=story_pieces(chapters, {(n, "no_buy") for n in chosen}), sep="",
        shape="the chapter numbers separated by commas", cue=f"{pr} bought nothing in chapters",
        reference=[str(n) for n in chosen], extract=_chapters_extract, score=iou, direct_tokens=4 * k + 12)


STORY_RETRIEVAL = TaskSpec("story_retrieval", "exact", "story retrieval: the place, person or item of given "
                           "chapters of a generated narrative; exact match per question",
                           {"n_questions": 16, "protagonist": "Arion"}, build_retrieval, lambda p: 1)
STORY_MULTIHOP = TaskSpec("story_multihop", "exact", "story multi-hop: the item bought just before a named "
                          "item; exact match", {"protagonist": "Arion"}, build_multihop, lambda p: 2)
STORY_FILTERING = TaskSpec("story_filtering", "iou", "story filtering: the chapters without a purchase; IoU",
                           {"n_no_purchase": 3, "protagonist": "Arion"}, build_filtering,
                           lambda p: p["n_no_purchase"] + 1)
