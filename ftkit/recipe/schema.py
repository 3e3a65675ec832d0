"""The recipe schema: typed dataclasses, one per section.

Every key is a field here, with its type, default and help line (docs/recipe.md is generated from them), or in the
options of a component: `method.adamw`, `method.sgd`, `method.zo`, `method.lora`, `method.loretta` and
`quant.bitsandbytes` belong to the optimizers, adapters and engines that declare them (ftkit.components).
`ftkit.recipe.load` checks a YAML file against these classes before anything heavy is imported; the names of the
sections and keys are a contract that other tools rely on (docs/recipe.md lists them; every run records its recipe
in recipe.yaml, docs/runs.md). Keys marked `computes=False` decide how long, how often or where, not what is
computed: a resumed run or a replay may differ in them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ftkit.components import option

# Task heads, BERT's unused pooler and LM heads stay in full precision by default.
DEFAULT_QUANT_SKIP = (r"(^|\.)head$", r"lm_head", r"pooler", r"classifier", r"(^|\.)score$")


@dataclass
class ModelSpec:
    name: str = option("minilm", help="A packaged model (`minilm`: the MiniLM-L6 encoder; `smollm2-135m`: "
                                      "SmolLM2-135M-Instruct, a causal LM), a hub id, a local directory, or a LLaMA "
                                      "`.gguf` file. Gives the tokenizer and, unless `config` is set, the weights.")
    config: Optional[dict[str, Any]] = option(None, help="Architecture inline, e.g. {model_type: llama, hidden_size: "
                                              "64, ...}: `validate` and `count-params` then need nothing from the hub. "
                                              "Training builds it with random weights unless `weights: pretrained`.")
    weights: Literal["auto", "pretrained", "random"] = option(
        "auto", help="auto: random when `config` is given, else the pretrained weights of `name`; pretrained: always "
                     "load `name`'s weights (paper-scale recipes state their architecture inline for offline "
                     "counting); random: never.")
    dtype: Literal["float32", "bfloat16"] = option("float32", help="Dtype of the weights that stay in full precision.")
    tokenizer: Optional[str] = option(None, help="Where the tokenizer comes from when it differs from `name` "
                                                 "(config-only models default to minilm's).")
    kind: Literal["auto", "encoder", "causal_lm"] = option(
        "auto", help="encoder: pooled sentence embedding + classification head; causal_lm: candidates scored by "
                     "log-probability; auto: from the architecture.")
    head_init: Literal["prototype", "random"] = option(
        "prototype", help="Encoders: initialise the head from the label phrases' embeddings (prototype) or at random.")
    revision: Optional[str] = option(None, help="Hub revision (branch, tag or commit) of `name`.")
    trust_remote_code: bool = option(False, help="Run code shipped with a hub model (off: loading executes nothing).")


@dataclass
class QuantSpec:
    format: str = option("none", help="Weight format of the linear layers.", choices=lambda: _registry("FORMATS"))
    engine: str = option("native", help="How a linear layer holds the format.", choices=lambda: _registry("ENGINES"))
    group_size: int = option(0, help="0: one scale per output channel; otherwise one scale per group of this many "
                                     "input columns (GGUF's q4_0 / q4_1 / q5_0 / q8_0: blocks of 32).")
    scale_method: Literal["absmax", "mse"] = option("absmax", help="Scales from the absolute maximum or an MSE "
                                                                   "search over clipping ratios.")
    scale_dtype: Literal["bfloat16", "float32"] = option("bfloat16", help="Dtype the scales are stored in.")
    rounding: Literal["nearest", "stochastic"] = option(
        "nearest", help="How weights are first rounded onto the grid; stochastic draws from a generator seeded "
                        "with `seed`.")
    seed: int = option(0, help="Seed of the stochastic first rounding.")
    skip: list[str] = option(factory=lambda: list(DEFAULT_QUANT_SKIP),
                             help="Linear layers whose names match one of these regular expressions stay in full "
                                  "precision.")
    kernel: str = option("auto", help="Matmul path: auto picks the fastest measured one for the format and device "
                                      "(BENCHMARKS.md); dequantize always works; or one of the kernels the format "
                                      "declares (ftkit.quant.FORMATS).")
    # The options of engines that declare some (quant.bitsandbytes), by section, as for `method` below.
    sections: dict[str, Any] = field(default_factory=lambda: _defaults(engine_sections()),
                                     metadata={"internal": True, "sections": lambda: engine_sections()})

    def __getattr__(self, name: str):
        return _section(self, "quant", name)


@dataclass
class MethodSpec:
    adapter: str = option("none", help="What trains.", choices=lambda: _registry("ADAPTERS"))
    optimizer: str = option("adamw", help="How it trains.", choices=lambda: _registry("OPTIMIZERS"))
    freeze: list[str] = option(factory=list, help="Regular expressions over parameter names that stay frozen, on top "
                                                  "of what the method freezes.")
    # The options of every optimizer and adapter, by section (method.zo, method.lora, ...). They are read as
    # attributes, recipe.method.zo.eps, and written to recipe.yaml as sections of `method`.
    sections: dict[str, Any] = field(default_factory=lambda: _defaults(method_sections()),
                                     metadata={"internal": True, "sections": lambda: method_sections()})

    def __getattr__(self, name: str):
        return _section(self, "method", name)


def _section(spec, where: str, name: str):
    sections = spec.__dict__.get("sections")
    if sections is not None and name in sections:
        return sections[name]
    raise AttributeError(f"{where} has no key or section '{name}'")


def method_sections() -> dict:
    """name -> ftkit.components.Section, for every section the registered optimizers and adapters declare."""
    from ftkit.adapters import ADAPTERS
    from ftkit.components import sections_of
    from ftkit.optim import OPTIMIZERS

    return sections_of(OPTIMIZERS, ADAPTERS)


def engine_sections() -> dict:
    """name -> ftkit.components.Section, for every section the registered engines declare (quant.bitsandbytes)."""
    from ftkit.components import sections_of
    from ftkit.quant import ENGINES

    return sections_of(ENGINES)


def _registry(name: str):
    """The registry a key names a component of, imported when the reference is written."""
    from ftkit.adapters import ADAPTERS
    from ftkit.optim import OPTIMIZERS
    from ftkit.quant import ENGINES, FORMATS

    return {"FORMATS": FORMATS, "ENGINES": ENGINES, "ADAPTERS": ADAPTERS, "OPTIMIZERS": OPTIMIZERS}[name]


def _defaults(sections: dict) -> dict[str, Any]:
    return {name: section.options() for name, section in sections.items()}


# Keys that moved, old -> new: a recipe that still writes the old key is told the new one.
MOVED_KEYS = {"quant.bnb_4bit_type": "quant.bitsandbytes.int4_type",
              "quant.bnb_double_quant": "quant.bitsandbytes.double_quant",
              "quant.bnb_int8_threshold": "quant.bitsandbytes.int8_threshold"}


@dataclass
class TaskSpec:
    """A task defined entirely in the recipe, over local files: classification (label words), multiple choice
    (candidates per row) or generation (a reference answer per row)."""

    kind: str = option("classification", help="classification, multiple_choice or generation "
                                              "(ftkit.task_kinds.TASK_KINDS).")
    train: Optional[str] = option(None, help="Training file (relative paths: the working directory, then beside the "
                                             "recipe).")
    dev: Optional[str] = option(None, help="Validation file.")
    test: Optional[str] = option(None, help="Test file.")
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet"] = option("auto", help="File format; auto: from the "
                                                                                    "suffix.")
    text_columns: list[str] = option(factory=lambda: ["sentence"], help="One column is a single sentence; two are a "
                                     "sentence pair (encoders read them as a pair).")
    label_column: str = option("label", help="classification: the label value; multiple_choice: the 0-based index of "
                                             "the correct candidate.")
    label_words: dict[str, str] = option(factory=dict, help="Label value as it appears in the file -> the word that "
                                                            "names it (scored by causal LMs).")
    label_phrases: Optional[dict[str, str]] = option(None, help="Label value -> the phrase whose embedding "
                                                                "initialises an encoder's head (default: the word).")
    candidates_column: Optional[str] = option(None, help="multiple_choice: the column holding each row's candidates "
                                                         "(a list, or one string cut at the separator).")
    candidates_separator: str = option("|", help="multiple_choice: separator of candidates given as one string.")
    answer_column: Optional[str] = option(None, help="generation: the column holding the reference answer (a string, "
                                                     "or a list of acceptable answers; the first is trained on).")
    max_new_tokens: int = option(50, help="generation: the decoding budget at evaluation.")
    template: Optional[str] = option(None, help="Prompt for causal LMs, with {column} fields; the label word, "
                                                "candidate or answer follows it after a space (directly after a "
                                                "template that ends with a newline).")
    metric: str = option("accuracy", help="The metric that selects the best checkpoint: one the kind reports "
                                          "(classification: accuracy, macro_f1; multiple_choice: accuracy; "
                                          "generation: exact_match, f1).")


@dataclass
class DataSpec:
    task: str = option("sst2", help="A built-in task (sst2, rte, cb, boolq, wic, wsc, multirc, copa, record, squad, "
                                    "drop) or one defined under `tasks`.")
    max_seq_len: int = option(128, help="Tokens per sequence; prompts are cut from the left, answers never.")
    train_file: Optional[str] = option(None, help="Explicit train file of a built-in task; otherwise "
                                                  "$FTKIT_DATA_DIR/<task>/, then the hub.")
    dev_file: Optional[str] = option(None, help="Explicit validation file of a built-in task.")
    test_file: Optional[str] = option(None, help="Explicit test file of a built-in task.")
    template: Optional[str] = option(None, help="A prompt of your own for the task (causal LMs), with its {column} "
                                                "fields: replaces the task's template (for an instruct model, its "
                                                "chat format; docs/tasks.md).")
    label_words: Optional[dict[str, str]] = option(None, help="Words of your own for a classification task's labels "
                                                              "(label value -> word), replacing the task's.")
    tasks: dict[str, TaskSpec] = option(factory=dict, help="Tasks defined in the recipe, by name; `task` may name "
                                                           "one of them.")
    chat: bool = option(False, help="Causal LMs: the prompt (the template filled in) becomes the user turn of the "
                                    "tokenizer's chat template, rendered with the assistant's turn opened; the label "
                                    "word, candidate or answer follows it directly (docs/tasks.md).")
    system: Optional[str] = option(None, help="With `chat`: the system message. Unset: what the chat template does "
                                              "without one (SmolLM2-Instruct's inserts its own default system "
                                              "message); \"\": an empty system message.")
    scoring: Literal["auto", "mean", "sum", "per_char"] = option(
        "auto", help="How a causal LM scores a candidate from its tokens' log-probabilities after the prompt: mean "
                     "(MeZO's), sum (lm-evaluation-harness's acc), per_char (the sum over the candidate's length in "
                     "characters: the harness's acc_norm). auto: mean for built-in tasks, sum for recipe-defined "
                     "ones (docs/tasks.md). Evaluation reports the accuracy under each.")
    n_train: Optional[int] = option(None, help="MeZO's protocol: draw n_train / n_dev examples from the train split "
                                               "with data_seed, and evaluate on the validation split (as `test`). "
                                               "Unset: train on all of train, dev = validation.")
    n_dev: Optional[int] = option(None, help="MeZO's protocol: examples held out from train for model selection.")
    data_seed: int = option(0, help="Seed of MeZO's sampling and of the calibration examples.")
    calibration_examples: int = option(512, help="Examples used to calibrate the prototype head's temperature "
                                                 "(drawn from train).")


@dataclass
class TrainSpec:
    max_steps: int = option(1000, computes=False, help="Training steps (a resumed run may extend it).")
    batch_size: int = option(16, help="Examples per step (the global batch, whatever the process count).")
    micro_batch_size: Optional[int] = option(None, help="Chunks of the global batch computed one after another "
                                             "(gradient accumulation, and the unit several processes share); unset: "
                                             "the whole batch at once.")
    group_by_length: bool = option(True, help="Batches of sentences of similar length (far less padding).")
    eval_batch_size: int = option(128, computes=False, help="Examples per evaluation batch.")
    lr: float = option(2e-5, help="Peak learning rate.")
    schedule: Literal["constant", "linear", "cosine"] = option("constant", help="Decay after warm-up.")
    warmup_steps: int = option(0, help="Linear warm-up steps.")
    weight_decay: float = option(0.0, help="Decoupled weight decay of first-order optimizers (matrices only).")
    grad_clip: Optional[float] = option(None, help="Clip the gradient norm to this (first-order); null: no clipping.")
    eval_every: int = option(0, computes=False, help="Evaluate on dev every this many steps; 0: only at the end.")
    eval_at_start: bool = option(True, computes=False, help="Evaluate on dev before the first step.")
    save_every: int = option(0, computes=False, help="Save a checkpoint every this many steps; 0: only at the end "
                                                     "(and on SIGINT/SIGTERM and a better dev metric).")
    keep_last: int = option(2, computes=False, help="Step directories kept (plus best).")
    log_every: int = option(10, computes=False, help="Progress lines every this many steps (off a terminal).")
    seed: int = option(0, help="Seed of initialisation, data order, dropout and zeroth-order directions.")
    output_dir: Optional[str] = option(None, computes=False, help="Run directory; default runs/<recipe file name>.")
    tensorboard: bool = option(False, computes=False, help="Also log to TensorBoard (when installed).")
    threads: Optional[int] = option(None, computes=False, help="torch intra-op threads; default: all cores. Bit-exact "
                                    "resume needs the same count (checked when resuming).")
    device: str = option("auto", computes=False, help="auto (a GPU when one is visible, else the CPU), cpu, cuda or "
                                                      "cuda:N. Under torchrun each process takes the GPU of its local "
                                                      "rank. Results are bit-identical on the same device kind (CPU "
                                                      "thread count, or GPU model), checked when resuming.")


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    description: Optional[str] = option(None, computes=False, help="One line about the recipe.")
    # Where the recipe came from (set by the loader, not by the user).
    source: Optional[str] = field(default=None, metadata={"internal": True})
