"""Generation: a reference answer per row (a string, or a list of acceptable ones). Trained on the language-model
loss of the first answer's tokens (plus end-of-sequence); evaluated by greedy decoding after the prompt, cut at the
first newline, and scored by exact match and token F1 (SQuAD normalisation, the best reference counts)."""

from __future__ import annotations

import torch

from ftkit.data.batches import left_truncated
from ftkit.data.dataset import Example, after_prompt, text_list, texts_of
from ftkit.data.files import LINE
from ftkit.devices import model_device
from ftkit.errors import DataError
from ftkit.textmetrics import exact_match, token_f1


def make_example(row: dict, spec, labels: list[str], source: str, task: str) -> Example:
    answers = text_list(row[spec.answer_column], None)
    if not answers or not answers[0]:
        raise DataError(f"{source}: line {row[LINE]}: column '{spec.answer_column}' has no answer")
    return Example(texts=texts_of(row, spec), label=0, answers=answers)


def candidates(task, tokenizer):
    """The first answer as it follows the prompt (ftkit.data.dataset.after_prompt), then end-of-sequence."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return lambda example: [tokenizer(after_prompt(task, example.answers[0]), add_special_tokens=False)["input_ids"]
                            + eos]


def extra_features(example: Example, prompt_ids: list[int], task, tokenizer, max_seq_len: int) -> dict:
    """The prompt to decode from (leaving room for the answer) and the answers to score against."""
    return {"prompt": left_truncated(prompt_ids, task.spec.max_new_tokens, max_seq_len, tokenizer.bos_token_id),
            "answers": list(example.answers)}


def answer_loss(scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """The negative mean log-probability per answer token, averaged over the batch."""
    return -scores[:, 0].mean()


def score(model, indices: list[int], batch: dict, tokenizer) -> dict:
    if tokenizer is None:
        raise ValueError("evaluating a generation task needs the tokenizer")
    predictions = greedy_answers(model, batch["prompt"], tokenizer)
    return {"loss_sum": -model(batch)[:, 0].sum().item(),
            "exact_match": [exact_match(p, a) for p, a in zip(predictions, batch["answers"])],
            "f1": [token_f1(p, a) for p, a in zip(predictions, batch["answers"])]}


def combine(results: list[dict], n: int, num_classes: int) -> dict:
    em = f1 = loss_sum = 0.0
    for r in results:
        loss_sum += r["loss_sum"]
        for e, f in zip(r["exact_match"], r["f1"]):
            em += e
            f1 += f
    count = max(1, n)
    return {"exact_match": em / count, "f1": f1 / count, "loss": loss_sum / count, "n": n}


def greedy_answers(model, prompts: list[list[int]], tokenizer) -> list[str]:
    """Greedy decoding after each prompt (left-padded into one batch, KV cache on), cut at the first newline."""
    lm = model.backbone
    width, device = max(len(p) for p in prompts), model_device(lm)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = lm.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, use_cache=True,
                      max_new_tokens=model.max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.split("\n")[0].strip() for t in texts]
