"""What every task shares: the prompt layout, the chat template, fitting a prompt to a token length.

A task is a ``build(seed, size, params) -> Draft`` function: ``size`` counts the task's filler units
(sentences, distractor words, chapters, documents). ``make_instance`` searches the size whose prompt,
rendered with the model's tokenizer, fills 90-100% of the target length: an estimate from two sizes, then a
bisection, so the whole prompt is tokenised about ten times, not once per unit.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ANSWER_FORMATS = ("tags", "direct")
COMMON_DEFAULTS = {"answer_format": "tags", "chat": True}
LOW_FILL = 0.9
TAGS_EXTRA_TOKENS = 256  # room for reasoning before the tagged answer


class TaskError(ValueError):
    """A task request that cannot be met: unknown task or parameter, bad value, length too short."""


@dataclass
class Draft:
    """One generated prompt before tokenisation: its parts, its answer and how to read a reply."""

    intro: str
    question: str
    title: str
    context: list[tuple[str, bool]]  # pieces in order; True marks a needle / answer piece
    sep: str  # joins the context pieces
    shape: str  # how the answer is to be written, e.g. "the variable names separated by spaces"
    cue: str  # start of the reply in the direct-answer variant
    reference: str | list[str]
    extract: Callable[[str], str | list[str]]
    score: Callable[[Any, Any], float]
    direct_tokens: int  # generation budget of the direct variant
    stop: tuple[str, ...] = ("\n",)  # stop strings of the direct variant
    complete: Callable[[Any], bool] | None = None  # whether an extracted answer needs no more generation
    resolved: dict = field(default_factory=dict)  # parameters the build settled (e.g. a capped count)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its name, metric, default parameters and generator."""

    name: str
    metric: str  # "exact", "iou", "f1"
    description: str
    defaults: dict
    build: Callable[[int, int, dict], Draft]
    min_size: Callable[[dict], int] = lambda params: 0


@dataclass
class TaskInstance:
    """One generated sample: the exact model input, its reference answer, and how to score a reply."""

    name: str
    params: dict
    seed: int
    length: int
    prompt: str  # the user message: question, context, question again, answer instructions
    text: str  # the exact model input as text: chat template (if any) + prompt + answer cue
    input_ids: list[int]
    reference: str | list[str]
    max_new_tokens: int
    answer_spans: list[tuple[int, int]]  # half-open token ranges of the needles / answers in input_ids
    metric: str
    stop: list[str]
    cue: str  # the start of the answer given in the input (direct variant), read together with the reply
    _extract: Callable[[str], str | list[str]] = field(repr=False)
    _score: Callable[[Any, Any], float] = field(repr=False)
    _complete: Callable[[Any], bool] | None = field(default=None, repr=False)

    def extract(self, text: str) -> str | list[str]:
        """The answer found in a model's reply (the text generated after ``input_ids``)."""
        return self._extract(self.cue + text)

    def score(self, text: str) -> float:
        """The task metric of a model's reply, in [0, 1]."""
        return float(self._score(self.extract(text), self.reference))

    def stopped(self, reply: str) -> bool:
        """Whether generation may stop: the reply, past its leading whitespace, contains a stop string, or
        already holds a complete answer (tasks with several answers, such as niah)."""
        if any(stop in reply.lstrip() for stop in self.stop):
            return True
        return self._complete is not None and self._complete(self.extract(reply))

    def describe(self) -> dict:
        """JSON-able summary (what a trace stores as its task attributes, without the model's answer)."""
        return {"name": self.name, "params": self.params, "seed": self.seed, "length": self.length,
                "n_tokens": len(self.input_ids), "reference": self.reference, "metric": self.metric,
                "max_new_tokens": self.max_new_tokens, "answer_spans": [list(s) for s in self.answer_spans]}


def rng(seed: int, task: str, stream: str) -> random.Random:
    """A generator for one independent stream of a task's randomness (string seeds hash deterministically)."""
    return random.Random(f"{task}:{seed}:{stream}")


def spread(depths: list[float], n: int) -> list[int]:
    """Insertion points in a list of ``n`` filler units for needles at relative depths in [0, 1)."""
    return [min(n, int(d * (n + 1))) for d in depths]


def interleave(filler: list[str], needles: list[tuple[int, str, bool]]) -> list[tuple[str, bool]]:
    """Filler pieces with (index, text, is_answer) needles inserted before the given filler indices."""
    out: list[tuple[str, bool]] = []
    ordered = sorted(enumerate(needles), key=lambda t: (t[1][0], t[0]))  # ties keep the needles' order
    j = 0
    for i, piece in enumerate(filler + [None]):
        while j < len(ordered) and ordered[j][1][0] <= i:
            out.append((ordered[j][1][1], ordered[j][1][2]))
            j += 1
        if piece is not None:
            out.append((piece, False))
    return out


