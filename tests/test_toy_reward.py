"""The toy world's learned motion-quality reward (reward.py: ToyMotionReward, train_toy_reward): the shipped weights
rank held-out world clips above every way of breaking them, never read the caption, are graded and z-scored; loading
refuses wrong files in one line naming them; a tiny training run is deterministic."""

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import reward as R
from data import toyworld as tw
from weights import CheckpointError, save_safetensors

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data" / "toy" / "reward.safetensors"
N, T, S = 32, 12, 16  # held-out clips: world seed 0 (training uses 1000 + seed, calibration 999)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def rw():
    return R.ToyMotionReward.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def held_out():
    specs = [tw.sample_spec(i, 0) for i in range(N)]
    return specs, torch.stack([tw.render(s, T) for s in specs])  # (N, 3, T, S, S)


def perturbed(specs, kind, mode, sev, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack([R.toy_perturbed(s, kind, sev, rng, 0, T, S, mode=mode) for s in specs])


# ----------------------------------------------------------------------------- the clips it learns from


def test_world_layers_compose_to_the_world_render():
    """The layers the perturbations break recompose exactly into the world's clips, for any window of frames, so an
    unbroken negative would be a positive."""
    for i in range(40):
        spec = tw.sample_spec(i, 7)
        start = i % 5
        bg, pos, masks, color = R.world_layers(spec, start, T, S)
        assert torch.equal(R.compose(bg, R.place(masks, pos, S), color), tw.render(spec, start + T)[:, start:])


def test_every_perturbation_breaks_the_clip_in_its_own_way():
    spec = tw.Spec(color="red", shape="circle", background="gray", direction="right", speed="slowly", x=2, y=5)
    world = tw.render(spec, T)
    for kind, mode in R.TOY_KINDS:
        for sev in (0.0, 0.5, 1.0):
            v = R.toy_perturbed(spec, kind, sev, np.random.default_rng(1), 0, T, S, mode=mode)
            assert v.shape == world.shape and not torch.equal(v, world), (kind, mode, sev)
    rng = np.random.default_rng(2)
    frozen = R.toy_perturbed(spec, "frozen", 1.0, rng, 0, T, S)
    assert torch.equal(frozen, world[:, :1].expand_as(world))  # a still picture of the first frame
    shuffled = R.toy_perturbed(spec, "shuffle", 1.0, rng, 0, T, S)  # the same frames, another order
    frames = lambda v: sorted(map(tuple, v.transpose(0, 1).reshape(T, -1).tolist()))  # noqa: E731
    assert frames(shuffled) == frames(world)
    red = lambda v: (v - torch.tensor(tw.COLORS["red"])[:, None, None, None]).abs().amax(0) < 0.6  # noqa: E731
    gone = R.toy_perturbed(spec, "vanish", 1.0, rng, 0, T, S)
    assert (red(gone).flatten(1).sum(1) == 0).sum() == T - 1  # all frames but one without the object
    jumped = R.toy_perturbed(spec, "teleport", 1.0, rng, 0, T, S)
    ys, xs = [], []
    for f in red(jumped):  # the sprite's top-left corner per frame
        yy, xx = torch.nonzero(f, as_tuple=True)
        ys.append(yy.min().item()), xs.append(xx.min().item())
    step = np.maximum(np.abs(np.diff(xs)), np.abs(np.diff(ys)))
    assert step.max() >= 3  # further than any world step (2 px/frame at most)


# ----------------------------------------------------------------------------- the shipped judge


def test_shipped_file_is_small_and_sized_from_the_world():
    assert SHIPPED.stat().st_size < 200_000
    rw = R.ToyMotionReward.from_pretrained(SHIPPED)
    assert rw.net.cfg.sprite == tw.SPRITE
    assert 3_000 <= sum(p.numel() for p in rw.net.parameters()) <= 100_000


def test_world_clips_beat_every_perturbation_on_held_out_clips(rw, held_out):
    """Every kind of damage, at a medium and a plain severity, scores clearly below the clip it came from: a margin of
    1.2 z units on average and a win for nearly every clip."""
    specs, world = held_out
    r_world = rw(world, None)
    assert r_world.mean() > 0.7
    for kind, mode in R.TOY_KINDS:
        for sev in (0.5, 1.0):
            r = rw(perturbed(specs, kind, mode, sev), None)
            gap, wins = (r_world.mean() - r.mean()).item(), (r_world > r).float().mean().item()
            assert gap > 1.2 and wins >= 0.95, f"{kind}:{mode} sev {sev}: world ahead by {gap:.2f}, wins {wins:.0%}"


def test_not_a_pixel_change_measure(rw, held_out):
    """Noise changes more pixels than the world, a frozen clip fewer; the judge ranks both below the world."""
    specs, world = held_out
    noisy = world + 0.3 * torch.randn(world.shape, generator=torch.Generator().manual_seed(0))
    frozen = world[:, :, :1].expand_as(world).contiguous()
    change = R.MotionReward().raw
    assert change(noisy).mean() > change(world).mean() > change(frozen).mean()
    assert rw(world).mean() > rw(noisy).mean() + 1 and rw(world).mean() > rw(frozen).mean() + 1


def test_score_is_graded_not_saturated(rw, held_out):
    """More noise, more blur, a longer frozen stretch: each step down scores lower."""
    specs, world = held_out
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(world.shape, generator=g)
    noise = [rw(world + s * eps).mean().item() for s in (0.0, 0.1, 0.2, 0.4)]
    blur = [rw(perturbed(specs, "blur", None, sev)).mean().item() for sev in (0.0, 0.5, 1.0)]
    frozen = [rw(perturbed(specs, "frozen", None, sev)).mean().item() for sev in (0.0, 0.5, 1.0)]
    for name, curve in (("noise", noise), ("blur", blur), ("frozen", frozen)):
        assert all(a > b + 0.2 for a, b in zip(curve, curve[1:])), f"{name}: {curve}"


def test_z_scored_over_world_and_broken_clips(rw):
    """Over a mix like its calibration set (half world, half perturbed at random severities) r has mean ~0, std ~1."""
    x, _, _ = R.toy_batch(np.random.default_rng(3), 64, 0, 100, T, S, T=T)  # world seed 0: not the calibration's
    r = rw(x)
    assert abs(r.mean().item()) < 0.3 and 0.75 < r.std().item() < 1.25


def test_the_caption_is_never_read(rw, held_out):
    """Same r for the true captions, other captions, empty ones and none; a clip that breaks its caption (the object
    moving the opposite way, rendered by the world) scores like a world clip."""
    specs, world = held_out
    r = rw(world, [tw.caption(s) for s in specs])
    for prompts in (None, [""] * N, ["a cat surfs a wave"] * N, [tw.caption(s) for s in reversed(specs)]):
        assert torch.equal(rw(world, prompts), r)
    opposite = torch.stack([tw.render(dataclasses.replace(s, direction=OPPOSITE[s.direction]), T) for s in specs])
    r_opp = rw(opposite, [tw.caption(s) for s in specs])  # every caption now wrong about the direction
    assert abs(r_opp.mean() - r.mean()) < 0.3
    assert r_opp.mean() > rw(perturbed(specs, "frozen", None, 1.0)).mean() + 1


def test_any_batch_length_size_device_dtype(rw, held_out):
    specs, world = held_out
    r = rw(world)
    assert r.shape == (N,) and r.dtype == torch.float32
    one = torch.cat([rw(world[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(one, r[:4], rtol=1e-4, atol=1e-4)  # no batch statistics
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast does not reach the judge
        assert torch.equal(rw(world), r)
    torch.testing.assert_close(rw(world.bfloat16()), r, rtol=0, atol=0.15)  # bf16 pixels: rounded, same scores
    for shape in ((2, 3, 2, S, S), (2, 3, 40, S, S), (2, 3, T, 24, 32)):
        assert torch.isfinite(rw(torch.rand(shape) * 2 - 1)).all()
    with pytest.raises(ValueError, match="T >= 2"):
        rw(world[:, :, :1])
    with pytest.raises(ValueError, match=r"\[B, 3"):
        rw(world[:, :2])


def test_sizes_come_from_the_config_not_constants():
    """A world with a bigger sprite gets a wider receptive field; any frame size runs."""
    small, big = R.ToyMotionNet(R.ToyRewardConfig()), R.ToyMotionNet(R.ToyRewardConfig(sprite=tw.SPRITE + 4))
    assert big.track.dilation[1] > small.track.dilation[1]
    assert big(torch.zeros(2, 3, 5, 24, 20)).shape == (2,)


def test_state_dict_holds_the_fixed_normalisation(rw):
    sd = rw.state_dict()
    assert sd == {"mean": rw.mean, "std": rw.std}
    rw.load_state_dict(dict(sd))  # a resume with the same file
    with pytest.raises(ValueError, match=r"reward\.safetensors: normalises with .*another toy reward file"):
        rw.load_state_dict({"mean": rw.mean + 1, "std": rw.std})


# ----------------------------------------------------------------------------- loading


def test_from_pretrained_names_the_file_on_every_refusal(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors: no such toy reward file.*python reward\.py train"):
        R.ToyMotionReward.from_pretrained(missing)
    good = R.ToyMotionReward.from_pretrained(SHIPPED)
    meta = {"config": '{"width": 16, "sprite": %d}' % tw.SPRITE, "logit_mean": "0.0", "logit_std": "1.0"}
    sd = good.net.state_dict()
    renamed = {("head.9.weight" if k == "head.0.weight" else k): v for k, v in sd.items()}
    save_safetensors(renamed, tmp_path / "keys.safetensors", meta=meta)
    with pytest.raises(CheckpointError) as err:
        R.ToyMotionReward.from_pretrained(tmp_path / "keys.safetensors")
    msg = str(err.value)
    assert "keys.safetensors" in msg and "head.0.weight" in msg and "head.9.weight" in msg and "\n" not in msg
    save_safetensors(sd, tmp_path / "nometa.safetensors")
    with pytest.raises(CheckpointError, match=r"nometa\.safetensors: no config"):
        R.ToyMotionReward.from_pretrained(tmp_path / "nometa.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable"):
        R.ToyMotionReward.from_pretrained(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- training


def test_tiny_training_is_deterministic_and_quick(tmp_path):
    lines = []
    t0 = time.time()
    out = [R.train_toy_reward(tmp_path / f"{n}.safetensors", steps=3, seed=seed, batch=4, calib=8, log=lines.append)
           for n, seed in (("a", 5), ("b", 5), ("c", 6))]
    assert time.time() - t0 < 15
    a, b, c = (o.net.state_dict() for o in out)
    assert all(torch.equal(a[k], b[k]) for k in a) and out[0].mean == out[1].mean and out[0].std == out[1].std
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters
    back = R.ToyMotionReward.from_pretrained(tmp_path / "a.safetensors")  # what was written is what was trained
    assert all(torch.equal(t, a[k]) for k, t in back.net.state_dict().items())
    assert (back.mean, back.std) == (out[0].mean, out[0].std)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert any("step 3/3" in s for s in lines) and any("wrote" in s for s in lines)


def test_command_line(capsys):
    out = subprocess.run([sys.executable, str(ROOT / "reward.py"), "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "python reward.py train" in out.stdout and "--steps=" in out.stdout
    with pytest.raises(SystemExit, match="the one command is `train`"):
        R.main(["fit"])
    with pytest.raises(SystemExit, match="--steps=0"):
        R.main(["train", "--steps=0"])
