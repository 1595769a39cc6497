"""dmd.py against closed forms: the flow-matching schedule, the DMD gradient, Re-DMD's exponential tilting."""

import math

import pytest
import torch

from dmd import FlowMatch, cfg, dmd_loss, flow_matching_loss, reward_weight


def test_flow_matching_roundtrip_and_schedules():
    fm = FlowMatch(5.0)
    x0, eps = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = torch.tensor([1000.0, 625.0, 20.0])
    x_t = fm.add_noise(x0, eps, t)
    assert torch.allclose(x_t[1], 0.375 * x0[1] + 0.625 * eps[1])
    assert torch.allclose(fm.x0_from_v(x_t, eps - x0, t), x0, atol=1e-6)  # v = eps - x0 recovers x0
    assert fm.timesteps() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0])
    tr = FlowMatch(8.0).trajectory(48)
    assert len(tr) == 49 and tr[0] == 1000.0 and tr[-1] == 0.0 and all(a > b for a, b in zip(tr, tr[1:]))
    assert tr[24] == pytest.approx(1000 * 8 * 0.5 / (1 + 7 * 0.5))
    t = fm.sample_t(200_000, torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 980
    assert t.median().item() == pytest.approx(1000 * 2.5 / 3, abs=3)  # u = 1/2 -> 5/2 / 3
    assert torch.allclose(cfg(torch.tensor(2.0), torch.tensor(1.0), 4.0), torch.tensor(2.0 + 3 * 1.0))


def test_ode_trajectory_passes_exactly_through_the_students_timesteps():
    """The ODE stage's teacher grid: the 48-step shift-8 grid with the student's shift-5 timesteps added exactly (the
    nearest plain grid points are up to 9.6 off: 935.8, 827.6, 615.4), every other point unchanged."""
    student = FlowMatch(5.0).timesteps((1000, 750, 500, 250))
    plain = FlowMatch(8.0).trajectory(48)
    tr = FlowMatch(5.0).trajectory(48, shift=8.0, through=student)
    assert all(t in tr for t in student)  # the same floats, not merely close
    assert tr[0] == 1000.0 and tr[-1] == 0.0 and all(a > b for a, b in zip(tr, tr[1:]))
    assert len(tr) == 52 and [t for t in tr if t not in student[1:]] == plain  # 3 points added (1000 is on the grid)
    nearest = [min(plain, key=lambda p: abs(p - t)) for t in student[1:]]
    assert nearest == pytest.approx([935.8, 827.6, 615.4], abs=0.05)
    assert max(abs(p - t) for p, t in zip(nearest, student[1:])) == pytest.approx(9.6, abs=0.05)
    assert FlowMatch(8.0).trajectory(48, through=()) == plain
    with pytest.raises(ValueError, match="must be in \\[0, 1000\\]"):
        FlowMatch(8.0).trajectory(4, through=[1200.0])


def test_dmd_loss_gradient_is_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, requires_grad=True)
    real, fake = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    w = torch.tensor([0.5, 1.0, 7.0])
    dmd_loss(x, real, fake, w).backward()
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = w.view(3, 1, 1, 1) * (fake - real) / norm / x.numel()
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-9)


def test_beta_infinity_is_plain_dmd():
    r = torch.tensor([-3.0, 0.0, 2.5])
    assert torch.equal(reward_weight(r, float("inf")), torch.ones(3))
    assert torch.allclose(reward_weight(r, 0.5), torch.exp(2 * r))  # the released code's exp(2 r)
    assert torch.allclose(reward_weight(r, 0.5, clip=1.0), torch.exp(2 * r.clamp(-1, 1)))
    x = torch.randn(3, 8, requires_grad=True)
    real, fake = torch.randn(3, 8), torch.randn(3, 8)
    (ga,) = torch.autograd.grad(dmd_loss(x, real, fake, reward_weight(r, float("inf"))), x)
    (gb,) = torch.autograd.grad(dmd_loss(x, real, fake), x)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_reward_weights_tilt_the_mean(beta):
    """r(x) = x, x ~ N(0, 1): E[x e^{x/beta}] / E[e^{x/beta}] = 1/beta (the tilted Gaussian is N(1/beta, 1))."""
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = reward_weight(x, beta)
    assert (w * x).sum() / w.sum() == pytest.approx(1 / beta, abs=0.05)


