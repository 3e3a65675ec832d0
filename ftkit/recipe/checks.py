"""Cross-field checks: what the schema's types cannot say. Generic checks live here; each component checks its own
options and its combinations with the rest of the recipe (ftkit.components), so this file names none of them.

This is the one place that sees every registry: it resolves the recipe's format, engine, adapter and optimizer into
a `Chosen` and hands it to each validator, so components check one another by what they declare and never import
one another's registries."""

from __future__ import annotations

import difflib
import math
import re

from ftkit.adapters import ADAPTERS
from ftkit.components import Chosen
from ftkit.data.tasks import BUILTIN_TASKS
from ftkit.errors import RecipeError
from ftkit.optim import OPTIMIZERS
from ftkit.quant import ENGINES, FORMATS
from ftkit.recipe.architecture import ENCODER_TYPES, known_architecture, names_gguf_file, positions
from ftkit.recipe.schema import Recipe, engine_sections, method_sections
from ftkit.task_kinds import TASK_KINDS


def run_checks(recipe: Recipe, where: str) -> None:
    def fail(key: str, message: str):
        raise RecipeError(f"{where}: {key}: {message}")

    q, m = recipe.quant, recipe.method
    chosen = choose(recipe, where)

    _check_train(recipe, fail)
    for name, section in method_sections().items():
        section.validate(getattr(m, name), recipe, chosen, fail)
    _check_patterns(fail, "method.freeze", m.freeze)

    for name, section in engine_sections().items():
        section.validate(getattr(q, name), recipe, chosen, fail)
    for component in (chosen.engine, chosen.optimizer, chosen.adapter):
        component.validate(recipe, chosen, fail)
    _check_kernel(q.kernel, chosen.format, fail)
    _check_blocks(q, chosen.format, fail)
    _check_from_file(recipe, chosen, fail)
    if q.group_size and q.group_size % 2:
        fail("quant.group_size", f"must be even (0 for one scale per output channel), got {q.group_size}")
    _check_patterns(fail, "quant.skip", q.skip)

    if recipe.model.config is not None and not isinstance(recipe.model.config.get("model_type"), str):
        fail("model.config.model_type", "a config-built model needs its architecture, e.g. model_type: llama")
    _at_least(fail, "quant.group_size", q.group_size, 0)
    _check_data(recipe, fail, where)
    architecture = known_architecture(recipe.model)
    if architecture is not None:
        check_architecture(recipe, architecture, fail)


def choose(recipe: Recipe, where: str) -> Chosen:
    """The components the recipe names, or a RecipeError naming an unknown one and the closest choice."""
    q, m = recipe.quant, recipe.method
    return Chosen(format=FORMATS.choose(q.format, where), engine=ENGINES.choose(q.engine, where),
                  adapter=ADAPTERS.choose(m.adapter, where), optimizer=OPTIMIZERS.choose(m.optimizer, where))


def _check_kernel(kernel: str, fmt, fail) -> None:
    """`auto` and `dequantize` read every format; any other kernel must be one the chosen format declares."""
    everywhere = ("auto", "dequantize")
    known = list(everywhere) + sorted({k for f in FORMATS for k in f.kernels})
    if kernel not in known:
        close = difflib.get_close_matches(kernel, known, n=1)
        suggestion = f"; did you mean '{close[0]}'?" if close else ""
        fail("quant.kernel", f"unknown kernel {kernel!r} (available: {', '.join(known)}{suggestion})")
    if kernel not in everywhere and kernel not in fmt.kernels:
        fail("quant.kernel", f"{kernel} does not read {fmt.name} codes (kernels of {fmt.name}: "
             f"{', '.join(('dequantize',) + fmt.kernels)})")


def _check_blocks(q, fmt, fail) -> None:
    """A format with blocks of its own (GGUF's) fixes the group size and quantizes as llama.cpp does."""
    if not fmt.block:
        return
    if q.group_size not in (0, fmt.block):
        fail("quant.group_size", f"{fmt.name} stores blocks of {fmt.block} weights; set quant.group_size: "
             f"{fmt.block} or leave it unset")
    if q.scale_method != "absmax":
        fail("quant.scale_method", f"{fmt.name} scales are llama.cpp's (from each block's range); use absmax")
    if q.scale_dtype != "bfloat16":
        fail("quant.scale_dtype", f"{fmt.name} stores float16 scales, as GGUF files do; leave quant.scale_dtype unset")


def _check_from_file(recipe: Recipe, chosen, fail) -> None:
    """A format taken from the model's GGUF file (`gguf`) needs such a file, and ftkit's own layers to hold it."""
    if not chosen.format.from_file:
        return
    if recipe.model.config is not None or not names_gguf_file(recipe.model.name):
        fail("quant.format", f"{chosen.format.name} keeps each layer in its GGUF file's format, and model.name "
             f"'{recipe.model.name}' is not a GGUF file (a .gguf path or smollm2-135m); set quant.format (q4_1, int4, "
             f"...) to convert it")
    if not chosen.engine.zo_trains_weights:  # an engine with layers of its own (bitsandbytes, straight-through)
        fail("quant.engine", f"{chosen.format.name} takes the file's blocks into ftkit's own layers; use "
             f"quant.engine: native (or set quant.format to convert the weights for {chosen.engine.name})")


