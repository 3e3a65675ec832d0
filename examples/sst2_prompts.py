"""SST-2 as next-word prediction, shared by the examples: "<sentence> It was" followed by " great" or " terrible",
the loss on the answer's tokens only, and accuracy as which of the two answers the model finds more likely.

The rows come from $FTKIT_DATA_DIR/sst2/{train,dev}.tsv (the GLUE files: a `sentence` and a `label` column).
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import torch

PROMPT = "{sentence} It was"
ANSWERS = (" terrible", " great")  # label 0, label 1


def read_sst2(split: str, rows: int, seed: int = 0) -> list[tuple[str, int]]:
    """`rows` (sentence, label) pairs of a split, shuffled with `seed`."""
    path = Path(os.environ.get("FTKIT_DATA_DIR", "../shared/data")) / "sst2" / f"{split}.tsv"
    with path.open(newline="") as f:
        table = [(r["sentence"].strip(), int(r["label"])) for r in csv.DictReader(f, delimiter="\t",
                                                                                 quoting=csv.QUOTE_NONE)]
    random.Random(seed).shuffle(table)
    return table[:rows]


def encode(tokenizer, sentence: str, answer: str) -> dict:
    """Token ids of prompt + answer, with labels -100 (no loss) on the prompt."""
    prompt = tokenizer(PROMPT.format(sentence=sentence), add_special_tokens=False)["input_ids"]
    target = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
            "labels": [-100] * len(prompt) + target}


def training_examples(tokenizer, rows: list[tuple[str, int]]) -> list[dict]:
    return [encode(tokenizer, sentence, ANSWERS[label]) for sentence, label in rows]


def collate(tokenizer, examples: list[dict]) -> dict:
    """Right-padded tensors; padding carries no loss."""
    width = max(len(e["input_ids"]) for e in examples)
    pad = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
    return {key: torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])
            for key, value in pad.items()}


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[tuple[str, int]], batch_size: int = 32) -> float:
    """How often the right answer has the higher log-likelihood after the prompt."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        batch = collate(tokenizer, [encode(tokenizer, s, a) for s, _ in chunk for a in ANSWERS])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (picked * (labels != -100)).sum(-1).view(len(chunk), len(ANSWERS))
        truth = torch.tensor([label for _, label in chunk], device=scores.device)
        correct += int((scores.argmax(-1) == truth).sum())
    model.train(was_training)
    return correct / len(rows)
