"""Answer extraction and scoring: exact match, intersection over union and token F1.

Small models rarely follow the answer format: they drop the ``<answer>`` tags, open one and never close it,
or keep talking after the answer. Extraction therefore takes the tagged part when there is one and the
whole reply otherwise, and the task extractors look for answer-shaped strings inside it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_OPEN, _CLOSE = "<answer>", "</answer>"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c != "-"})


def answer_region(text: str) -> str:
    """The tagged answer when the reply has one (tags may be unbalanced), otherwise the whole reply."""
    low = text.lower()
    start = low.find(_OPEN)
    if start >= 0:
        body = text[start + len(_OPEN):]
        end = body.lower().find(_CLOSE)
        return (body if end < 0 else body[:end]).strip()
    end = low.find(_CLOSE)
    return (text if end < 0 else text[:end]).strip()


def normalize(text: str) -> str:
    """Lower case, punctuation (except hyphens) and articles removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def iou(prediction: Iterable[str], reference: Iterable[str]) -> float:
    """Intersection over union of two sets of answers (two empty sets score 1.0)."""
    pred, ref = {normalize(p) for p in prediction}, {normalize(r) for r in reference}
    union = pred | ref
    return len(pred & ref) / len(union) if union else 1.0


def f1(prediction: str, reference: str | Iterable[str]) -> float:
    """SQuAD-style token F1 of the normalised strings; the best over several references."""
    if not isinstance(reference, str):
        return max((f1(prediction, r) for r in reference), default=0.0)
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, rec = common / len(pred), common / len(ref)
    return 2 * precision * rec / (precision + rec)


def first_candidate(text: str, candidates: Iterable[str], exclude: Iterable[str] = ()) -> str | None:
    """The candidate phrase mentioned first in the text (whole words, normalised; longest wins a tie)."""
    norm = f" {normalize(text)} "
    skip = {normalize(e) for e in exclude}
    best: tuple[int, int, str] | None = None
    for cand in candidates:
        key = normalize(cand)
        if not key or key in skip:
            continue
        pos = norm.find(f" {key} ")
        if pos >= 0 and (best is None or (pos, -len(key)) < best[:2]):
            best = (pos, -len(key), cand)
    return None if best is None else best[2]


def numbered_answers(text: str) -> dict[int, str]:
    """Answers written as ``N. answer`` (or ``N)``, ``N:``): the text from each number that starts a line up
    to the next one, so an answer may run over several lines; the first block of each number is kept."""
    parts = re.split(r"(?m)^\s*(\d+)\s*[.):]", text)
    out: dict[int, str] = {}
    for number, body in zip(parts[1::2], parts[2::2], strict=True):
        out.setdefault(int(number), body.strip())
    return out


def first_line(text: str) -> str:
    """The first non-empty line, without a trailing period."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip().rstrip(".").strip()
    return ""