def compose(draft: Draft, answer_format: str) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the character spans of its needle pieces."""
    if answer_format == "tags":
        how = (f"Think step by step if needed, then give your final answer inside <answer></answer> tags, "
               f"as {draft.shape}.")
    else:
        how = f"Answer directly with {draft.shape}, and nothing else."
    question = "Question:" + ("" if draft.question.startswith("\n") else " ") + draft.question
    head = f"{draft.intro}\n\n{question}\n\n[{draft.title}]\n"
    parts, spans, pos = [head], [], len(head)
    for i, (piece, is_needle) in enumerate(draft.context):
        if i:
            parts.append(draft.sep)
            pos += len(draft.sep)
        if is_needle:
            spans.append((pos + len(piece) - len(piece.lstrip()), pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    parts.append(f"\n[End of {draft.title.lower()}]\n\n{question}\n{how}")
    return "".join(parts), spans


def render(tokenizer, prompt: str, cue: str, chat: bool) -> tuple[str, int, list[int], list[tuple[int, int]]]:
    """Model input text, where the prompt starts in it, token ids and token character offsets."""
    if chat and getattr(tokenizer, "chat_template", None):
        sentinel = "\x00PROMPT\x00"
        shell = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                              add_generation_prompt=True)
        before, after = shell.split(sentinel)
        text = before + prompt + after + cue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start = len(before)
    else:
        text = prompt + "\n\n" + cue
        enc = tokenizer(text, return_offsets_mapping=True)
        start = 0
    return text, start, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def token_spans(char_spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open token ranges covering character spans, from a tokeniser's offset mapping."""
    ends = [e for _, e in offsets]
    starts = [s if e > s else e for s, e in offsets]
    out = []
    for cs, ce in char_spans:
        first = bisect.bisect_right(ends, cs)
        last = bisect.bisect_left(starts, ce, lo=first)
        out.append((first, max(last, first + 1)))
    return out


def coerce(params: dict, defaults: dict, task: str) -> dict:
    """Defaults overridden by the given parameters, each converted to its default's type (CLI strings)."""
    out = dict(defaults)
    for key, value in params.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise TaskError(f"task {task!r} has no parameter {key!r} (known: {known})")
        kind = type(defaults[key])
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            else:
                value = kind(value)
        except (TypeError, ValueError):
            kind_name = {int: "an integer", bool: "true or false", str: "a string"}.get(kind, kind.__name__)
            raise TaskError(f"parameter {key!r} of task {task!r} must be {kind_name}, got {value!r}") from None
        out[key] = value
    if out["answer_format"] not in ANSWER_FORMATS:
        raise TaskError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {out['answer_format']!r}")
    for key, value in out.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise TaskError(f"parameter {key!r} of task {task!r} must not be negative, got {value}")
    return out


def make_instance(spec: TaskSpec, tokenizer, length: int, seed: int, params: dict) -> TaskInstance:
    """Generate a task sample whose model input fills 90-100% of ``length`` tokens of this tokenizer."""
    if int(length) != length or length < 1:
        raise TaskError(f"length must be a positive number of tokens, got {length!r}")
    params = coerce(params, {**COMMON_DEFAULTS, **spec.defaults}, spec.name)
    direct = params["answer_format"] == "direct"
    tried: dict[int, tuple] = {}

    def attempt(size: int) -> int:
        if size not in tried:
            draft = spec.build(seed, size, params)
            prompt, spans = compose(draft, params["answer_format"])
            tried[size] = (draft, prompt, spans, *render(tokenizer, prompt, draft.cue if direct else "",
                                                          params["chat"]))
        return len(tried[size][5])

    lo = spec.min_size(params)
    if attempt(lo) > length:
        raise TaskError(f"length {length} is too short for task {spec.name!r} with these parameters: "
                        f"its smallest prompt has {attempt(lo)} tokens")
    probe = lo + 8
    per_unit = max((attempt(probe) - attempt(lo)) / (probe - lo), 1e-3)
    guess = max(lo, lo + int((0.96 * length - attempt(lo)) / per_unit))
    step = max(1, guess // 32)
    if attempt(guess) <= length:  # bracket the answer between a size that fits (lo) and one that does not (hi)
        lo, hi = guess, guess + step
        while attempt(hi) <= length:
            lo, hi, step = hi, hi + 2 * step, 2 * step
    else:
        hi = guess
        while hi - step > lo and attempt(hi - step) > length:
            hi, step = hi - step, 2 * step
        lo = max(lo, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid) <= length:
            lo = mid
        else:
            hi = mid
    draft, prompt, spans, text, start, ids, offsets = tried[lo]
    if len(ids) < LOW_FILL * length:
        raise TaskError(f"task {spec.name!r} could not fill {LOW_FILL:.0%} of {length} tokens "
                        f"(best {len(ids)}); try a longer length")
    answer_spans = token_spans([(s + start, e + start) for s, e in spans], offsets)
    return TaskInstance(
        name=spec.name, params={**params, **draft.resolved}, seed=seed, length=int(length), prompt=prompt,
        text=text, input_ids=ids, reference=draft.reference,
        max_new_tokens=draft.direct_tokens + (0 if direct else TAGS_EXTRA_TOKENS),
        answer_spans=answer_spans, metric=spec.metric,
        stop=list(draft.stop) if direct else ["</answer>"], cue=draft.cue if direct else "",
        _extract=draft.extract, _score=draft.score, _complete=draft.complete if direct else None)
