"""Tokenise examples once, then serve padded batches: a resumable shuffled stream for training, and
length-sorted chunks for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftkit.data.dataset import Example, TaskData
from ftkit.devices import to_device
from ftkit.errors import UserError
from ftkit.task_kinds import TASK_KINDS


def encode(examples: list[Example], tokenizer, kind: str, task: TaskData, max_seq_len: int,
           one_row_per_candidate: bool = False) -> list[dict]:
    """One feature dict per example (lists of token ids), ready for `collate`. Causal LMs: single-token candidates
    share one row per example unless `one_row_per_candidate` (see `_encode_for_causal_lm`)."""
    if kind == "encoder":
        return _encode_for_encoder(examples, tokenizer, max_seq_len)
    return _encode_for_causal_lm(examples, tokenizer, task, max_seq_len, one_row_per_candidate)


def _encode_for_encoder(examples, tokenizer, max_seq_len):
    first = [e.texts[0] for e in examples]
    second = [e.texts[1] for e in examples] if examples and len(examples[0].texts) > 1 else None
    encoded = tokenizer(first, second, truncation=True, max_length=max_seq_len)
    features = []
    for i, example in enumerate(examples):
        item = {key: encoded[key][i] for key in encoded.keys()}
        item["labels"] = example.label
        features.append(item)
    return features


def _encode_for_causal_lm(examples, tokenizer, task: TaskData, max_seq_len, one_row_per_candidate: bool = False):
    """Each example becomes one sequence per candidate: prompt tokens, then the candidate's tokens (marked in
    `option_masks`). The task kind names the candidates (ftkit.task_kinds) and any features beyond them.

    When every candidate of the split is a single token (SST-2's " great" / " terrible", BoolQ's " Yes" / " No"),
    the rows of an example would differ only in their last token, so each example is instead one row, the prompt,
    with the candidates' tokens in `next_tokens`: the head reads all their scores from the prompt's last position,
    one forward pass instead of one per candidate (ftkit.models.heads). Longer candidates of several per example
    (COPA's sentences, label words of two or three tokens) share the prompt too: the row is the prompt, cut so that
    the longest candidate fits, and the candidates' tokens are in `candidate_ids`, scored from one pass over the
    prompt (ftkit.models.prefix). `one_row_per_candidate` keeps the general layout (tests compare them)."""
    kind = TASK_KINDS[task.spec.kind]
    candidates_of = kind.candidates(task, tokenizer)
    # A rendered chat prompt carries its own special tokens (a BOS the template writes would come twice).
    prompts = [tokenizer(prompt_text(task, example, tokenizer), add_special_tokens=not task.chat)["input_ids"]
               for example in examples]
    candidates = [candidates_of(example) for example in examples]
    one_row = not one_row_per_candidate and all(len(c) == 1 for cs in candidates for c in cs)
    shared = not one_row_per_candidate and any(len(cs) > 1 for cs in candidates)
    features = []
    for example, prompt_ids, example_candidates in zip(examples, prompts, candidates):
        if one_row:
            feature = {"rows": [left_truncated(prompt_ids, 1, max_seq_len, tokenizer.bos_token_id)],
                       "next_tokens": [c[0] for c in example_candidates], "labels": example.label}
        elif shared:
            longest = max(len(c) for c in example_candidates)
            feature = {"rows": [left_truncated(prompt_ids, longest, max_seq_len, tokenizer.bos_token_id)],
                       "candidate_ids": [list(c) for c in example_candidates], "labels": example.label}
        else:
            rows, masks = [], []
            for candidate in example_candidates:
                ids = left_truncated(prompt_ids, len(candidate), max_seq_len, tokenizer.bos_token_id) + candidate
                rows.append(ids)
                masks.append([0] * (len(ids) - len(candidate)) + [1] * len(candidate))
            feature = {"rows": rows, "option_masks": masks, "labels": example.label}
        if kind.ranks_candidates:  # per-character scoring divides by these (ftkit.models.heads.SCORINGS)
            feature["candidate_chars"] = [len(text) for text in example.candidates or task.label_words]
        if kind.extra_features is not None:
            feature.update(kind.extra_features(example, prompt_ids, task, tokenizer, max_seq_len))
        features.append(feature)
    return features


def prompt_text(task: TaskData, example: Example, tokenizer=None) -> str:
    """The prompt a causal LM reads; the label word, candidate or answer follows it (dataset.after_prompt). With
    data.chat, the filled-in template is the user turn of the tokenizer's chat template."""
    template = task.spec.template or " ".join("{" + c + "}" for c in task.spec.text_columns)
    text = template.format(**dict(zip(task.spec.text_columns, example.texts)))
    return chat_prompt(tokenizer, text, task.system) if task.chat else text


def chat_prompt(tokenizer, text: str, system: str | None) -> str:
    """`text` as the user's turn, after `system` as the system message (None: none given, so the template decides),
    with the assistant's turn opened."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this model"
        raise UserError(f"data.chat: the tokenizer of {name} has no chat template; write the chat turns in "
                        f"data.template instead and remove data.chat")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def left_truncated(prompt_ids: list[int], reserved: int, max_seq_len: int, bos_id) -> list[int]:
    """The prompt cut from the left (keeping a leading BOS) so that `reserved` tokens still fit after it: the
    answer or candidate is never the part that is cut."""
    has_bos = bool(prompt_ids) and prompt_ids[0] == bos_id
    head, body = (prompt_ids[:1], prompt_ids[1:]) if has_bos else ([], prompt_ids)
    room = max(0, max_seq_len - reserved - len(head))
    return head + (body[len(body) - room :] if room < len(body) else body)


# Feature entries that the layouts above own; any other entry is a task kind's own (ftkit.task_kinds).
LAYOUT_KEYS = frozenset({"rows", "option_masks", "next_tokens", "candidate_ids", "candidate_chars", "labels"})


def collate(features: list[dict], pad_id: int) -> dict:
    if "rows" in features[0]:
        rows = [r for f in features for r in f["rows"]]
        batch = {"input_ids": _pad(rows, pad_id), "attention_mask": _pad([[1] * len(r) for r in rows], 0)}
        if "next_tokens" in features[0]:  # one row per example; -1 pads examples with fewer candidates
            batch["next_tokens"] = _pad([f["next_tokens"] for f in features], -1)
        elif "candidate_ids" in features[0]:  # one prompt row per example, its candidates after it
            candidates = [c for f in features for c in f["candidate_ids"]]
            batch["candidate_ids"] = _pad(candidates, pad_id)
            batch["candidate_mask"] = _pad([[1] * len(c) for c in candidates], 0)
            batch["num_candidates"] = torch.tensor([len(f["candidate_ids"]) for f in features], dtype=torch.long)
        else:
            batch["option_mask"] = _pad([m for f in features for m in f["option_masks"]], 0)
            batch["num_candidates"] = torch.tensor([len(f["rows"]) for f in features], dtype=torch.long)
        if "candidate_chars" in features[0]:  # per-character scoring (ftkit.models.heads.SCORINGS)
            if "next_tokens" in features[0]:  # [examples, candidates], padding 1 (its scores are -inf)
                batch["candidate_chars"] = _pad([f["candidate_chars"] for f in features], 1)
            else:  # one per candidate row, in the order of the rows' scores
                batch["candidate_chars"] = torch.tensor([n for f in features for n in f["candidate_chars"]])
        for key in features[0].keys() - LAYOUT_KEYS:  # a kind's own, as lists
            batch[key] = [f[key] for f in features]
    else:
        batch = {key: _pad([f[key] for f in features], pad_id if key == "input_ids" else 0)
                 for key in features[0] if key != "labels"}
    batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return batch


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# Length grouping sorts windows of this many batches by length, so a batch holds sentences of similar length.
GROUP_WINDOW = 50


class TrainStream:
    """Shuffled batches, epoch after epoch. The order depends only on (seed, epoch), so the state that resumes it
    exactly is two integers.

    With `group_by_length`, each window of GROUP_WINDOW batches of the shuffled order is sorted by length and its
    batches are shuffled again: batches stay random draws of the data, but with little padding (SST-2 mixes
    two-word phrases with 50-token sentences, so random batches are mostly padding).
    """

    def __init__(self, features: list[dict], batch_size: int, seed: int, pad_id: int, group_by_length: bool = False):
        self.features, self.batch_size, self.seed, self.pad_id = features, batch_size, seed, pad_id
        self.group_by_length = group_by_length
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.features), generator=generator).tolist()
        if not self.group_by_length:
            return order
        grouped, window = [], GROUP_WINDOW * self.batch_size
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: _length(self.features[i]))
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped.extend(batches[b])
        return grouped

    def next_batch(self) -> dict:
        return collate(self.next_features(), self.pad_id)

    def next_features(self) -> list[dict]:
        """The next global batch, uncollated (see `micro_batches`)."""
        picked = []
        while len(picked) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.position : self.position + self.batch_size - len(picked)]
            picked.extend(take)
            self.position += len(take)
        return [self.features[i] for i in picked]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


@dataclass
class Shard:
    """One process's part of a global batch: its chunks, collated, and where each sits in the batch.

    A global batch is cut into consecutive chunks of `train.micro_batch_size` examples (one chunk when unset)
    and chunk j goes to process j mod world size, so the chunks do not depend on how many processes share them:
    a run on N processes computes exactly the chunks a single process computes one after another."""

    batches: list[dict]
    positions: list[int]  # index of each chunk in the global batch
    num_chunks: int
    total: int  # examples in the global batch
    step: int = 0  # the step this batch trains (seeds dropout per chunk)

    def to(self, device) -> "Shard":
        """The same chunks with their tensors on `device`."""
        return Shard([to_device(b, device) for b in self.batches], self.positions, self.num_chunks, self.total,
                     self.step)


def shard(features: list[dict], micro_batch_size: int | None, pad_id: int, world=None, step: int = 0) -> Shard:
    size = micro_batch_size or len(features)
    starts = range(0, len(features), size)
    mine = [j for j in range(len(starts)) if world is None or world.owns(j)]
    return Shard([collate(features[starts[j] : starts[j] + size], pad_id) for j in mine], mine, len(starts),
                 len(features), step)


def as_shard(batches) -> Shard:
    """A Shard as is; a collated batch or a list of them as the whole global batch of one process."""
    if isinstance(batches, Shard):
        return batches
    batches = batches if isinstance(batches, list) else [batches]
    return Shard(batches, list(range(len(batches))), len(batches), sum(len(b["labels"]) for b in batches))


def micro_batches(features: list[dict], micro_batch_size: int | None, pad_id: int) -> list[dict]:
    """A global batch as consecutive chunks of `micro_batch_size` examples (one chunk when unset), collated."""
    return shard(features, micro_batch_size, pad_id).batches


def _length(feature: dict) -> int:
    """The longest sequence an example stands for: with candidates after a shared prompt, the prompt and its longest
    candidate, the length its longest row has in the one-row-per-candidate layout (so both sort alike)."""
    if "candidate_ids" in feature:
        return len(feature["rows"][0]) + max(len(c) for c in feature["candidate_ids"])
    return max(len(r) for r in feature["rows"]) if "rows" in feature else len(feature["input_ids"])


def eval_chunks(features: list[dict], batch_size: int) -> list[list[int]]:
    """Length-sorted batches of indices (little padding)."""
    order = sorted(range(len(features)), key=lambda i: _length(features[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

