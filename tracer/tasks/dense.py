"""Dense greedy generation of a task's answer with transformers: the baseline every sparse result is compared with."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from . import TaskInstance, make_task


class _StopAfterAnswer(StoppingCriteria):
    """Stops once the task says the reply so far is complete (``TaskInstance.stopped``)."""

    def __init__(self, tokenizer, inst: TaskInstance):
        self.tokenizer, self.inst = tokenizer, inst

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> bool:
        reply = self.tokenizer.decode(input_ids[0, len(self.inst.input_ids):], skip_special_tokens=True)
        return self.inst.stopped(reply)


@torch.inference_mode()
def generate_reply(net, tokenizer, inst: TaskInstance, max_new_tokens: int | None = None) -> str:
    """The model's greedy reply to a task instance (the text generated after ``inst.input_ids``)."""
    device = next(net.parameters()).device
    ids = torch.tensor([inst.input_ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = net.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad,
                       max_new_tokens=max_new_tokens or inst.max_new_tokens, top_p=None, top_k=None,
                       temperature=None, stopping_criteria=StoppingCriteriaList(
                           [_StopAfterAnswer(tokenizer, inst)]))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate(net, tokenizer, task: str, length: int, samples: int, seed: int = 0, params: dict | None = None,
             max_new_tokens: int | None = None) -> Iterator[dict]:
    """Score the model densely on ``samples`` instances of a task (seeds ``seed``, ``seed + 1``, ...), one
    record per sample as it finishes."""
    for s in range(seed, seed + samples):
        inst = make_task(task, tokenizer, length, seed=s, **(params or {}))
        start = time.perf_counter()
        reply = generate_reply(net, tokenizer, inst, max_new_tokens)
        yield {"task": task, "seed": s, "length": length, "n_tokens": len(inst.input_ids), "params": inst.params,
               "reference": inst.reference, "reply": reply, "answer": inst.extract(reply),
               "score": inst.score(reply), "seconds": round(time.perf_counter() - start, 2)}
