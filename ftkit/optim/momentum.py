"""Momentum on the projected gradient (method.zo.momentum; ZO-AdaMU, Jiang et al. 2024, and LOZO-M, Chen et al.
ICLR 2025, keep momentum in zeroth-order steps): a float32 buffer m per trained tensor,

    m <- beta m + sum_i c_i u2_i,      w <- w + lr m        (c_i: the estimator's coefficients at rate 1, -g_i / n)

so the step's learning rate scales the buffer, not what enters it: a schedule changes the step, not the history.
The buffer depends only on the seeds and the projected gradients, so a replay rebuilds it from the trace; a
checkpoint saves it, so a resume continues with it bit for bit. Costs one float32 copy of the trained tensors:
right for norms, scales and adapters, heavy for full-parameter runs. Low-bit codes are refused: their update lands on
a grid with no float master copy, and a buffer in grid units would need one.
"""

from __future__ import annotations

import torch

from ftkit.optim.zo_streams import Q1


class Momentum:
    def __init__(self, beta: float, targets: list):
        self.beta = beta
        self.buffers = {t.index: torch.zeros(t.numel, dtype=torch.float32, device=t.device) for t in targets}

    @torch.no_grad()
    def update(self, target, d, query_seeds: list[int], coefs: list[float], lr: float, restore: float, decay: float,
               step) -> None:
        """Undo the last query's perturbation (+restore * u1), apply decoupled weight decay, fold the step's
        directions into the buffer and move the tensor along it; a chunk of each direction at a time."""
        p, m = target.flat(), self.buffers[target.index]
        held = (lambda seed: None) if step is None else (lambda seed: step.held(seed, target.index))
        for part, (u1,) in d.chunks(query_seeds[-1], target.index, p.numel(), p.device, (Q1,), held(query_seeds[-1])):
            p[part].add_(u1.to(p.dtype), alpha=restore)
            del u1
        if decay and target.decay:
            p.mul_(1.0 - decay)
        m.mul_(self.beta)
        for seed, coef in zip(query_seeds, coefs):
            for part, (u2,) in d.chunks(seed, target.index, p.numel(), p.device, (d.update_stream,), held(seed)):
                m[part].add_(u2, alpha=coef)
                del u2
        p.add_(m.to(p.dtype), alpha=lr)

    def state_dict(self) -> dict:
        return {str(index): buffer for index, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        for index, buffer in self.buffers.items():
            buffer.copy_(state[str(index)])
