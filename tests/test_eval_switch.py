"""eval.py's prompt-switch mode: the caption pairs, every switch metric on videos with known answers (the world's
switch, A frozen at the switch, B shown N frames late, B in the wrong colour), and a run of the mode and its CLI with a
tiny random student."""

import dataclasses
import json
import math

import pytest
import torch

import eval as E
from data import toyworld as tw
from model import WanConfig, WanModel
from t5 import tiny_text_encoder
from weights import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

C = 3  # chunk frames of the known-answer videos
SIZES = (16, 24)  # frame sides: nothing below assumes the toy's current 16


def known(size, n_pairs=6, seed=1, num_frames=36, switch_frame=15):
    """Pairs of the world `seed` at this frame size, and the videos' length and switch frame."""
    return E.switch_pairs(n_pairs, seed, size), num_frames, switch_frame


# ----------------------------------------------------------------------------- the pairs


def test_pairs_are_deterministic_distinct_and_from_the_grammar():
    pairs = E.switch_pairs(40, seed=1)
    assert pairs == E.switch_pairs(40, seed=1) and pairs[:5] == E.switch_pairs(5, seed=1)  # prefix-stable
    assert pairs != E.switch_pairs(40, seed=2)
    assert [tw.caption(a) for a, _ in pairs] == tw.captions(40, seed=1)  # A: the evaluation captions
    for a, b in pairs:
        assert a.color != b.color and a.background != b.background
        for s in (a, b):
            assert tw.parse_caption(tw.caption(s))["color"] == s.color and isinstance(s.color, str)
    assert len({(tw.caption(a), tw.caption(b)) for a, b in pairs}) == 40
    assert len({b.color for _, b in pairs}) == len(tw.COLORS)  # the redraw leaves every colour possible


def test_background_match():
    s = tw.sample_spec(3, seed=1)
    video = tw.render(s, 10)
    assert E.background_match(video, s).tolist() == [1.0] * 10
    for g in tw.BACKGROUNDS:
        if g != s.background:
            assert E.background_match(video, dataclasses.replace(s, background=g)).tolist() == [0.0] * 10
    red = torch.tensor(tw.COLORS["red"])[:, None, None, None].expand(3, 4, 8, 8)
    assert E.background_match(red, s).tolist() == [0.0] * 4  # no gray pixel at all


def test_interval():
    assert E.interval([0.5] * 7) == (0.5, 0.5, 0.5)
    x = [0.0, 1.0] * 10
    mean, lo, hi = E.interval(x)
    assert mean == 0.5 and 0.2 < lo < 0.5 < hi < 0.8 and E.interval(x) == (mean, lo, hi)


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("size", SIZES)
def test_world_switch_is_ideal(size):
    pairs, T, T0 = known(size)
    for a, b in pairs:
        video = E.switch_clip(a, b, T, T0, size)
        assert video.shape == (3, T, size, size)
        assert E.switch_score(video, a, b, T0, C) == dict(pre=1.0, latency=0.0, follow=1.0, linger=0.0, hold=0.0,
                                                          bg_latency=0.0, bg_follow=1.0, bg_linger=0.0)


@pytest.mark.parametrize("size", SIZES)
def test_frozen_on_a_is_worst(size):
    pairs, T, T0 = known(size)
    n = T - T0
    worst = dict(pre=1.0, latency=float(n), follow=0.0, linger=1.0, hold=float(n), bg_latency=float(n), bg_follow=0.0,
                 bg_linger=1.0)
    for a, b in pairs:
        frozen = E.frozen_clip(a, T, T0, size)
        assert frozen.shape == (3, T, size, size)
        assert torch.equal(frozen[:, T0:], frozen[:, T0 - 1 : T0].expand(-1, n, -1, -1))
        assert E.switch_score(frozen, a, b, T0, C) == worst
        # a video that carries on with A as if nothing was asked scores the same
        assert torch.equal(E.switch_clip(a, b, T, T0, size, late=n), tw.render(a, T, size))
        assert E.switch_score(E.switch_clip(a, b, T, T0, size, late=n), a, b, T0, C) == worst


