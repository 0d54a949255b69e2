"""RULER-style synthetic tasks: needle in a haystack (niah), variable tracking (vt), common words (cwe)."""

from __future__ import annotations

import re
import string
from functools import partial

from .base import Draft, TaskError, TaskSpec, interleave, rng, spread
from .filler import prose_sentences, words
from .scoring import answer_region, iou

_ALNUM = string.ascii_lowercase + string.digits
_KV = re.compile(r"\b[a-z0-9]{8}(?:-[a-z0-9]{8}){3}\b")
_VAR = re.compile(r"\b[A-Z]{5}\b")


def prose(seed: int, task: str, n: int) -> list[str]:
    """``n`` filler sentences: the standard-library prose pool in a seeded order, repeated when exhausted."""
    pool = list(prose_sentences())
    rng(seed, task, "filler").shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def _kv(gen) -> str:
    return "-".join("".join(gen.choices(_ALNUM, k=8)) for _ in range(4))


def _kv_sentence(key: str, value: str) -> str:
    return f"The value for key {key} is: {value}."


def _niah_extract(text: str, asked: list[str]) -> list[str]:
    """One value per asked key: the first value written after the key on its line; when the reply names
    no key at all, the values it lists, in order."""
    region = answer_region(text).lower()
    out = []
    for key in asked:
        found = ""
        for line in region.splitlines():
            pos = line.find(key)
            if pos >= 0:
                values = [v for v in _KV.findall(line[pos + len(key):]) if v not in asked]
                if values:
                    found = values[0]
                    break
        out.append(found)
    if not any(key in region for key in asked):
        values = [v for v in _KV.findall(region) if v not in asked]
        out = (values + [""] * len(asked))[:len(asked)]
    return out


def _mean_exact(prediction: list[str], reference: list[str]) -> float:
    return sum(p == r for p, r in zip(prediction, reference, strict=True)) / len(reference)


def build_niah(seed: int, size: int, p: dict) -> Draft:
    """Keys among random key-value pairs (or prose): the values of ``n_keys`` keys, exact match per key."""
    if p["n_keys"] < 1:
        raise TaskError("n_keys must be at least 1")
    if p["haystack"] not in ("pairs", "text"):
        raise TaskError(f"haystack must be 'pairs' or 'text', got {p['haystack']!r}")
    gen = rng(seed, "niah", "needles")
    keys, values = [], []
    while len(keys) < p["n_keys"]:
        key, value = _kv(gen), _kv(gen)
        if key not in keys and value not in values:
            keys.append(key)
            values.append(value)
    depths = [gen.random() for _ in keys]
    asked = list(range(len(keys)))
    gen.shuffle(asked)
    if p["haystack"] == "pairs":
        fill_gen, used, filler = rng(seed, "niah", "filler"), set(keys) | set(values), []
        while len(filler) < size:
            key, value = _kv(fill_gen), _kv(fill_gen)
            if key not in used and value not in used:
                used |= {key, value}
                filler.append(_kv_sentence(key, value))
    else:
        filler = prose(seed, "niah", size)
    needles = [(pos, _kv_sentence(k, v), True) for pos, k, v in zip(spread(depths, size), keys, values, strict=True)]
    asked_keys = [keys[i] for i in asked]
    if len(asked_keys) == 1:
        question = f"What is the value for the key {asked_keys[0]}?"
    else:
        question = f"What are the values for the keys {', '.join(asked_keys[:-1])} and {asked_keys[-1]}?"
    return Draft(
        intro="The text below contains records of the form 'The value for key KEY is: VALUE.' "
              "Find the values of the keys asked for.",
        question=question, title="Text", context=interleave(filler, needles), sep=" ",
        shape="one line per key, in the order asked, written as 'The value for key KEY is: VALUE.'",
        cue=f"The value for key {asked_keys[0]} is:", reference=[values[i] for i in asked],
        extract=partial(_niah_extract, asked=asked_keys), score=_mean_exact, direct_tokens=64 * len(keys),
        stop=("\n\n",), complete=all)


def _vt_extract(text: str) -> list[str]:
    return list(dict.fromkeys(_VAR.findall(answer_region(text))))


