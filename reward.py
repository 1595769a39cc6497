"""
Rewards for Re-DMD (paper §3.3). The interface training uses:

    r = reward(pixels, prompts)   # pixels [B, 3, T, H, W] in [-1, 1], prompts: list of B str -> [B] fp32, no grad

Re-DMD weights each sample's DMD gradient by exp(r / beta), so r should be a z-score (mean 0, std 1 over typical
samples): beta = 1/2 then means a one-sigma better video counts e^2 = 7.4x more.

- MotionReward: weightless, no downloads. The mean magnitude of temporal change, z-scored with running statistics.
  Enough to run Re-DMD end to end and to favour dynamic videos in toy experiments.
- The paper's reward, VideoAlign's motion quality (a Qwen2-VL-2B reward model), follows below it.
"""

import torch


class MotionReward:
    """r = z-score of log(eps + mean_t |x_{t+1} - x_t|): how much the video moves, relative to what it has seen.

    The statistics are running (momentum `momentum` per call, the first call sets them), so the reward adapts as the
    generator changes; they are part of a training checkpoint (state_dict / load_state_dict) so resume is exact.
    The log makes the score scale-free: doubling the motion adds a constant, whatever the content."""

    def __init__(self, momentum=0.99, eps=1e-3):
        self.momentum, self.eps = momentum, eps
        self.mean = None  # running mean and variance of the raw score (python floats: checkpointable, no device)
        self.var = None

    def raw(self, pixels):
        """pixels [B, 3, T, H, W] in [-1, 1] -> [B] log mean absolute frame difference."""
        if pixels.dim() != 5 or pixels.shape[2] < 2:
            raise ValueError(f"MotionReward needs pixels [B, 3, T >= 2, H, W]; got {tuple(pixels.shape)}")
        d = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().float().mean(dim=(1, 2, 3, 4))
        return torch.log(self.eps + d)

    @torch.no_grad()
    def __call__(self, pixels, prompts=None):
        s = self.raw(pixels)
        m, v = s.mean().item(), s.var(unbiased=False).item() if s.numel() > 1 else 0.0
        if self.mean is None:
            self.mean, self.var = m, max(v, 1e-4)
        else:
            a = self.momentum
            self.mean = a * self.mean + (1 - a) * m
            self.var = a * self.var + (1 - a) * max(v, 1e-4)
        return (s - self.mean) / self.var**0.5

    def state_dict(self):
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, sd):
        self.mean, self.var = sd["mean"], sd["var"]
