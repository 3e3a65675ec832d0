"""Candidates that share their prompt, scored from one pass over it.

A classification or multiple-choice example asks for the log-probabilities of several candidates after the same
prompt. Rather than one full sequence per candidate (the prompt computed once per candidate), the prompt runs once
with the key/value cache on, the cache is copied to each of the example's candidates (rows of the batch), and the
candidates' tokens continue from it as one batch. Every token sees the same keys, values and positions as in its own
full sequence, so the log-probabilities are those of the one-row-per-candidate layout up to float rounding, and
gradients flow back through the cache into the prompt's pass (first-order training).

Batch layout (ftkit.data.batches.collate): `input_ids` / `attention_mask` [examples, prompt] hold the prompts,
right-padded; `candidate_ids` / `candidate_mask` [candidates, tokens] the candidates of all examples in order,
right-padded; `num_candidates` [examples] (on the host) how many belong to each example.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from transformers import DynamicCache


def candidate_logprobs(lm: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token log-probabilities, token count) of every candidate after its example's prompt, both
    [candidates]. The hidden state that predicts a candidate's first token is the prompt's last one; its later
    tokens are predicted from the candidate pass, which never needs the candidate's last token as input."""
    decoder = lm.get_decoder()
    prompt_mask, ids, mask = batch["attention_mask"], batch["candidate_ids"], batch["candidate_mask"]
    device = ids.device
    owner = torch.repeat_interleave(torch.arange(len(batch["num_candidates"])), batch["num_candidates"]).to(device)
    cache = DynamicCache(config=decoder.config)  # filled by the prompt's pass, in place
    prompt = decoder(input_ids=batch["input_ids"], attention_mask=prompt_mask, use_cache=True,
                     **{_cache_argument(decoder): cache})
    last = prompt_mask.sum(1) - 1  # the prompts are right-padded: their last real position
    first = prompt.last_hidden_state[torch.arange(len(last), device=device), last][owner]
    hidden = first.unsqueeze(1)
    if ids.shape[1] > 1:
        hidden = torch.cat([hidden, _continue(decoder, cache, owner, last, prompt_mask,
                                              ids[:, :-1], mask[:, :-1])], 1)
    return scored_sums(lm, hidden, ids, mask)


def scored_sums(lm: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """(sum of the log-probabilities of `targets` [rows, tokens] where `mask` is set, their number), both [rows], from
    the hidden states that predict them. Only the scored positions go through the LM head: the full [rows, tokens,
    vocab] logits are never built."""
    scored = mask.bool()
    logits = lm.get_output_embeddings()(hidden[scored]).float()
    token_logprob = logits.log_softmax(-1).gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
    # Back into [rows, tokens] and summed per row: a plain assignment and a sum, deterministic on every device
    # (an index_add_ of the positions into their rows would use atomic additions on a GPU).
    per_token = torch.zeros(scored.shape, device=logits.device, dtype=token_logprob.dtype)
    per_token[scored] = token_logprob
    return per_token.sum(1), scored.sum(1)


def _continue(decoder: nn.Module, cache, owner: torch.Tensor, last: torch.Tensor, prompt_mask: torch.Tensor,
              ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states of the candidates' tokens `ids` [rows, tokens], each row continuing its prompt's cache.

    The cache is indexed to one copy per row (a differentiable gather). Positions continue from each prompt's own
    length, not from the padded width; the prompt's padding stays masked out of the keys, and the causal order
    between the candidate's tokens comes from their place after the whole cache."""
    cache.reorder_cache(owner)
    positions = last[owner].unsqueeze(1) + 1 + torch.arange(ids.shape[1], device=ids.device)
    attention = torch.cat([prompt_mask[owner], mask], 1)
    out = decoder(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                  **{_cache_argument(decoder): cache})
    return out.last_hidden_state


def _cache_argument(decoder: nn.Module) -> str:
    """The name a decoder's forward takes its key/value cache by: `cache` in recent transformers releases,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