def build_vt(seed: int, size: int, p: dict) -> Draft:
    """Chains of variable assignments among prose: every variable holding the asked value, IoU."""
    n_chains, n_hops = p["n_chains"], p["n_hops"]
    if n_chains < 1 or n_hops < 1:
        raise TaskError("n_chains and n_hops must be at least 1")
    gen = rng(seed, "vt", "chains")
    names: list[str] = []
    while len(names) < n_chains * (n_hops + 1):
        name = "".join(gen.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    values = gen.sample(range(10000, 100000), n_chains)
    needles, target = [], []
    for c in range(n_chains):
        chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
        links = zip(chain, chain[1:], strict=False)
        lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in links]
        depths = sorted(gen.random() for _ in lines)
        # only the asked chain (the first) is an answer; the other chains are distractors
        needles += [(pos, line, c == 0) for pos, line in zip(spread(depths, size), lines, strict=True)]
        if c == 0:
            target = chain
    return Draft(
        intro="The text below hides variable assignments. 'VAR name = number.' gives a variable a number; "
              "'VAR name = VAR other.' gives it the value of the other variable.",
        question=f"Which variables are assigned the value {values[0]}, directly or through other variables?",
        title="Text", context=interleave(prose(seed, "vt", size), needles), sep=" ",
        shape="the variable names separated by spaces",
        cue=f"The variables assigned the value {values[0]} are:", reference=target, extract=_vt_extract,
        score=iou, direct_tokens=8 * (n_hops + 1) + 16, stop=("\n\n",))


def _cwe_extract(text: str, vocabulary: frozenset[str]) -> list[str]:
    found = re.findall(r"[a-z]+", answer_region(text).lower())
    return list(dict.fromkeys(w for w in found if w in vocabulary))


_CWE_INTRO = "Below is a list of words. Some words occur many more times than the others."
# words of the prompt itself never enter the list, so a reply that echoes the prompt is not mistaken for answers
_CWE_RESERVED = frozenset(re.findall(r"[a-z]+", (_CWE_INTRO + " which words appear most often in the list "
                                                 "answer think step by step if needed then give your final inside "
                                                 "tags as the separated by commas directly with and nothing else "
                                                 "most frequent are question end of").lower()))


def build_cwe(seed: int, size: int, p: dict) -> Draft:
    """A list of words where ``n_common`` appear ``common_freq`` times and ``size`` others fewer times; IoU."""
    n_common, freq, d_freq = p["n_common"], p["common_freq"], p["distractor_freq"]
    if n_common < 1 or d_freq < 1 or freq <= d_freq:
        raise TaskError("cwe needs n_common >= 1, distractor_freq >= 1 and common_freq > distractor_freq")
    lists = words()
    pool = sorted((set(lists["nouns"]) | set(lists["adjectives"]) | set(lists["verbs"])) - _CWE_RESERVED)
    common = rng(seed, "cwe", "common").sample(pool, n_common)
    rest = sorted(set(pool) - set(common))
    fill_gen = rng(seed, "cwe", "filler")
    fill_gen.shuffle(rest)
    distractors = rest[:size]
    entries = [w for w in common for _ in range(freq)] + [w for w in distractors for _ in range(d_freq)]
    fill_gen.shuffle(entries)
    chosen = set(common)
    return Draft(
        intro=_CWE_INTRO,
        question=f"Which {n_common} words appear most often in the list?", title="List of words",
        context=[(w, w in chosen) for w in entries], sep="\n", shape="the words separated by commas",
        cue=f"The {n_common} most frequent words are:", reference=common,
        extract=partial(_cwe_extract, vocabulary=frozenset(common) | frozenset(distractors)), score=iou,
        direct_tokens=4 * n_common + 16, stop=("\n\n",))


NIAH = TaskSpec("niah", "exact", "needle in a haystack: the values of several keys among random key-value "
                "pairs (haystack='text': among prose); exact match per key", {"n_keys": 4, "haystack": "pairs"},
                build_niah)
VT = TaskSpec("vt", "iou", "variable tracking: all variables bound to a value through chains of assignments "
              "hidden in prose; IoU", {"n_chains": 8, "n_hops": 4}, build_vt)
CWE = TaskSpec("cwe", "iou", "common-word extraction: the most frequent words of a long list; IoU",
               {"n_common": 10, "common_freq": 30, "distractor_freq": 3}, build_cwe)