@pytest.mark.parametrize("late", [1, 2, 5, 8])
def test_late_switch_has_latency_n(late):
    pairs, T, T0 = known(16)
    n = T - T0
    for a, b in pairs:
        sc = E.switch_score(E.switch_clip(a, b, T, T0, late=late), a, b, T0, C)
        assert sc["latency"] == sc["hold"] == sc["bg_latency"] == late
        assert sc["follow"] == pytest.approx((n - max(late, C)) / (n - C))  # B in frames late .. n-1 of C .. n-1
        assert sc["linger"] == sc["bg_linger"] == pytest.approx(late / n)
        assert sc["bg_follow"] == sc["follow"] and sc["pre"] == 1.0


def test_wrong_colour_is_not_followed():
    """B drawn in a third colour (neither A's nor B's): no object to follow, nothing of A left; the background was
    followed."""
    pairs, T, T0 = known(16)
    n = T - T0
    for a, b in pairs:
        other = next(c for c in tw.COLORS if c not in (a.color, b.color))
        video = E.switch_clip(a, dataclasses.replace(b, color=other), T, T0)
        assert E.switch_score(video, a, b, T0, C) == dict(pre=1.0, latency=float(n), follow=0.0, linger=0.0, hold=0.0,
                                                          bg_latency=0.0, bg_follow=1.0, bg_linger=0.0)


def test_lingering_pieces_of_a():
    """A's object painted back over B's clip for one chunk in the middle: hold counts to that chunk's end, linger its
    share of the post-switch frames; B's object stays followed where A's does not cover it."""
    (a, b), T, T0 = E.switch_pairs(1, seed=1)[0], 36, 15
    video = E.switch_clip(a, b, T, T0)
    ghost = tw.render(a, T)
    on_a = E.color_mask(ghost, a.color)  # [T, S, S]
    video[:, 24:27] = torch.where(on_a[None, 24:27], ghost[:, 24:27], video[:, 24:27])
    sc = E.switch_score(video, a, b, T0, C)
    assert sc["hold"] == 27 - T0 and sc["linger"] == pytest.approx(3 / (T - T0)) and sc["latency"] == 0.0


# ----------------------------------------------------------------------------- a tiny student: generate() and the CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random RGB student and text encoder, in memory and as the files the CLI reads."""
    torch.manual_seed(0)
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=32, text_len=24,
                    in_dim=3, out_dim=3)  # text_len 24: the longest caption is 18 words + EOS; 2 layers, so the
    # cached K/V of the second depend on the prompt (the first layer's come before any cross-attention) and
    # --recache changes something
    model, te = WanModel(cfg).eval(), tiny_text_encoder(tw.WORDS, cfg.text_dim, cfg.text_len)
    d = tmp_path_factory.mktemp("tiny")
    save_safetensors(model, d / "student.safetensors")
    te.save(d / "toy")
    return model, te, [f"--ckpt={d / 'student.safetensors'}", f"--text_encoder={d / 'toy'}"]


def test_generate_switches_at_the_chunk(tiny):
    """The chunks before the switch are the rollout's without it; from the switch on they differ (and again with
    --recache, which re-encodes the window under B)."""
    model, te, _ = tiny
    cfg = E.EvalConfig(num_frames=18, switch=True, switch_chunk=3)  # 6 chunks, B from frame 9
    a, b = [tw.caption(s) for s in E.switch_pairs(1, 1)[0]]
    plain = E.generate(model, te, [a], cfg, seed=0)
    switched = E.generate(model, te, [a], cfg, seed=0, switch_to=[b])
    recached = E.generate(model, te, [a], dataclasses.replace(cfg, recache=True), seed=0, switch_to=[b])
    assert switched.shape == plain.shape == (1, 3, 18, 16, 16)
    assert torch.equal(switched[:, :, :9], plain[:, :, :9]) and torch.equal(recached[:, :, :9], plain[:, :, :9])
    assert not torch.equal(switched[:, :, 9:12], plain[:, :, 9:12])
    assert not torch.equal(recached[:, :, 9:12], switched[:, :, 9:12])


def test_switch_chunk_and_recache_are_checked(tiny):
    _, _, files = tiny
    cfg = E.EvalConfig(num_frames=18, switch=True)
    assert E.switch_chunk(cfg) == 3  # -1: the middle of 6 chunks
    assert E.switch_chunk(dataclasses.replace(cfg, switch_chunk=4)) == 4
    for k in (0, 5, 9):
        with pytest.raises(SystemExit, match=f"--switch_chunk={k}: .* 1 .. 4"):
            E.switch_chunk(dataclasses.replace(cfg, switch_chunk=k))
    with pytest.raises(SystemExit, match="--recache replays whole chunks"):
        E.main([*files, "--switch=true", "--recache=true", "--num_frames=18", "--sink_frames=2", "--window_frames=8"])


