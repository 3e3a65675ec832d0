"""Devices. Training on an accelerator is checked on the CPU by running the whole loop on the meta device (shapes,
no data) under an audit of every tensor operation: an operation that mixes a tensor on the run's device with one
left on the CPU (anything bigger than a scalar) fails the test, as it would fail on a GPU. The tests of
device-agnostic numerics run on the CPU and, where one is visible, on CUDA (skipped with the reason otherwise)."""

from __future__ import annotations

import math
import traceback

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, tiny_recipe
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ftkit import devices
from ftkit.errors import UserError
from ftkit.recipe import load_recipe

META = torch.device("meta")


# Operations that read a value out of a tensor, and what a meta tensor (which has none) gives instead.
SCALAR_READS = {
    torch.ops.aten._local_scalar_dense.default: lambda t: 0.5 if t.is_floating_point() else 0,
    torch.ops.aten.item.default: lambda t: 0.5 if t.is_floating_point() else 0,
    torch.ops.aten.is_nonzero.default: lambda t: False,
    torch.ops.aten.equal.default: lambda t: False,
}


HOST_COPIES = (torch.ops.aten.to, torch.ops.aten._to_copy, torch.ops.aten.copy_)


class DeviceAudit(TorchDispatchMode):
    """Fails any operation whose tensors are on more than one device (0-dim CPU tensors are scalars, which PyTorch
    allows anywhere; copies are explicit transfers). Meta tensors have no values, so reading one (`.item()`,
    `.tolist()`, a copy to the host) gives zeros: the loop's arithmetic on Python numbers goes on, and only placement
    is under test."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in SCALAR_READS and tensors[0].is_meta:
            return SCALAR_READS[func](tensors[0])
        if func.overloadpacket in HOST_COPIES and tensors and tensors[-1].is_meta:
            source = tensors[-1]  # to / _to_copy(source, device=...), copy_(destination, source)
            target = args[0].device if func.overloadpacket is torch.ops.aten.copy_ else kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu":  # reading a meta tensor on the host
                if func.overloadpacket is torch.ops.aten.copy_:
                    return args[0].zero_()
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        kinds = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(kinds) > 1 and func.overloadpacket not in HOST_COPIES:  # explicit transfers are fine
            where = [f for f in traceback.extract_stack() if "/ftkit/" in f.filename][-1:]
            self.mixed.append(f"{func}: devices {sorted(kinds)} at {where}")
            raise RuntimeError(f"tensors on {sorted(kinds)} meet in {func} (at {where})")
        return func(*args, **kwargs)


@pytest.fixture
def on_meta(monkeypatch):
    """train.device resolves to the meta device: the loop builds and trains the model there. Returns the devices
    random generators were asked for (they must all be the run's: random numbers are drawn where they are used)."""
    monkeypatch.setattr(devices, "resolve_device", lambda name, local_rank=0: META)
    asked, real = [], devices.generator

    def recording(seed, device=devices.CPU):
        asked.append(torch.device(device).type)
        return real(seed, device)

    monkeypatch.setattr(devices, "generator", recording)
    # Boolean-mask indexing (the causal-LM scorer's) has data-dependent shapes: on meta, take every position.
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield asked


def test_the_audit_fails_a_cpu_tensor_meeting_a_device_tensor():
    with pytest.raises(RuntimeError, match=r"tensors on \['cpu', 'meta'\] meet"):
        with DeviceAudit():
            torch.ones(3, device=META) + torch.ones(3)
    with DeviceAudit() as audit:  # scalars and host reads are fine
        value = (torch.ones(3, device=META) * torch.tensor(2.0)).sum().item()
    assert value == 0.5 and not audit.mixed


CASES = {  # name: (model config, quant, method)
    "adamw full": (TINY_BERT, {}, {"optimizer": "adamw"}),
    "adamw lora": (TINY_BERT, {}, {"optimizer": "adamw", "adapter": "lora"}),
    "adamw loretta_adp": (TINY_BERT, {}, {"optimizer": "adamw", "adapter": "loretta_adp",
                                          "loretta": {"bottleneck": 8, "tt_head": True}}),
    "adamw straight-through int4": (TINY_BERT, {"format": "int4", "engine": "straight_through"},
                                    {"optimizer": "adamw"}),
    "mezo full": (TINY_BERT, {}, {"optimizer": "mezo", "zo": {"n_queries": 2}}),
    "quzo int4": (TINY_BERT, {"format": "int4"}, {"optimizer": "quzo"}),
    "quzo int4 group": (TINY_BERT, {"format": "int4", "group_size": 16, "rounding": "stochastic"},
                        {"optimizer": "quzo"}),
    "quzo int8": (TINY_BERT, {"format": "int8"}, {"optimizer": "quzo"}),
    "quzo fp8_e4m3": (TINY_BERT, {"format": "fp8_e4m3"}, {"optimizer": "quzo"}),
    "quzo fp8_e5m2": (TINY_BERT, {"format": "fp8_e5m2"}, {"optimizer": "quzo"}),
    "quzo int4 loretta_rep": (TINY_BERT, {"format": "int4"}, {"optimizer": "quzo", "adapter": "loretta_rep"}),
    "llama quzo int4": (TINY_LLAMA, {"format": "int4"}, {"optimizer": "quzo"}),
    "llama adamw loretta_rep": (TINY_LLAMA, {}, {"optimizer": "adamw", "adapter": "loretta_rep"}),
    "llama mezo": (TINY_LLAMA, {}, {"optimizer": "mezo"}),
    "mezo random signs": (TINY_BERT, {}, {"optimizer": "mezo", "zo": {"direction": "rademacher"}}),
    "quzo int4 random signs": (TINY_BERT, {"format": "int4"}, {"optimizer": "quzo",
                                                               "zo": {"direction": "rademacher"}}),
}
# Not here: bitsandbytes layers (their kernels have no meta implementation); scripts/gpu_check.py trains them on a
# GPU, and test_quant.py checks them on the CPU.


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_and_method_trains_on_a_device_without_touching_the_host(case, on_meta, write_recipe, tmp_path):
    from ftkit.training.loop import train

    config, quant, method = CASES[case]
    recipe = load_recipe(write_recipe(tiny_recipe(
        model={"config": dict(config)}, quant=quant, method=method,
        train={"max_steps": 4, "eval_every": 2, "save_every": 2, "output_dir": str(tmp_path / "run"),
               "lr": 1e-3})))
    with DeviceAudit() as audit:
        summary = train(recipe)
    assert not audit.mixed and summary["steps"] == 4
    assert summary["environment"]["device"] == "meta"
    if method["optimizer"] in ("mezo", "quzo") or quant.get("rounding") == "stochastic":
        assert on_meta and set(on_meta) == {"meta"}  # every direction and rounding bit drawn on the device


def test_generation_trains_on_the_device(on_meta, write_recipe, tmp_path):
    """The answer's language-model loss on the device (decoding, a loop on values, is left to real devices)."""
    from conftest import REPO

    from ftkit.training.loop import train

    qa = {"kind": "generation", "train": str(REPO / "tests" / "fixtures" / "qa.jsonl"), "text_columns": ["question"],
          "answer_column": "answers", "template": "{question}", "metric": "f1", "max_new_tokens": 2}
    recipe = load_recipe(write_recipe(tiny_recipe(
        model={"config": dict(TINY_LLAMA)}, method={"optimizer": "quzo"}, quant={"format": "int8"},
        data={"task": "qa", "tasks": {"qa": qa}, "max_seq_len": 32, "n_train": None, "n_dev": None},
        train={"max_steps": 2, "eval_every": 2, "output_dir": str(tmp_path / "run")})))
    with DeviceAudit() as audit:
        train(recipe)
    assert not audit.mixed


def test_an_unavailable_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a machine without a GPU reports
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"train.device {name}: no CUDA device is visible .*train.device=cpu"):
            devices.resolve_device(name)
    assert devices.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # and one with a single GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"train.device cuda:1: device 1 does not exist \(1 visible\)"):
        devices.resolve_device("cuda:1")


