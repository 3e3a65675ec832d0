"""Cross-field checks: what the schema's types cannot say, and whether each named format and method exists."""

from __future__ import annotations

import difflib
import re

from ftkit.errors import RecipeError
from ftkit.recipe.schema import ZEROTH_ORDER, Recipe

def run_checks(recipe: Recipe, where: str) -> None:
    from ftkit.adapters import ADAPTERS
    from ftkit.data.tasks import BUILTIN_TASKS
    from ftkit.optim import OPTIMIZERS
    from ftkit.quant import BNB_FORMATS, FORMATS

    def fail(key: str, message: str):
        raise RecipeError(f"{where}: {key}: {message}")

    _check_choice("quant.format", recipe.quant.format, FORMATS, fail)
    _check_choice("method.adapter", recipe.method.adapter, ADAPTERS, fail)
    _check_choice("method.optimizer", recipe.method.optimizer, OPTIMIZERS, fail)

    t = recipe.train
    _at_least(fail, "train.max_steps", t.max_steps, 1)
    _at_least(fail, "train.batch_size", t.batch_size, 1)
    if t.micro_batch_size is not None:
        _at_least(fail, "train.micro_batch_size", t.micro_batch_size, 1)
        if t.micro_batch_size > t.batch_size:
            fail("train.micro_batch_size", f"{t.micro_batch_size} is more than train.batch_size ({t.batch_size})")
    _at_least(fail, "train.eval_batch_size", t.eval_batch_size, 1)
    _at_least(fail, "train.lr", t.lr, 0)
    _at_least(fail, "train.weight_decay", t.weight_decay, 0)
    _at_least(fail, "train.warmup_steps", t.warmup_steps, 0)
    _at_least(fail, "train.eval_every", t.eval_every, 0)
    _at_least(fail, "train.save_every", t.save_every, 0)
    _at_least(fail, "train.keep_last", t.keep_last, 1)
    _at_least(fail, "train.log_every", t.log_every, 1)
    if t.threads is not None:
        _at_least(fail, "train.threads", t.threads, 1)
    if t.grad_clip is not None and t.grad_clip <= 0:
        fail("train.grad_clip", f"must be positive (or null for no clipping), got {t.grad_clip}")
    if t.warmup_steps > t.max_steps:
        fail("train.warmup_steps", f"{t.warmup_steps} is more than train.max_steps ({t.max_steps})")

    betas = recipe.method.adamw.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        fail("method.adamw.betas", f"must be two numbers in [0, 1), got {betas}")
    _at_least(fail, "method.sgd.momentum", recipe.method.sgd.momentum, 0)
    if recipe.method.sgd.nesterov and recipe.method.sgd.momentum == 0:
        fail("method.sgd.nesterov", "Nesterov momentum needs method.sgd.momentum > 0")
    for i, pattern in enumerate(recipe.method.freeze):
        try:
            re.compile(pattern)
        except re.error as err:
            fail(f"method.freeze[{i}]", f"{pattern!r} is not a valid regular expression ({err})")

    lo = recipe.method.loretta
    for key in ("tensor_rank", "bottleneck", "r"):
        _at_least(fail, f"method.loretta.{key}", getattr(lo, key), 1)
    if lo.modes is not None:
        _at_least(fail, "method.loretta.modes", lo.modes, 1)
    for key, spec in (("method.loretta", lo), ("method.lora", recipe.method.lora)):
        if not 0 <= spec.dropout < 1:
            fail(f"{key}.dropout", f"must be in [0, 1), got {spec.dropout}")
    _at_least(fail, "method.lora.r", recipe.method.lora.r, 1)
    roles = {"loretta_adp": ("down", "up", "head"), "loretta_rep": ("a", "b")}.get(recipe.method.adapter, ())
    for role, shape in lo.shapes.items():
        if role not in roles:
            fail(f"method.loretta.shapes.{role}", f"not a TT role of method.adapter {recipe.method.adapter} "
                 f"(roles: {', '.join(roles) or 'none'})")
        if not shape or any(n < 1 for n in shape):
            fail(f"method.loretta.shapes.{role}", f"needs positive modes, got {shape}")

    zo = recipe.method.zo
    if zo.eps <= 0:
        fail("method.zo.eps", f"must be positive, got {zo.eps}")
    _at_least(fail, "method.zo.n_queries", zo.n_queries, 1)
    _at_least(fail, "method.zo.weight_decay", zo.weight_decay, 0)
    if zo.perturb_bits != 0 and not 2 <= zo.perturb_bits <= 16:
        fail("method.zo.perturb_bits", f"must be 0 (unrounded directions) or 2..16, got {zo.perturb_bits}")
    optimizer, adapter, q = recipe.method.optimizer, recipe.method.adapter, recipe.quant
    if optimizer in ZEROTH_ORDER and t.weight_decay:
        fail("train.weight_decay", f"applies to first-order optimizers; set method.zo.weight_decay for {optimizer}")
    if optimizer == "mezo" and adapter == "none" and q.format != "none":
        fail("method.optimizer", f"mezo trains full-precision weights, and quant.format is {q.format}: use quzo for "
             f"the quantized weights themselves, or set method.adapter to train an adapter over the quantized base")
    if optimizer in ZEROTH_ORDER and adapter == "none" and q.engine == "bitsandbytes":
        fail("method.adapter", "bitsandbytes weights are frozen; zeroth-order training over them needs an adapter "
             "(lora, loretta_rep or loretta_adp), or use quant.engine: native to train the weights with quzo")

    if q.engine == "straight_through":
        if q.format == "none":
            fail("quant.engine", "straight_through simulates a low-bit format: set quant.format (int8, int4, fp8_*)")
        if optimizer in ZEROTH_ORDER:
            fail("quant.engine", f"straight_through is the first-order baseline (full-precision master weights); "
                 f"{optimizer} trains the low-bit weights themselves with quant.engine: native")
        if adapter != "none":
            fail("quant.engine", "straight_through trains the quantized weights themselves; for an adapter over a "
                 "frozen quantized base use quant.engine: native or bitsandbytes")
    if q.engine == "bitsandbytes" and q.format not in BNB_FORMATS:
        fail("quant.format", f"the bitsandbytes engine provides {', '.join(BNB_FORMATS)} (int4 is nf4 or fp4 by "
             f"quant.bnb_4bit_type), not '{q.format}'; use quant.engine: native for it")
    if q.group_size and q.group_size % 2:
        fail("quant.group_size", f"must be even (0 for one scale per output channel), got {q.group_size}")
    for i, pattern in enumerate(q.skip):
        try:
            re.compile(pattern)
        except re.error as err:
            fail(f"quant.skip[{i}]", f"{pattern!r} is not a valid regular expression ({err})")

    m = recipe.model
    if m.config is not None and not isinstance(m.config.get("model_type"), str):
        fail("model.config.model_type", "a config-built model needs its architecture, e.g. model_type: llama")
    _at_least(fail, "quant.group_size", recipe.quant.group_size, 0)

    d = recipe.data
    _at_least(fail, "data.max_seq_len", d.max_seq_len, 8)
    _at_least(fail, "data.calibration_examples", d.calibration_examples, 1)
    for key in ("n_train", "n_dev"):
        value = getattr(d, key)
        if value is not None:
            _at_least(fail, f"data.{key}", value, 1)
    overlap = set(d.tasks) & set(BUILTIN_TASKS)
    if overlap:
        name = sorted(overlap)[0]
        fail(f"data.tasks.{name}", f"'{name}' is a built-in task; give your task another name")
    if d.task not in BUILTIN_TASKS and d.task not in d.tasks:
        known = sorted(set(BUILTIN_TASKS) | set(d.tasks))
        close = difflib.get_close_matches(d.task, known, n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        fail("data.task", f"'{d.task}' is neither a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) "
             f"nor defined under data.tasks{suggestion}")
    if d.task in d.tasks:
        for key in ("train_file", "dev_file", "test_file"):
            if getattr(d, key):
                fail(f"data.{key}", f"applies to built-in tasks; set data.tasks.{d.task}.{key.split('_')[0]} instead")
    for name, task in d.tasks.items():
        prefix = f"data.tasks.{name}"
        if not task.train:
            fail(f"{prefix}.train", "a recipe-defined task needs its train file")
        if task.kind == "classification" and len(task.label_words) < 2:
            fail(f"{prefix}.label_words", "needs at least two labels, e.g. {0: terrible, 1: great}")
        if task.kind == "multiple_choice" and not task.candidates_column:
            fail(f"{prefix}.candidates_column", "a multiple_choice task needs the column holding its candidates")
        if task.kind == "generation" and not task.answer_column:
            fail(f"{prefix}.answer_column", "a generation task needs the column holding its reference answers")
        metrics = ("exact_match", "f1") if task.kind == "generation" else ("accuracy", "macro_f1")
        if task.metric not in metrics:
            fail(f"{prefix}.metric", f"a {task.kind} task is scored by {' or '.join(metrics)}, not {task.metric}")
        _at_least(fail, f"{prefix}.max_new_tokens", task.max_new_tokens, 1)
        if not task.text_columns:
            fail(f"{prefix}.text_columns", "needs at least one column (encoders read one sentence or a pair)")
        if task.label_phrases is not None and set(task.label_phrases) != set(task.label_words):
            fail(f"{prefix}.label_phrases", "must name the same labels as label_words")
        if task.template is not None:
            missing = [c for c in re.findall(r"{(\w+)}", task.template) if c not in task.text_columns]
            if missing:
                fail(f"{prefix}.template", f"uses {{{missing[0]}}}, which is not in text_columns {task.text_columns}")


def _check_choice(key, value, registry, fail):
    if value in registry:
        return
    available = ", ".join(sorted(registry))
    close = difflib.get_close_matches(value, sorted(registry), n=1)
    suggestion = f"; did you mean '{close[0]}'?" if close else ""
    fail(key, f"unknown choice {value!r} (available: {available}{suggestion})")


def _at_least(fail, key, value, minimum):
    if value < minimum:
        fail(key, f"must be at least {minimum}, got {value}")
