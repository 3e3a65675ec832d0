"""Task heads. Both turn a batch into one score per candidate [batch, candidates], which the task kind's loss and
scoring read (ftkit.task_kinds).

- Encoders: masked mean pooling, then a linear head. The head starts from the label phrases' embeddings
  (class prototypes) so the model is far above chance before any step; zeroth-order training cannot recover
  from a random head.
- Causal LMs: each candidate is scored from the log-probabilities of its tokens after the prompt, by their mean
  (MeZO's protocol), sum or per-character sum (data.scoring); the scores are the logits. Single-token candidates
  share one row per example; longer ones share one pass over the prompt (ftkit.models.prefix).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftkit.models import prefix

PROTOTYPE_SCALES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class EncoderClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes, dtype=encoder.dtype, device=encoder.device)
        self.pre_head: nn.Module | None = None  # an adapter may put a hidden layer before the head
        # Mean pooling replaces BERT's pooler: it receives no gradient and does not change the loss.
        pooler = getattr(encoder, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def embed(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        hidden = self.encoder(**inputs).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"])

    def forward(self, batch: dict) -> torch.Tensor:
        pooled = self.embed(batch)
        if self.pre_head is not None:
            pooled = self.pre_head(pooled)
        return self.head(pooled).float()


# How a candidate's score comes from the log-probabilities of its tokens after the prompt (data.scoring): their
# sum, their mean (MeZO's), or their sum over the candidate's length in characters (lm-evaluation-harness's acc_norm).
# Each maps (sums, token counts, character counts) to scores.
SCORINGS = {
    "mean": lambda sums, tokens, chars: sums / tokens.clamp(min=1),
    "sum": lambda sums, tokens, chars: sums,
    "per_char": lambda sums, tokens, chars: sums / chars.clamp(min=1),
}


def aggregate(sums: torch.Tensor, tokens: torch.Tensor, chars: torch.Tensor | None, scoring: str) -> torch.Tensor:
    """Candidates' scores under `scoring` from their summed token log-probabilities and token counts (any shape)."""
    if chars is None:
        chars = torch.ones_like(tokens)  # a batch without character counts (a head used on its own)
    return SCORINGS[scoring](sums, tokens, chars.to(sums.device))


class CausalLMScorer(nn.Module):
    def __init__(self, lm: nn.Module, num_classes: int, scoring: str = "mean"):
        super().__init__()
        self.lm = lm
        self.num_classes = num_classes
        self.scoring = scoring  # what forward returns, so what training optimises (data.scoring)
        self.max_new_tokens = 50  # generation tasks: the decoding budget at evaluation

    @property
    def backbone(self) -> nn.Module:
        return self.lm

    def forward(self, batch: dict) -> torch.Tensor:
        """One score per candidate [examples, candidates] under the model's scoring."""
        return self.scores(batch, (self.scoring,))[self.scoring]

    def scores(self, batch: dict, scorings=tuple(SCORINGS)) -> dict[str, torch.Tensor]:
        """The candidates' scores under each of `scorings`, from one forward pass."""
        sums, tokens = self.candidate_logprobs(batch)
        chars = batch.get("candidate_chars")
        if "next_tokens" in batch:  # already [examples, candidates]
            return {name: aggregate(sums, tokens, chars, name) for name in scorings}
        return {name: by_example(aggregate(sums, tokens, chars, name), batch["num_candidates"]) for name in scorings}

    def candidate_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability of each candidate's tokens after the prompt, their number): shaped [rows] for one
        row per (example, candidate), [examples, candidates] for single-token candidates (`next_tokens`)."""
        if "next_tokens" in batch:
            logprobs = self._next_token_logprobs(batch)
            return logprobs, torch.ones_like(batch["next_tokens"])
        if "candidate_ids" in batch:  # candidates continuing one pass over their shared prompt
            return prefix.candidate_logprobs(self.lm, batch)
        # batch holds one row per (example, candidate); option_mask marks the candidate's tokens.
        hidden = self.lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state[:, :-1]
        targets = batch["input_ids"][:, 1:]
        return prefix.scored_sums(self.lm, hidden, targets, batch["option_mask"][:, 1:])

    def _next_token_logprobs(self, batch: dict) -> torch.Tensor:
        """Single-token candidates: one row per example, the prompt alone (right-padded). A candidate's
        log-probability is read at the prompt's last position, where every candidate's row would have computed the
        same hidden state."""
        hidden = self.lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        last = batch["attention_mask"].sum(1) - 1
        hidden = hidden.last_hidden_state[torch.arange(len(last), device=last.device), last]
        logprobs = self.lm.get_output_embeddings()(hidden).float().log_softmax(-1)
        tokens = batch["next_tokens"]
        # -1 pads examples with fewer candidates: -inf, never predicted, no probability mass.
        return logprobs.gather(-1, tokens.clamp(min=0)).masked_fill(tokens < 0, float("-inf"))


def by_example(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-row values [rows] as [examples, candidates], `counts` candidates per example (on the host). Rows of
    examples with fewer candidates are padded with -inf: never predicted, no probability mass."""
    if bool((counts == counts[0]).all()):
        return values.view(len(counts), int(counts[0]))
    width = int(counts.max())
    slots = (torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)).to(values.device)
    scores = torch.full((len(counts), width), float("-inf"), device=values.device)
    scores[slots] = values
    return scores


@torch.no_grad()
def init_prototype_head(model: EncoderClassifier, phrase_batch: dict, calibration_batches: list[dict]) -> float:
    """Set the head to s * unit(embedding of each label phrase), with s chosen by cross-entropy on train data.

    The pooled vectors share one norm per sentence, so the argmax is the cosine-prototype argmax and step-0
    accuracy is the zero-shot accuracy; s only sets the temperature. Returns the chosen s.
    """
    was_training = model.training
    model.eval()
    prototypes = F.normalize(model.embed(phrase_batch).float(), dim=-1)
    pooled, labels = [], []
    for batch in calibration_batches:
        pooled.append(model.embed(batch).float())
        labels.append(batch["labels"])
    pooled, labels = torch.cat(pooled), torch.cat(labels)
    logits_at_scale_one = pooled @ prototypes.T
    losses = [F.cross_entropy(s * logits_at_scale_one, labels).item() for s in PROTOTYPE_SCALES]
    scale = PROTOTYPE_SCALES[min(range(len(losses)), key=losses.__getitem__)]
    model.head.weight.copy_((scale * prototypes).to(model.head.weight.dtype))
    model.head.bias.zero_()
    model.train(was_training)
    return scale