def gaussian_x0(x_t, t, mu):
    """E[x0 | x_t] for data N(mu, 1) under x_t = (1 - s) x0 + s eps: the exact denoiser of a Gaussian."""
    s = t / 1000
    a = 1 - s
    return mu + a / (a * a + s * s) * (x_t - a * mu)


def test_dmd_moves_the_generator_to_the_real_mean():
    """Real data N(2, 1); generator G(z) = mu_g + z, so the fake distribution is N(mu_g, 1), and both scores are the
    exact Gaussian denoisers. Gradient descent on dmd_loss drives mu_g to the real mean 2."""
    fm = FlowMatch(5.0)
    g = torch.Generator().manual_seed(0)
    mu_g = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([mu_g], lr=0.2)
    dist = []
    for _ in range(60):
        x = mu_g + torch.randn(256, 16, generator=g)
        t = fm.sample_t(256, g).view(-1, 1)
        x_t = fm.add_noise(x.detach(), torch.randn(256, 16, generator=g), t.view(-1))
        loss = dmd_loss(x, gaussian_x0(x_t, t, 2.0), gaussian_x0(x_t, t, mu_g.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dist.append(abs(mu_g.item() - 2.0))
    assert dist[-1] < 1e-3 and all(b <= a + 1e-3 for a, b in zip(dist, dist[1:]))  # monotone, to the real mean


def test_flow_matching_loss_is_zero_at_the_velocity():
    x, eps = torch.randn(2, 3), torch.randn(2, 3)
    assert flow_matching_loss(eps - x, eps, x).item() == 0.0
    assert flow_matching_loss(eps - x + 1.0, eps, x).item() == pytest.approx(1.0)
    assert math.isfinite(dmd_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4)).item())  # 0 / 0 guarded


class _Velocity(torch.nn.Module):
    """A stand-in network: v = f(x, t, ctx), with ctx's first entry choosing the conditional or unconditional branch."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, t, ctx):
        return self.f(x, t, ctx)


def test_euler_sample_lands_on_the_point_mass_and_keeps_the_grid_points():
    """For data that is one point x0 the flow is straight: v(x, s) = (x - x0) / s, so Euler lands on x0 exactly from
    any noise on any grid, and the latent kept at grid point i is (1 - s_i) x0 + s_i eps (closed form)."""
    from dmd import euler_sample

    x0, eps = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    net = _Velocity(lambda x, t, ctx: (x - x0) / (t / 1000.0).view(-1, 1, 1, 1, 1))
    ts = FlowMatch(3.0).trajectory(7, through=[900.0])
    out, kept = euler_sample(net, eps, ts, torch.zeros(2, 1, 1), keep=[0, 3, len(ts) - 1])
    assert torch.allclose(out, x0.float(), atol=1e-5)
    for i in (0, 3):
        s = ts[i] / 1000.0
        assert torch.allclose(kept[i], ((1 - s) * x0 + s * eps).float(), atol=1e-5)
    assert torch.equal(kept[len(ts) - 1], out)


def test_euler_sample_guidance_and_step_sizes_are_the_formula():
    """Constant velocities: cond c1, uncond c2. Guided v = c2 + g (c1 - c2), and the end point is x - v (the steps
    in sigma sum to -1); with v = x instead, Euler multiplies x by prod (1 + ds_i) over the grid."""
    from dmd import euler_sample

    c1, c2, g = torch.tensor(0.5), torch.tensor(-1.0), 3.0
    net = _Velocity(lambda x, t, ctx: torch.where(ctx[:, :1, :1, None, None] > 0, c1, c2).expand_as(x))
    x = torch.randn(3, 1, 2, 2, 2)
    ts = FlowMatch(5.0).trajectory(6)
    out, _ = euler_sample(net, x, ts, torch.ones(3, 1, 1), uncond=-torch.ones(1, 1, 1), guidance=g)
    assert torch.allclose(out, x - (c2 + g * (c1 - c2)), atol=1e-6)
    out, _ = euler_sample(_Velocity(lambda x, t, ctx: x), x, ts, torch.zeros(3, 1, 1))
    factor = math.prod(1 + (b - a) / 1000.0 for a, b in zip(ts, ts[1:]))
    assert torch.allclose(out, x * factor, atol=1e-6)
