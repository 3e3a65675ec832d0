"""The recipe schema: typed dataclasses, one per section.

Every key a recipe may hold is a field here, with its type and default. `ftkit.recipe.load` checks a YAML
file against these classes before anything heavy is imported or loaded; the names of the sections and keys
are a contract that other tools rely on (see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# Task heads, BERT's unused pooler and LM heads stay in full precision by default.
DEFAULT_QUANT_SKIP = (r"(^|\.)head$", r"lm_head", r"pooler", r"classifier", r"(^|\.)score$")


@dataclass
class ModelSpec:
    # `minilm` (the packaged MiniLM-L6 encoder), a hub id, or a local directory. Gives the tokenizer and,
    # unless `config` is set, the weights.
    name: str = "minilm"
    # Architecture inline, e.g. {model_type: llama, hidden_size: 64, ...}: `validate` and `count-params` then need
    # nothing from the hub. Training builds it with random weights unless `weights: pretrained`.
    config: Optional[dict[str, Any]] = None
    # auto: random when `config` is given, else the pretrained weights of `name`; pretrained: always load `name`'s
    # weights (paper-scale recipes state their architecture inline for offline counting); random: never.
    weights: Literal["auto", "pretrained", "random"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Where the tokenizer comes from when it differs from `name` (config-only models default to minilm's).
    tokenizer: Optional[str] = None
    # encoder: pooled sentence embedding + classification head; causal_lm: candidates scored by log-probability.
    kind: Literal["auto", "encoder", "causal_lm"] = "auto"
    # Encoders: initialise the head from the label phrases' embeddings (prototype) or at random.
    head_init: Literal["prototype", "random"] = "prototype"
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class QuantSpec:
    format: str = "none"
    # native: real low-bit storage (QuantLinear); bitsandbytes: its frozen nf4/fp4/int8 layers; straight_through:
    # full-precision master weights computed with their quantized value (first-order QAT baseline).
    engine: Literal["native", "bitsandbytes", "straight_through"] = "native"
    # 0 means one scale per output channel; otherwise one scale per group of this many input columns.
    group_size: int = 0
    scale_method: Literal["absmax", "mse"] = "absmax"
    scale_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # How weights are first rounded onto the grid; stochastic draws from a generator seeded with `seed`.
    rounding: Literal["nearest", "stochastic"] = "nearest"
    seed: int = 0
    # Linear layers whose names match one of these regular expressions stay in full precision.
    skip: list[str] = field(default_factory=lambda: list(DEFAULT_QUANT_SKIP))
    # Matmul path: auto picks the fastest measured one for the format and device (see BENCHMARKS.md).
    kernel: Literal["auto", "dequantize", "int8pack", "int_mm", "int4pack", "scaled_mm"] = "auto"
    # bitsandbytes engine: int4 is nf4 or fp4 (optionally double-quantized), int8 is LLM.int8.
    bnb_4bit_type: Literal["nf4", "fp4"] = "nf4"
    bnb_double_quant: bool = False
    bnb_int8_threshold: float = 6.0


@dataclass
class AdamWSpec:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SGDSpec:
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class LorettaSpec:
    """Options of both LoRETTA methods (see ftkit/adapters/loretta_adp and loretta_rep)."""

    tensor_rank: int = 5
    # Modes per factorised dimension when shapes are automatic (unset: factors of about 8).
    modes: Optional[int] = None
    # Explicit TT shapes by role: down / up / head (adapters), a / b (LoRA factors).
    shapes: dict[str, list[int]] = field(default_factory=dict)
    # Module-name suffixes or regular expressions; unset means the architecture's defaults.
    target_modules: Optional[list[str]] = None
    init: Literal["identity", "paper"] = "identity"
    # LoRETTA_adp
    bottleneck: int = 64
    nonlinearity: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    scaling: float = 1.0
    train_norms: bool = True
    tt_head: bool = False
    # LoRETTA_rep
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


@dataclass
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None


# Optimizers that estimate gradients from forward passes only.
ZEROTH_ORDER = ("mezo", "quzo")


@dataclass
class ZOSpec:
    """Zeroth-order options (MeZO, QuZO); see ftkit/optim/zo.py."""

    eps: float = 1e-3
    n_queries: int = 1
    # QuZO: directions are stochastically rounded onto a per-tensor grid of 2^bits - 1 levels (0: unrounded).
    perturb_bits: int = 4
    # QuZO: the perturbation and the update round the same Gaussian with independent random bits (unbiased);
    # false reuses the perturbation's rounding for the update (the authors' public code).
    independent_roundings: bool = True
    # QuZO: how an update lands on a low-precision weight grid.
    update_rounding: Literal["stochastic", "nearest"] = "stochastic"
    # Decoupled weight decay, not applied to biases and norms.
    weight_decay: float = 0.0
    # Word embeddings stay frozen by default: a batch touches few rows, so random directions only add noise.
    train_embeddings: bool = False
    # Write the trajectory (seeds, projected gradients, learning rates) to <run>/trace.ftz for `ftkit replay`.
    trace: bool = True
    # Several processes (torchrun): split each batch between them (data), or give each the whole batch and
    # n_queries / processes of the queries (queries; n_queries a multiple of the process count). Same result.
    parallel: Literal["data", "queries"] = "data"


@dataclass
class MethodSpec:
    adapter: str = "none"
    optimizer: str = "adamw"
    adamw: AdamWSpec = field(default_factory=AdamWSpec)
    sgd: SGDSpec = field(default_factory=SGDSpec)
    loretta: LorettaSpec = field(default_factory=LorettaSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    zo: ZOSpec = field(default_factory=ZOSpec)
    # Regular expressions over parameter names that stay frozen, on top of what the method freezes.
    freeze: list[str] = field(default_factory=list)


@dataclass
class TaskSpec:
    """A task defined entirely in the recipe, over local files: classification (label words), multiple choice
    (candidates per row) or generation (a reference answer per row)."""

    kind: Literal["classification", "multiple_choice", "generation"] = "classification"
    train: Optional[str] = None
    dev: Optional[str] = None
    test: Optional[str] = None
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet"] = "auto"
    # One column is a single sentence; two are a sentence pair (encoders read them as a pair).
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    # classification: the label value; multiple_choice: the 0-based index of the correct candidate.
    label_column: str = "label"
    # Label value as it appears in the file -> the word that names it (scored by causal LMs).
    label_words: dict[str, str] = field(default_factory=dict)
    # Label value -> the phrase whose embedding initialises an encoder's head (defaults to the label word).
    label_phrases: Optional[dict[str, str]] = None
    # multiple_choice: the column holding each row's candidates (a list, or one string cut at the separator).
    candidates_column: Optional[str] = None
    candidates_separator: str = "|"
    # generation: the column holding the reference answer (a string, or a list of acceptable answers).
    answer_column: Optional[str] = None
    max_new_tokens: int = 50
    # Prompt for causal LMs; the label word, candidate or answer follows it after a space.
    template: Optional[str] = None
    metric: Literal["accuracy", "macro_f1", "exact_match", "f1"] = "accuracy"


@dataclass
class DataSpec:
    task: str = "sst2"
    max_seq_len: int = 128
    # Explicit files for a built-in task; otherwise $FTKIT_DATA_DIR/<task>/, then the hub.
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    # Tasks defined in the recipe, by name; `task` may name one of them.
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    # MeZO's protocol: draw n_train / n_dev examples from the train split with data_seed, and evaluate the
    # result on the validation split (reported as "test"). Unset means: train on all of train, dev = validation.
    n_train: Optional[int] = None
    n_dev: Optional[int] = None
    data_seed: int = 0
    # Examples used to calibrate the prototype head's temperature (drawn from train).
    calibration_examples: int = 512


@dataclass
class TrainSpec:
    max_steps: int = 1000
    batch_size: int = 16
    # Chunks of the global batch computed one after another (gradient accumulation, and the unit that
    # multi-process runs deal to their ranks); unset: the whole batch at once.
    micro_batch_size: Optional[int] = None
    # Batches of sentences of similar length (far less padding); see ftkit.data.batches.TrainStream.
    group_by_length: bool = True
    eval_batch_size: int = 128
    lr: float = 2e-5
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    eval_every: int = 0  # 0: evaluate only at the end
    eval_at_start: bool = True
    save_every: int = 0  # 0: save only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    output_dir: Optional[str] = None  # default runs/<recipe file name>
    tensorboard: bool = False
    threads: Optional[int] = None  # torch intra-op threads; default: all cores


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    description: Optional[str] = None
    # Where the recipe came from (set by the loader, not by the user).
    source: Optional[str] = field(default=None, metadata={"internal": True})
