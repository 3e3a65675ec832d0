"""ftkit's causal LM as an lm-evaluation-harness model: the three request types the harness sends (loglikelihood,
loglikelihood_rolling, generate_until), answered by the model exactly as trained (low-bit layers and adapters
included). Imports lm_eval: only `ftkit.harness` imports this module, once it has checked that the extra is there.

A request's context and continuation are tokenised separately (the context as a prompt, with the tokenizer's
special tokens; the continuation without), as ftkit scores a candidate after its prompt, so a harness task that
writes ftkit's prompt and label words gets ftkit's log-likelihoods. Trailing spaces of a context move to the front
of its continuation (a word is scored with its leading space), as lm-eval's own models do."""

from __future__ import annotations

import json
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ftkit.devices import model_device
from ftkit.errors import UserError

DEFAULT_MAX_LENGTH = 2048  # a config that names no context length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default budget for generate_until


class FtkitLM(LM):
    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None):
        """`model`: ftkit's causal LM scorer (ftkit.models.heads.CausalLMScorer), whose `backbone` is the causal LM
        with its low-bit layers and adapters; `tokenizer`: the run's."""
        super().__init__()
        self.lm = model.backbone
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = max_length or context_length(self.lm.config)
        self.prefix_id = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id)
                               if t is not None), None)
        self.lm.eval()

    # --- loglikelihood -------------------------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        results = self.score(pairs, "loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer(context)["input_ids"] if context else []
        return context_ids or [self.prefix()], self.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def prefix(self) -> int:
        """The token an empty context stands for: BOS, else EOS (or CLS), so the first token has a condition."""
        if self.prefix_id is None:
            raise UserError("the tokenizer has no BOS, EOS or CLS token to stand for an empty context")
        return self.prefix_id

    def loglikelihood_rolling(self, requests) -> list[float]:
        """The log-likelihood of each whole text, in windows of the model's context length that overlap by as much
        as fits (lm-eval's rolling windows); the first token is conditioned on the prefix token."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            ids = self.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            for window in get_rolling_token_windows(ids, self.prefix() if ids else 0, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(windows, "loglikelihood_rolling")):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def score(self, pairs: list[tuple[list[int], list[int]]], what: str) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding gives it) per pair. Pairs
        that feed the model the same tokens (a context's one-token candidates: SST-2's two label words) share one
        row; rows go in batches of similar length, longest first (memory peaks at once, little padding)."""
        rows: dict[tuple, list[int]] = {}
        for i, (context, continuation) in enumerate(pairs):
            if len(continuation) > self.max_length:
                raise UserError(f"a {what} continuation of {len(continuation)} tokens does not fit the model's "
                                f"context of {self.max_length} tokens")
            # The input is context + continuation without its last token, cut from the left to the context length.
            rows.setdefault(tuple((context + continuation)[-(self.max_length + 1) :][:-1]), []).append(i)
        ordered = sorted(rows.items(), key=lambda row: -len(row[0]))
        results: list = [None] * len(pairs)
        with tqdm(total=len(pairs), desc=what, disable=not sys.stderr.isatty()) as bar:
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start : start + self.batch_size]
                members = [(r, i) for r, (_, owners) in enumerate(chunk) for i in owners]
                scored = self.score_rows([row for row, _ in chunk], [(r, pairs[i][1]) for r, i in members])
                for (_, i), result in zip(members, scored):
                    results[i] = result
                bar.update(len(members))
        return results

    @torch.inference_mode()
    def score_rows(self, rows: list[tuple], continuations: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
        """Each continuation (row index, tokens) scored at the end of its row: one forward pass for the rows."""
        width, device = max(len(r) for r in rows), model_device(self.lm)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        at_row, at_position, targets = [], [], []
        for r, continuation in continuations:
            at_row += [r] * len(continuation)
            at_position += range(len(rows[r]) - len(continuation), len(rows[r]))
            targets += continuation
        hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        # Only the scored positions go through the LM head, as in ftkit's scorer: no [rows, width, vocab] logits.
        logprobs = self.lm.get_output_embeddings()(hidden[at_row, at_position]).float().log_softmax(-1)
        targets = torch.tensor(targets, device=device)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = logprobs.argmax(-1) == targets
        results, at = [], 0
        for _, continuation in continuations:
            n = len(continuation)
            results.append((picked[at : at + n].sum().item(), bool(greedy[at : at + n].all())))
            at += n
        return results

    # --- generate_until ------------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Decoding after each context (greedy unless the task asks to sample), stopped at the first of the task's
        `until` strings or end-of-sequence, and cut there; batched by equal generation options, longest first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=not sys.stderr.isatty()) as bar:
            for members in groups.values():
                options = dict(requests[members[0]].args[1])
                contexts = {i: self.tokenizer(requests[i].args[0])["input_ids"] for i in members}
                members.sort(key=lambda i: -len(contexts[i]))
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    for i, text in zip(chunk, self.generate_batch([contexts[i] for i in chunk], dict(options))):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return results

    @torch.inference_mode()
    def generate_batch(self, contexts: list[list[int]], options: dict) -> list[str]:
        eos = self.tokenizer.eos_token_id
        until = handle_stop_sequences(options.pop("until", None), self.tokenizer.decode([eos]) if eos is not None
                                      else None)
        budget = int(options.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(options.pop("temperature", 0.0))
        sample = bool(options.pop("do_sample", temperature > 0))
        if sample:
            options["temperature"] = temperature
        room = max(1, self.max_length - budget)  # the context is cut from the left so the answer fits
        contexts = [c[-room:] for c in contexts]
        width, device = max(len(c) for c in contexts), model_device(self.lm)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
        stop = StoppingCriteriaList([StopStrings(until, width, self.tokenizer)]) if until else None
        out = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=sample,
                               use_cache=True, pad_token_id=pad, eos_token_id=eos, stopping_criteria=stop, **options)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [cut(text, until) for text in texts]


class StopStrings(StoppingCriteria):
    """Stops a row once its decoded answer contains one of the stop strings (which may span several tokens)."""

    def __init__(self, stops: list[str], start: int, tokenizer):
        self.stops, self.start, self.tokenizer = stops, start, tokenizer

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def cut(text: str, stops: list[str]) -> str:
    """The text before the first stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH
