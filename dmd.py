"""
Flow matching and (rewarded) distribution matching distillation.

Flow matching as in Wan2.1: x_t = (1 - s) x0 + s eps with s = sigma in [0, 1], the model sees
t = 1000 s and predicts the velocity v = eps - x0, so x0 = x_t - s v. A shift k warps sigma:
s' = k s / (1 + (k - 1) s) (paper S4; k = 5 for the student, 8 for the teacher's ODE).
"""

import torch


def shift_sigma(s, shift):
    """s in [0, 1] -> k s / (1 + (k - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


class FlowMatch:
    def __init__(self, shift=5.0):
        self.shift = shift

    def sigma(self, t):
        """Model timestep t in [0, 1000] -> noise level s = t / 1000 (t is already warped)."""
        return t / 1000.0

    def timesteps(self, steps=(1000, 750, 500, 250)):
        """The few-step student schedule warped by the shift: (1000, 750, 500, 250) -> (1000, 937.5, 833.3, 625)
        for shift 5. A list of floats (host values: schedules never need a device sync)."""
        return [1000.0 * shift_sigma(s / 1000.0, self.shift) for s in steps]

    def add_noise(self, x0, eps, t):
        """x_t = (1 - s) x0 + s eps; t (B,) broadcast over the other dims, or a float."""
        s = self.sigma(t)
        if torch.is_tensor(s):
            s = s.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * eps

    def x0_from_v(self, x_t, v, t):
        s = self.sigma(t)
        if torch.is_tensor(s):
            s = s.view(-1, *([1] * (x_t.dim() - 1)))
        return x_t - s * v
