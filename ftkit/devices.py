"""Where a run computes: the device a recipe asks for (`train.device`), moving batches there, what a device is
(recorded for the determinism contract), and its memory figures."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from ftkit.errors import UserError

CPU = torch.device("cpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` as a torch.device: auto is the GPU when one is visible, else the CPU; `cuda` is the GPU of this
    process's local rank (torchrun gives each process its own), `cuda:N` the N-th visible GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return CPU
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"train.device {name}: no CUDA device is visible (torch {torch.__version__}, {build}); "
                        f"use train.device=cpu, or install the CUDA build of torch (README, Install)")
    index = int(name.partition(":")[2]) if ":" in name else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"train.device {name}: device {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def generator(seed: int, device: torch.device | str = CPU) -> torch.Generator:
    """A random generator seeded with `seed` on `device`, so random numbers are drawn where they are used (no
    host-to-device traffic). The meta device (shapes only, for counting) has none: its draws take the CPU's."""
    device = torch.device(device)
    return torch.Generator(device=CPU if device.type == "meta" else device).manual_seed(seed)


# Batch entries that describe its layout rather than hold data: they stay on the host, where the decisions that
# depend on them (how many candidates each example has) are made without waiting for the device.
HOST_KEYS = frozenset({"num_candidates"})


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on `device` (lists, such as generation prompts, and HOST_KEYS stay)."""
    if device == CPU:
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v
            for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's tensors live on (its first parameter's, else its first buffer's)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return CPU


def describe(device: torch.device) -> dict:
    """What bit-exact results depend on besides the recipe: the device kind and model, the CPU's thread count
    (float sums are split across threads), the torch (and CUDA) version."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": "cuda", "name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
                "torch": torch.__version__, "cuda": torch.version.cuda}
    return {"device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it times the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict:
    """Peak GPU memory since the last reset, allocated by tensors and reserved by the caching allocator (MiB); empty
    on the CPU, whose figure is the process's peak RSS (ftkit.memory)."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}


@contextmanager
def deterministic(device: torch.device):
    """CUDA work made repeatable for the length of a run: deterministic kernels where torch has them (a warning names
    any op that has none), cuBLAS with a fixed workspace, no cuDNN autotuning; the previous settings come back
    after. Nothing changes on the CPU, whose kernels are deterministic for a fixed thread count."""
    if device.type != "cuda":
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
