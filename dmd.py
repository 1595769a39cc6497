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

    def sample_t(self, n, generator=None, device=None, t_min=20.0, t_max=980.0):
        """DMD / critic timesteps: u ~ U[0, 1), t = 1000 k u / (1 + (k - 1) u), clamped to [t_min, t_max]. (n,)"""
        u = torch.rand(n, generator=generator, device=device)
        return (1000.0 * shift_sigma(u, self.shift)).clamp(t_min, t_max)

    def trajectory(self, steps, shift=None, through=()):
        """t of an Euler sampler: `steps` steps from 1000 down to 0, sigmas warped by `shift` (the teacher's ODE:
        48 steps, shift 8). A list of floats, strictly decreasing from 1000 to 0.

        through: timesteps the grid must pass through exactly (the ODE stage gives the student's, e.g. 1000, 937.5,
        833.3, 625), so the trajectory holds a latent at precisely the t the student is trained and rolled out at.
        The grid is the union of the `steps`-step grid and these values (the same Python floats, so the stored
        timesteps equal the student's bit for bit), sorted descending, exact duplicates removed: each value not
        already on the grid splits one Euler step in two (48 -> at most 51 steps for the student's 4 timesteps,
        1000 being on every grid). Every other grid point is unchanged."""
        k = self.shift if shift is None else shift
        grid = [1000.0 * shift_sigma(1.0 - i / steps, k) for i in range(steps + 1)]
        if any(not 0.0 <= t <= 1000.0 for t in through):
            raise ValueError(f"trajectory: timesteps to pass through must be in [0, 1000], got {list(through)}")
        return sorted(set(grid) | {float(t) for t in through}, reverse=True)


def cfg(cond, uncond, scale):
    """Classifier-free guidance: uncond + scale (cond - uncond). The released Re-DMD code writes the real score as
    cond + 3 (cond - uncond), which is scale 4 here."""
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def euler_sample(model, x, ts, ctx, uncond=None, guidance=1.0, keep=()):
    """The teacher's own sampler: Euler steps of dx/ds = v along the grid ts (1000 ... 0, FlowMatch.trajectory) from
    the noise x (B, C, F, h, w), with classifier-free guidance when `uncond` is given (the negative prompt's context,
    (1, L, D) or (B, L, D); cond and uncond run as one batch). ctx (B, L, D). Returns the end point x (B, C, F, h, w)
    fp32 and {i: the latent at grid point i} for each index in `keep` (the ODE stage's pairs)."""
    B, kept = x.shape[0], {}
    if uncond is not None:
        ctx = torch.cat([ctx, uncond.expand(B, -1, -1)])
    x = x.float()
    for i in range(len(ts)):
        if i in keep:
            kept[i] = x.clone()
        if i == len(ts) - 1:
            break
        t = torch.full((ctx.shape[0],), ts[i], device=x.device)
        v = model(x if uncond is None else torch.cat([x, x]), t, ctx).float()
        if uncond is not None:
            v = cfg(v[:B], v[B:], guidance)
        x = x + (ts[i + 1] / 1000.0 - ts[i] / 1000.0) * v  # the step in sigma = t / 1000
    return x, kept


def dmd_loss(x, x0_real, x0_fake, weight=None):
    """Distribution matching (paper Eq. 1-2), rewarded when `weight` is given (Eq. 11).

    x: the generator's samples (with grad); x0_real / x0_fake: the real (teacher, with CFG) and fake (critic)
    x0 predictions from a noised copy of x (no grad). Per sample the DMD gradient is
        g = (x0_fake - x0_real) / mean|x - x0_real|     (score difference, normalised per sample as in DMD)
    and the loss 0.5 * ||x - sg(x - w g)||^2 / x.numel() has d loss / d x = w g / x.numel(). weight: (B,) or None."""
    B = x.shape[0]
    with torch.no_grad():
        norm = (x - x0_real).abs().flatten(1).mean(dim=1).clamp_min(1e-8).view(B, *([1] * (x.dim() - 1)))
        g = torch.nan_to_num((x0_fake - x0_real) / norm)
        if weight is not None:
            g = g * weight.view(B, *([1] * (x.dim() - 1)))
        target = x - g
    return 0.5 * torch.nn.functional.mse_loss(x.float(), target.float(), reduction="sum") / x.numel()


def reward_weight(r, beta=0.5, clip=None):
    """Re-DMD's sample weight exp(r / beta) (paper Eq. 9-11; beta = 1/2 in the paper, the code writes exp(2 r)).
    clip: clamp r to [-clip, clip] first. E[exp(2 z)] = e^2 for z ~ N(0, 1), so one outlier can dominate a batch:
    clipping (or normalising the weights over the global batch, in train.py) tames that. beta = inf gives 1: DMD."""
    if clip is not None:
        r = r.clamp(-clip, clip)
    if beta == float("inf"):
        return torch.ones_like(r)
    return torch.exp(r / beta)


def flow_matching_loss(v, eps, x0):
    """Flow matching: mean (v - (eps - x0))^2 for the velocity v a network predicts at x_t = (1 - s) x0 + s eps.
    It pretrains the toy teacher on data, and trains the critic, DMD's fake score s_fake (paper Eq. 1-2, 11), on
    fresh student samples x0: a denoising objective on the generator's output distribution (paper §3.3)."""
    return torch.nn.functional.mse_loss(v.float(), (eps - x0).float())


def ode_loss(x0_pred, x0_target):
    """ODE initialisation (paper §4): regress the student's x0 prediction on the teacher's ODE end point."""
    return torch.nn.functional.mse_loss(x0_pred.float(), x0_target.float())
