"""What a component declares, and the registries that hold components.

ftkit has five kinds of component, each a small declared object in a registry keyed by the name a recipe uses:

    quant.format      Format     a weight grid: its codec (rounding, storage) and the matmul kernels it has
    quant.engine      Engine     how a linear layer is converted to hold a format, counted and trained
    method.adapter    Adapter    how modules are injected, what they train, how they merge and are exported
    method.optimizer  Optimizer  how a method is built, whether it is zeroth-order, how it prepares the model
    data.tasks.*.kind TaskKind   how a task's rows become examples, are encoded, scored, and which metrics it reports

Shared code (the loop, model assembly, counting, export, evaluation, the CLI) asks the component, never its name.
Components check their combinations with one another the same way: the recipe checks hand every validator the
recipe's chosen format, engine, adapter and optimizer (`Chosen`), whose declared data it reads, so no declaration
imports another registry.
Declarations are torch-free, so the recipe loader can validate against them without importing any model code:
behaviour that needs torch is named by import path (`Hook("ftkit.adapters.lora.layer:inject")`) and imported
the first time it is called. A component defined in user code registers itself with `REGISTRY.register(...)` and
may pass plain functions instead of hooks.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from ftkit.errors import RecipeError


class Hook:
    """A function named by `"package.module:attribute"`, imported when first called."""

    def __init__(self, path: str):
        self.path = path
        self._target: Callable | None = None

    def resolve(self) -> Callable:
        if self._target is None:
            module, _, attribute = self.path.partition(":")
            self._target = getattr(importlib.import_module(module), attribute)
        return self._target

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Hook({self.path!r})"


def no_checks(*args) -> None:
    """A validator for components whose options need no cross-field checks."""


Fail = Callable[[str, str], None]  # fail(key, message) raises a RecipeError naming the recipe file and the key


@dataclass(frozen=True)
class Section:
    """A recipe section that holds a component's options, e.g. `method.zo` (shared by mezo and quzo).

    `options` is a dataclass of typed, documented fields (`metadata={"help": ...}`); `validate(options, recipe,
    chosen, fail)` checks what the types cannot say (`chosen`: the recipe's components, a `Chosen`). Every
    registered section appears in every resolved recipe with its defaults, so `recipe.yaml` documents the run
    completely."""

    name: str
    options: type
    validate: Callable[[Any, Any, Chosen, Fail], None] = no_checks


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    # The grid (a codec of ftkit.quant.codecs: rounding, encoding to storage, packing), or a Hook naming it.
    # None: full precision.
    codec: Any = None
    # Matmul kernels that read this format's stored codes directly (besides dequantize-then-matmul).
    kernels: tuple[str, ...] = ()
    # A group size the format fixes (GGUF's blocks of 32; its codec's `block`): quant.group_size is this or unset.
    block: int = 0
    # Whether method.zo.low_bit: scales can train its scales (a K-quant's are derived from 6-bit integers: not).
    scales_trainable: bool = True
    # Each layer takes its format from the model's GGUF file (`gguf`): low-bit, with no codec of its own.
    from_file: bool = False

    @property
    def low_bit(self) -> bool:
        return self.codec is not None or self.from_file

    def grid(self):
        """The codec, imported on first use."""
        return self.codec.resolve() if isinstance(self.codec, Hook) else self.codec


@dataclass(frozen=True)
class Engine:
    name: str
    summary: str
    # convert(linear, name, quant_spec, generator) -> the module that replaces `linear`
    convert: Callable
    # Formats it can hold (None: every low-bit format).
    formats: Optional[tuple[str, ...]] = None
    # Whether a zeroth-order optimizer can update the stored low-bit weights themselves (QuZO on native codes).
    zo_trains_weights: bool = False
    # Whether first-order training back-propagates into the weights it converts (the straight-through baseline).
    fo_trains_weights: bool = False
    # count(module, leaf, tensor) -> (parameters it stands for, stored bytes, trained) or None when not its layer
    count: Optional[Callable] = None
    # Options of its own (`quant.<section>`, e.g. quant.bitsandbytes), read by `convert` from the quant spec.
    section: Optional[Section] = None
    # validate(recipe, chosen, fail): combinations of this engine with the rest of the recipe
    validate: Callable[[Any, Chosen, Fail], None] = no_checks


@dataclass(frozen=True)
class Adapter:
    name: str
    summary: str
    section: Optional[Section] = None
    # inject(model, options) -> model, with what the adapter does not train frozen
    inject: Optional[Callable] = None
    # unwrap(model, merge) -> {name: tensor} set aside: replaces the adapter's layers by their (dequantized) base
    # layers, merging the update into the weights when `merge` (only where `mergeable`)
    unwrap: Optional[Callable] = None
    mergeable: bool = False
    # A regular expression over parameter names that marks this adapter's own tensors (counting groups them).
    parameters: Optional[str] = None
    # Roles of tensor-train shapes it reads from its options (`method.loretta.shapes.<role>`).
    tt_roles: tuple[str, ...] = ()
    # tt_dims(options, architecture) -> {role: [(in, out), ...]}: the matrices a role's TT shape must factor, for the
    # roles the architecture (a model config as plain data) tells; recipe checks compare explicit shapes with them.
    tt_dims: Optional[Callable] = None
    # Engines whose low-bit layers it can wrap (None: every engine's); over a full-precision base it wraps any.
    base_engines: Optional[tuple[str, ...]] = None
    # validate(recipe, chosen, fail): combinations of this adapter with the rest of the recipe
    validate: Callable[[Any, Chosen, Fail], None] = no_checks

    @property
    def trains_base(self) -> bool:
        """No modules of its own: the model's own parameters are trained (full fine-tuning)."""
        return self.inject is None


@dataclass(frozen=True)
class ZerothOrderRules:
    """What distinguishes one zeroth-order optimizer from another, as data the zeroth-order core reads."""

    rounds_directions: bool  # directions stochastically rounded onto a perturb_bits grid, Q1 and Q2 (QuZO)
    trains_low_bit: bool  # low-bit codes may train, their updates rounded onto the weight grid (QuZO)


@dataclass(frozen=True)
class Optimizer:
    name: str
    summary: str
    # build(model, recipe, world) -> a method with step(batch, lr), state_dict(), load_state_dict(), begin(), end()
    build: Callable
    section: Optional[Section] = None
    # A zeroth-order method's rules (estimates gradients from forward passes only, writes a trace that `ftkit
    # replay` rebuilds weights from); None for a first-order one.
    zeroth_order: Optional[ZerothOrderRules] = None
    # prepare(model, recipe): decide what the method trains beyond parameters with requires_grad
    prepare: Optional[Callable] = None
    # validate(recipe, chosen, fail): combinations of this optimizer with the rest of the recipe
    validate: Callable[[Any, Chosen, Fail], None] = no_checks

    @property
    def trains_low_bit(self) -> bool:
        """Can train low-bit weights themselves (QuZO updates codes on their grid); else only full-precision
        tensors."""
        return self.zeroth_order is not None and self.zeroth_order.trains_low_bit


@dataclass(frozen=True)
class Chosen:
    """The components a recipe names, resolved by the recipe checks and handed to every validator, so that a
    component checks its combinations with the others by what they declare, never by their names."""

    format: Format
    engine: Engine
    adapter: Adapter
    optimizer: Optimizer


@dataclass(frozen=True)
class TaskKind:
    name: str
    summary: str
    # Metrics it reports (the first is the default for a recipe-defined task), besides the loss.
    metrics: tuple[str, ...]
    # columns(task_spec) -> the columns it reads beyond text_columns
    columns: Callable[[Any], list]
    # make_example(row, task_spec, labels, source, task_name) -> ftkit.data.dataset.Example
    make_example: Callable
    # candidates(example, task, tokenizer) -> token ids of each candidate scored after the prompt (causal LMs)
    candidates: Callable
    # loss(scores, batch) -> the training loss of a batch's scores (the model's output)
    loss: Callable
    # score(model, indices, batch, tokenizer) -> per-batch results; combine(results, n, num_classes) -> metrics
    score: Callable
    combine: Callable
    # extra_features(example, prompt_ids, task, tokenizer, max_seq_len) -> features beyond the scored rows
    extra_features: Optional[Callable] = None
    # Whether an encoder with a classification head can learn it (else it needs a causal LM).
    encoders: bool = False
    # Whether its labels are named by words (`label_words`), which a recipe's `data.label_words` may replace.
    label_words: bool = False
    # Whether its candidates compete (cross-entropy over their scores), so `data.scoring` says how each is scored.
    ranks_candidates: bool = False
    validate: Callable[[Any, Fail], None] = no_checks


T = TypeVar("T")


class Registry(Generic[T]):
    """Components of one kind by name, in registration order. `key` is the recipe key that names one."""

    def __init__(self, key: str, components=()):
        self.key = key
        self._entries: dict[str, T] = {}
        for component in components:
            self.register(component)

    def register(self, component: T, replace: bool = False) -> T:
        name = component.name
        if name in self._entries and not replace:
            raise ValueError(f"{self.key}: '{name}' is already registered")
        self._entries[name] = component
        return component

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def choose(self, name: str, where: str = "", key: str | None = None) -> T:
        """The component named `name`, or a RecipeError naming `where` (the recipe file) and the key, listing the
        choices and the closest one."""
        if name in self._entries:
            return self._entries[name]
        available = ", ".join(sorted(self._entries))
        close = difflib.get_close_matches(str(name), sorted(self._entries), n=1)
        suggestion = f"; did you mean '{close[0]}'?" if close else ""
        prefix = f"{where}: " if where else ""
        raise RecipeError(f"{prefix}{key or self.key}: unknown choice {name!r} (available: {available}{suggestion})")

    def __getitem__(self, name: str) -> T:
        return self.choose(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)


def sections_of(*registries: Registry) -> dict[str, Section]:
    """The option sections the components of these registries declare, by name (shared sections once)."""
    found: dict[str, Section] = {}
    for registry in registries:
        for component in registry:
            section = getattr(component, "section", None)
            if section is None:
                continue
            if section.name in found and found[section.name].options is not section.options:
                raise ValueError(f"two components declare different options for the section '{section.name}'")
            found[section.name] = section
    return found


def option(default: Any = MISSING, *, factory: Callable | None = None, help: str, computes: bool = True,
           choices: Callable[[], Registry] | None = None):
    """A recipe key: a dataclass field with its help line (the recipe reference is generated from it), whether
    changing it changes what a run computes (`computes=False`: how long, how often, where; a resumed run or a
    replay may differ in it) and, for a key that names a component, `choices`: a function returning its registry,
    so the reference lists the registered names and their summaries instead of a help line repeating them."""
    metadata = {"help": help, "computes": computes, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
