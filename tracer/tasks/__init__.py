"""Long-context tasks generated locally at any token length, with answer extraction and scoring.

    from sparse_frontier.tracer.tasks import TASKS, make_task
    inst = make_task("niah", tokenizer, 8192, seed=0, answer_format="direct")
    inst.input_ids, inst.reference, inst.answer_spans, inst.score(reply)

Tasks (ALGORITHMS.md, "The paper's nine tasks"): niah, vt, cwe (RULER-style), story_retrieval,
story_multihop, story_filtering (generated narratives) and qa_generated (generated documents; a stand-in
for the paper's QA data sets, not those data sets).
"""

from __future__ import annotations

from .base import ANSWER_FORMATS, COMMON_DEFAULTS, TaskError, TaskInstance, TaskSpec, make_instance
from .qa import QA_GENERATED
from .ruler import CWE, NIAH, VT
from .story import STORY_FILTERING, STORY_MULTIHOP, STORY_RETRIEVAL

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    NIAH, VT, CWE, STORY_RETRIEVAL, STORY_MULTIHOP, STORY_FILTERING, QA_GENERATED)}


def get_task(name: str) -> TaskSpec:
    """The registered task of this name."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_defaults(name: str) -> dict:
    """All parameters of a task with their default values (the common ones included)."""
    return {**COMMON_DEFAULTS, **get_task(name).defaults}


def make_task(name: str, tokenizer, length: int, seed: int = 0, **params) -> TaskInstance:
    """A sample of task ``name`` filling 90-100% of ``length`` tokens of ``tokenizer``; deterministic per seed."""
    return make_instance(get_task(name), tokenizer, length, seed, params)


__all__ = ["ANSWER_FORMATS", "TASKS", "TaskError", "TaskInstance", "TaskSpec", "get_task", "make_task",
           "task_defaults"]