def test_cli_switch_mode(tiny, tmp_path, capsys):
    _, _, files = tiny
    n_pairs, T, K = 2, 15, 2  # 5 chunks, B from frame 6: 9 frames after the switch
    result = E.main([*files, "--switch=true", f"--num_captions={n_pairs}", f"--num_frames={T}", f"--switch_chunk={K}",
                     "--seeds=0", "--seeds=1", "--sink_mode=static", "--recache=true", "--png_frames=8",
                     f"--out_png={tmp_path / 'strip.png'}", f"--curve_png={tmp_path / 'curve.png'}"])
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    n = T - K * C
    assert last["num_videos"] == 2 * n_pairs and last["switch_frame"] == K * C and last["num_frames"] == T
    assert last["pairs"] == [[tw.caption(a), tw.caption(b)] for a, b in E.switch_pairs(n_pairs, 1)]
    for row in ("model", "world", "frozen"):
        assert set(last[row]) == set(E.SWITCH_METRICS)
        assert sum(line.startswith(f"{row:8s}") for line in out) == 2  # the object block and the background block
        assert len(last["chunks"][row]["follow"]) == n // C
    for m in E.SWITCH_METRICS:
        r = last["model"][m]
        hi = n if m in E.SWITCH_FRAMES else 1
        assert 0 <= r["lo"] <= r["mean"] <= r["hi"] <= hi, (m, r)
    assert {m: last["world"][m]["mean"] for m in E.SWITCH_METRICS} == dict(
        pre=1.0, latency=0.0, follow=1.0, linger=0.0, hold=0.0, bg_latency=0.0, bg_follow=1.0, bg_linger=0.0)
    assert {m: last["frozen"][m]["mean"] for m in E.SWITCH_METRICS} == dict(
        pre=1.0, latency=n, follow=0.0, linger=1.0, hold=n, bg_latency=n, bg_follow=0.0, bg_linger=1.0)
    assert last["chunks"]["frame_end"] == [3, 6, 9] and "videos" not in last
    assert result["config"]["switch"] and result["config"]["recache"]
    import imageio.v2 as imageio

    strip = imageio.imread(tmp_path / "strip.png")  # 2 pairs x (model, world) rows of 8 frames
    assert strip.shape[2] == 3 and strip.shape[1] > strip.shape[0]
    assert imageio.imread(tmp_path / "curve.png").ndim == 3
    assert all(math.isfinite(last["model"][m]["mean"]) for m in E.SWITCH_METRICS)


def test_before_the_switch_is_the_plain_evaluation(tiny):
    """A of pair i is evaluation caption i and the noise is seeded alike: the frames before the switch are
    evaluate()'s."""
    model, te, _ = tiny
    cfg = E.EvalConfig(num_captions=3, seeds=[0], num_frames=12, batch_size=2, segment_frames=6, switch=True,
                       switch_chunk=2)
    plain = E.evaluate(model, te, cfg, log=lambda *a: None)["videos"]
    switched = E.evaluate_switch(model, te, cfg, log=lambda *a: None)
    assert switched["videos"].shape == plain.shape == (3, 3, 12, 16, 16) and switched["switch_frame"] == 6
    assert torch.equal(switched["videos"][:, :, :6], plain[:, :, :6])
    assert not torch.equal(switched["videos"][:, :, 6:], plain[:, :, 6:])


def test_cli_switch_runs_over_training_seeds(tiny, capsys):
    """--switch with --runs: the same student given twice is two identical runs, so the mean over runs is the single
    run's mean and the 95% interval has zero width, for every switch metric."""
    _, _, files = tiny
    ckpt = files[0].split("=", 1)[1]
    args = [*files, "--switch=true", "--num_captions=2", "--num_frames=15", "--switch_chunk=2"]
    single = E.main(args)["model"]
    agg = E.main([*args, f"--runs={ckpt}"])["over_runs"]
    assert set(agg) == set(E.SWITCH_METRICS)
    for m in E.SWITCH_METRICS:
        assert agg[m]["runs"] == [single[m]["mean"]] * 2
        assert agg[m]["mean"] == pytest.approx(single[m]["mean"]) and agg[m]["lo"] == pytest.approx(agg[m]["hi"])
    assert "over 2 training runs" in capsys.readouterr().out