def check_architecture(recipe: Recipe, architecture: dict, fail) -> None:
    """What the model's architecture (its config, as plain data) decides: a sequence length within its positions,
    and explicit TT shapes that factor the matrices of the layers they go into."""
    bound = positions(architecture)
    if bound is not None and recipe.data.max_seq_len > bound[1]:
        key, limit = bound
        fail("data.max_seq_len", f"{recipe.data.max_seq_len} is more than the {limit} positions the model has "
             f"({key} in its config); set data.max_seq_len to {limit} or less")
    adapter = ADAPTERS[recipe.method.adapter]
    if adapter.tt_dims is None or adapter.section is None:
        return
    options = getattr(recipe.method, adapter.section.name)
    dims = adapter.tt_dims(options, architecture)
    for role, shape in sorted(options.shapes.items()):
        for rows, cols in dims.get(role, ()):
            if math.prod(shape) != rows * cols:
                fail(f"method.{adapter.section.name}.shapes.{role}",
                     f"{shape} multiplies to {math.prod(shape)}, but the {role} factor of this model's layers is a "
                     f"{rows} x {cols} matrix: its modes must multiply to {rows * cols}")


def _check_train(recipe: Recipe, fail) -> None:
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
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        fail("train.device", f"{t.device!r} is not one of: auto, cpu, cuda, cuda:N (N the GPU's index)")


def _check_data(recipe: Recipe, fail, where: str) -> None:
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
        kind = TASK_KINDS.choose(task.kind, where, key=f"{prefix}.kind")
        if not task.train:
            fail(f"{prefix}.train", "a recipe-defined task needs its train file")
        kind.validate(task, lambda key, message: fail(f"{prefix}.{key}", message))
        if task.metric not in kind.metrics:
            fail(f"{prefix}.metric", f"a {task.kind} task is scored by {' or '.join(kind.metrics)}, not {task.metric}")
        if not task.text_columns:
            fail(f"{prefix}.text_columns", "needs at least one column (encoders read one sentence or a pair)")
        if task.template is not None:
            missing = _unknown_fields(task.template, task.text_columns)
            if missing:
                fail(f"{prefix}.template", f"uses {{{missing}}}, which is not in text_columns {task.text_columns}")
    if d.task in BUILTIN_TASKS or d.task in d.tasks:  # after the tasks' own checks: their kinds are known
        _check_prompt_overrides(d, fail)
        _check_chat_and_scoring(recipe, fail)
    own = d.tasks.get(d.task)
    dev, test = (own.dev, own.test) if own else (d.dev_file, d.test_file)
    if d.n_dev is not None and dev and test:  # docs/tasks.md: a test file of the recipe's own under the protocol
        fail(f"data.tasks.{d.task}.dev" if own else "data.dev_file",
             f"{dev} would never be read: with data.n_dev set, dev is drawn from train and the test file is the "
             f"test set; drop the dev file, or unset data.n_dev to select on it")


def _check_prompt_overrides(d, fail) -> None:
    """data.template may use only the task's columns; data.label_words must name exactly the task's labels."""
    task = d.tasks[d.task] if d.task in d.tasks else BUILTIN_TASKS[d.task].spec
    if d.template is not None:
        missing = _unknown_fields(d.template, task.text_columns)
        if missing:
            fail("data.template", f"uses {{{missing}}}, but task {d.task} has the columns {task.text_columns}")
    if d.label_words is not None:
        if not TASK_KINDS[task.kind].label_words:
            named = " and ".join(kind.name for kind in TASK_KINDS if kind.label_words)
            fail("data.label_words", f"task {d.task} is {task.kind}: only {named} tasks have label words")
        elif set(d.label_words) != set(task.label_words):
            missing = sorted(set(task.label_words) - set(d.label_words))
            extra = sorted(set(d.label_words) - set(task.label_words))
            problem = f"lacks label {missing[0]!r}" if missing else f"has label {extra[0]!r}, which the task lacks"
            fail("data.label_words", f"{problem}: task {d.task} has the labels {sorted(task.label_words)}")


def _check_chat_and_scoring(recipe: Recipe, fail) -> None:
    """data.chat and data.scoring concern what a causal LM reads and scores; data.system needs data.chat."""
    d = recipe.data
    if d.system is not None and not d.chat:
        fail("data.system", "is the system message of a chat prompt; set data.chat: true too (or remove it)")
    if d.chat and _is_encoder(recipe.model):
        fail("data.chat", f"renders the prompt through a causal LM's chat template; {recipe.model.name} is an "
             f"encoder (set model.name to a causal LM, or remove data.chat)")
    task = d.tasks[d.task] if d.task in d.tasks else BUILTIN_TASKS[d.task].spec
    if d.scoring != "auto" and not TASK_KINDS[task.kind].ranks_candidates:
        fail("data.scoring", f"task {d.task} is {task.kind}: it is trained on its answer's mean log-probability, "
             f"with no candidates to rank; remove data.scoring")


def _is_encoder(model) -> bool:
    if model.kind != "auto":
        return model.kind == "encoder"
    architecture = known_architecture(model)
    return architecture is not None and architecture.get("model_type") in ENCODER_TYPES


def _unknown_fields(template: str, columns: list[str]) -> str | None:
    """The first {field} of a prompt template that is not one of the task's columns."""
    return next((c for c in re.findall(r"{(\w+)}", template) if c not in columns), None)


def _check_patterns(fail, key: str, patterns: list[str]) -> None:
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as err:
            fail(f"{key}[{i}]", f"{pattern!r} is not a valid regular expression ({err})")


def _at_least(fail, key, value, minimum):
    if value < minimum:
        fail(key, f"must be at least {minimum}, got {value}")