# --- device-agnostic numerics: on the CPU, and on CUDA where a GPU is visible -----------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device is visible"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
def test_stochastic_rounding_is_unbiased_on_the_device(device, fmt):
    from ftkit.quant import FORMATS

    codec = FORMATS[fmt].grid()
    values = ((torch.rand(256, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.9 * codec.max_value)
    values = values.to(device)
    generator = devices.generator(1, device)
    draws = 2000
    mean = sum(codec.round(values, "stochastic", generator) for _ in range(draws)) / draws
    # each draw has variance at most spacing^2 / 4: the mean is within 5 standard errors of the value
    assert torch.all((mean - values).abs() <= 5 * codec.spacing(values) / 2 / math.sqrt(draws))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, group", [("int4", 0), ("int4", 64), ("int8", 0), ("fp8_e4m3", 0), ("q4_0", 32),
                                        ("q4_1", 32), ("q5_0", 32), ("q8_0", 32)])
def test_a_quantized_layer_gives_the_cpu_codes_and_output_on_the_device(device, fmt, group):
    from conftest import assert_sums_close

    from ftkit.quant.linear import QuantLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    here = QuantLinear.from_linear(linear.to(device), fmt, group_size=group, kernel="dequantize")
    cpu = QuantLinear.from_linear(linear.cpu(), fmt, group_size=group, kernel="dequantize")
    assert all(torch.equal(getattr(here, name).cpu(), getattr(cpu, name)) for name in ("codes", *cpu.codec.params))
    x = torch.randn(8, 256)
    with torch.no_grad():
        weight = cpu.dequantize()
        assert_sums_close(here(x.to(device)).cpu(), cpu(x), x.abs() @ weight.abs().T + cpu.bias.abs(), 258,
                          f"{fmt} on {device}")
