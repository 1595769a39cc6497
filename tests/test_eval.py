"""The toy world (data/toyworld.py) and its metrics (eval.py): every metric on videos with known answers, the world's
determinism and grammar, and a smoke run of evaluate() and the CLI with a tiny random student."""

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as E
from data import toyworld as tw
from model import WanConfig, WanModel
from t5 import tiny_text_encoder
from weights import save_safetensors

ROOT = Path(__file__).resolve().parent.parent
SPEC = tw.Spec(color="red", shape="circle", background="gray", direction="right", speed="slowly", x=5, y=5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def specs(n=60, seed=3):
    return [tw.sample_spec(i, seed) for i in range(n)]


def tiny_student_and_encoder():
    """A tiny random RGB student and a word-level tokenizer + random tiny umT5 over the world's vocabulary."""
    torch.manual_seed(0)
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, freq_dim=16, text_dim=32, text_len=24,
                    in_dim=3, out_dim=3)  # text_len 24 (the toy preset's): the longest caption is 18 words + EOS
    return WanModel(cfg).eval(), tiny_text_encoder(tw.WORDS, cfg.text_dim, cfg.text_len)


# ----------------------------------------------------------------------------- the world


def test_world_is_deterministic_by_seed_and_index():
    a, b = tw.clip(7, num_frames=20, seed=5), tw.clip(7, num_frames=20, seed=5)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert a[0].shape == (3, 20, 16, 16) and a[0].dtype == torch.float32
    assert a[0].min() >= -1 and a[0].max() <= 1
    assert [tw.sample_spec(i, 0) for i in range(50)] != [tw.sample_spec(i, 1) for i in range(50)]
    assert tw.captions(5, seed=2) == [tw.clip(i, seed=2)[1] for i in range(5)]
    # the first frames of a longer render are the shorter render: videos of any length tell one story
    assert torch.equal(tw.render(a[2], 120)[:, :20], a[0])


def test_every_caption_parses_back_and_uses_only_words():
    used = set()
    for s in specs(400, seed=0):
        text = tw.caption(s)
        want = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("x", "y")}
        assert tw.parse_caption(text) == want
        assert all(w in tw.WORDS for w in text.split())
        used |= set(text.split())
    assert used == set(tw.WORDS) and tw.WORDS == sorted(tw.WORDS)  # no word is dead
    with pytest.raises(ValueError):
        tw.parse_caption("a purple circle moves left fast on a gray background")


def test_render_is_fast():
    s = tw.sample_spec(0, seed=0)
    t = time.perf_counter()
    video = tw.render(s, 120)
    assert time.perf_counter() - t < 1.0 and video.shape == (3, 120, 16, 16)


def test_toyworld_main_writes_a_strip(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "data" / "toyworld.py"), "3", "6", str(tmp_path / "s.png")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s.png").exists() and tw.captions(1)[0] in out.stdout


# ----------------------------------------------------------------------------- metrics with known answers


def test_static_video_has_zero_dynamics():
    video = tw.render(SPEC, 60)
    assert E.dynamics(video[:, :1].expand_as(video)) == 0.0
    assert E.dynamics(video) > 0.02
    assert min(E.dynamics(tw.render(s, 60)) for s in specs(20)) > 0.01  # every world clip moves


def test_copy_score():
    video = tw.render(tw.sample_spec(2, seed=1), 120)
    copied = video[:, :3].repeat(1, 40, 1, 1)  # every frame is one of the first chunk's
    assert E.copy_score(copied, chunk_frames=3) == 1.0
    assert E.copy_score(video[:, :1].expand_as(video)) == 1.0  # a frozen first frame
    scores = [E.copy_score(tw.render(s, 120)) for s in specs(20)]
    assert max(scores) < 0.8 and sum(scores) / len(scores) < 0.45  # bouncing objects pass their start again


def test_world_clips_score_full_fidelity_alignment_and_camera():
    """Bounces, turns, speed-ups and pans: the world obeys its captions, and the metrics see it."""
    for s in specs(60):
        video, text = tw.render(s, 72), tw.caption(s)
        assert E.fidelity(video, text) == 1.0
        assert E.alignment(video, text) == 1.0, text
        assert E.camera(video, text) == 1.0, text
        assert E.drift(video, text, segment_frames=12) == 0.0


def test_wrong_colour_or_shape_fails_fidelity():
    text = tw.caption(SPEC)
    assert E.fidelity(tw.render(SPEC, 24), text) == 1.0
    for color in ("green", "blue", "yellow"):
        assert E.fidelity(tw.render(dataclasses.replace(SPEC, color=color), 24), text) == 0.0
    for shape in ("square", "triangle"):
        assert E.fidelity(tw.render(dataclasses.replace(SPEC, shape=shape), 24), text) == 0.0
    broken = tw.render(SPEC, 24)
    broken[:, :, :, 8:] = -0.2  # cut the object in half (paint the right half of the frame background gray)
    assert E.fidelity(broken, text) < 0.7



def test_shapes_are_far_apart():
    # every two sprites overlap at IoU <= 2/3, so a roughly drawn shape still fits its own sprite best: a ring of
    # one pixel more or less around the asked sprite is still scored as that shape
    ious = {}
    for i, a in enumerate(tw.SHAPES):
        for b in tw.SHAPES[i + 1 :]:
            A, B = tw.TEMPLATES[a], tw.TEMPLATES[b]
            ious[a, b] = ((A & B).sum() / (A | B).sum()).item()
    assert max(ious.values()) <= 2 / 3 + 1e-6, ious
    spec = dataclasses.replace(SPEC, x=4, y=4)
    for shape in tw.SHAPES:
        video = tw.render(dataclasses.replace(spec, shape=shape), 1)
        frame = E.color_mask(video, spec.color)  # [1, H, W]
        grown = frame | torch.roll(frame, 1, dims=2)  # smeared one pixel to the right
        fits = E.sprite_fits(grown).flatten(2).amax(dim=2)[0]  # [3] best IoU per shape
        assert tw.SHAPES[int(fits.argmax())] == shape, (shape, fits)

def test_wrong_motion_fails_alignment():
    text = tw.caption(SPEC)  # moves right slowly, from x=5
    assert E.alignment(tw.render(SPEC, 12), text) == 1.0
    # the opposite direction: told apart before the first bounce (after it, a bouncing object moving left is one
    # moving right, so we judge the 12 frames before it reaches the wall)
    assert E.alignment(tw.render(dataclasses.replace(SPEC, direction="left"), 12), text) == 0.0
    # the wrong axis or the wrong speed fail along a whole long video
    assert E.alignment(tw.render(dataclasses.replace(SPEC, direction="up"), 120), text) == 0.0
    assert E.alignment(tw.render(dataclasses.replace(SPEC, speed="fast"), 120), text) == 0.0
    # "turns" and "speeds up" are checked too
    assert E.alignment(tw.render(dataclasses.replace(SPEC, event="turns"), 60), text) < 0.6
    assert E.alignment(tw.render(SPEC, 60), tw.caption(dataclasses.replace(SPEC, event="speeds up"))) < 0.3
    # a frozen object never moves as asked
    video = tw.render(SPEC, 60)
    assert E.alignment(video[:, :1].expand_as(video), text) == 0.0


def test_camera_pan_is_checked():
    right = dataclasses.replace(SPEC, pan="right")
    assert E.camera(tw.render(right, 30), tw.caption(right)) == 1.0
    assert E.camera(tw.render(dataclasses.replace(SPEC, pan="left"), 30), tw.caption(right)) == 0.0
    assert E.camera(tw.render(SPEC, 30), tw.caption(right)) == 0.0  # no pan when one is asked
    assert E.camera(tw.render(right, 30), tw.caption(SPEC)) == 0.0  # a pan when none is asked


def test_drift_is_the_std_of_segment_fidelity():
    text = tw.caption(SPEC)
    video = tw.render(SPEC, 120)
    assert E.drift(video, text, segment_frames=12) == 0.0
    gone = video.clone()
    gone[:, 60:] = tw.render(dataclasses.replace(SPEC, color="blue"), 120)[:, 60:]  # the red circle is gone halfway
    # 10 segments, 5 at fidelity 1 and 5 at 0: sample std sqrt(10 / (4 * 9))
    assert E.drift(gone, text, segment_frames=12) == pytest.approx(math.sqrt(10 / 36), abs=1e-6)
    assert E.fidelity(gone, text) == pytest.approx(0.5)
    # shorter than two segments (a teacher's single frames, --num_frames=1): no drift to measure, and score() works
    assert E.drift(gone[:, :1], text, segment_frames=12) == 0.0 == E.drift(gone[:, :12], text, segment_frames=12)
    assert E.score(gone[:, :1], text)["fidelity"] == 1.0


def test_score_and_per_segment():
    s = tw.sample_spec(4, seed=1)
    video, text = tw.render(s, 36), tw.caption(s)
    sc = E.score(video, text, segment_frames=12)
    assert set(sc) == set(E.METRICS) and all(isinstance(v, float) for v in sc.values())
    seg = E.per_segment(video, text, segment_frames=12)
    assert all(len(v) == 3 for v in seg.values()) and seg["fidelity"] == [1.0, 1.0, 1.0]


def test_by_caption_splits_the_scores_by_what_the_caption_asks():
    """World clips score 1 in every split; the same clips frozen on frame 0 keep a still background (camera 1 where
    no pan is asked, 0 where one is) and never move (alignment 0 for every event and speed); a split no caption asks
    is nan."""
    ss = specs(48, seed=2)
    assert {s.pan for s in ss} == set(tw.PANS) and {s.event for s in ss} == set(tw.EVENTS)
    texts = [tw.caption(s) for s in ss]
    world = [tw.render(s, 12) for s in ss]
    frozen = [v[:, :1].expand_as(v) for v in world]
    by_world = E.by_caption([E.score(v, t) for v, t in zip(world, texts)], texts)
    by_frozen = E.by_caption([E.score(v, t) for v, t in zip(frozen, texts)], texts)
    assert len(by_world) == 8 and all(x == 1.0 for x in by_world.values())
    assert by_frozen["camera|pan=none"] == 1.0 and by_frozen["camera|pan=left"] == by_frozen["camera|pan=right"] == 0
    assert all(by_frozen[k] == 0.0 for k in by_frozen if k.startswith("alignment"))
    # a split read off the right videos: the pans of a 50/50 mix of world and frozen clips
    mixed = [w if i % 2 else f for i, (w, f) in enumerate(zip(world, frozen))]
    by_mixed = E.by_caption([E.score(v, t) for v, t in zip(mixed, texts)], texts)
    for pan in ("left", "right"):
        want = sum(i % 2 for i, s in enumerate(ss) if s.pan == pan) / sum(s.pan == pan for s in ss)
        assert by_mixed[f"camera|pan={pan}"] == pytest.approx(want)
    still = [s for s in ss if s.pan == "none"][:3]
    by_some = E.by_caption([E.score(tw.render(s, 12), tw.caption(s)) for s in still], [tw.caption(s) for s in still])
    assert math.isnan(by_some["camera|pan=left"]) and by_some["camera|pan=none"] == 1.0


# ----------------------------------------------------------------------------- evaluate() and the CLI


def small_cfg(**kw):
    return E.EvalConfig(num_captions=2, seeds=[0], num_frames=12, batch_size=2, segment_frames=6, **kw)


def test_evaluate_smoke():
    model, te = tiny_student_and_encoder()
    result = E.evaluate(model, te, small_cfg(), log=lambda *a: None)
    for m in E.METRICS:
        assert math.isfinite(result["model"][m]["mean"]) and math.isfinite(result["model"][m]["std"])
    assert result["videos"].shape == (2, 3, 12, 16, 16) and result["videos"].abs().max() <= 1
    assert result["world"]["fidelity"]["mean"] == 1.0 and result["static"]["dynamics"]["mean"] == 0.0
    assert result["segments"]["frame_end"] == [6, 12] and len(result["segments"]["model"]["fidelity"]) == 2
    assert set(result["by_caption"]) == {"model", "world", "static"}
    assert all(x == 1.0 or math.isnan(x) for x in result["by_caption"]["world"].values())


def test_cli_writes_table_pictures_and_json(tmp_path, capsys):
    model, te = tiny_student_and_encoder()
    save_safetensors(model, tmp_path / "student.safetensors")
    te.save(tmp_path / "toy")
    E.main([f"--ckpt={tmp_path / 'student.safetensors'}", f"--text_encoder={tmp_path / 'toy'}", "--num_captions=2",
            "--num_frames=12", "--segment_frames=6", "--seeds=0", "--seeds=1", "--sink_mode=static",
            f"--out_png={tmp_path / 'grid.png'}", f"--curve_png={tmp_path / 'curve.png'}"])
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["num_videos"] == 4 and set(last["model"]) == set(E.METRICS)
    assert any(line.startswith("model ") for line in out) and any(line.startswith("static ") for line in out)
    import imageio.v2 as imageio

    assert imageio.imread(tmp_path / "grid.png").shape[2] == 3 and imageio.imread(tmp_path / "curve.png").ndim == 3
    assert last["config"]["sink_mode"] == "static" and last["config"]["height"] == last["config"]["width"] == 16


def test_frames_are_square_pixels():
    """--height / --width are pixels (= the toy's latents); toy frames are square, and a mismatch is one-line error."""
    model, te = tiny_student_and_encoder()
    result = E.evaluate(model, te, small_cfg(height=24, width=24), log=lambda *a: None)
    assert result["videos"].shape == (2, 3, 12, 24, 24)
    with pytest.raises(SystemExit, match="--height 16 and --width 8 must be equal"):
        E.main(["--height=16", "--width=8"])


class OracleTeacher(torch.nn.Module):
    """A stand-in bidirectional teacher that knows the answer: for the caption whose index the fake text encoder wrote
    into ctx[:, 0, 0], the straight flow to the world's clip of it, v = (x - x0) / s. The teacher's own Euler sampler
    must land on the clip whatever the grid, guidance and noise."""

    def __init__(self, clips):
        super().__init__()
        self.clips = clips  # (N, 3, T, S, S)
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.blocks[0].self_attn = torch.nn.Module()
        self.blocks[0].self_attn.k = torch.nn.Linear(1, 1)
        self.cfg = WanConfig(in_dim=3, out_dim=3)

    def forward(self, x, t, ctx):
        x0 = self.clips[ctx[:, 0, 0].round().long().clamp(min=0)]  # uncond rows (-1): clip 0 (guidance 1 keeps cond)
        return (x - x0) / (t / 1000.0).view(-1, 1, 1, 1, 1)


def test_teacher_mode_samples_the_whole_video_with_the_teachers_sampler():
    """--teacher: eval samples each caption with dmd.euler_sample over all frames; with the oracle teacher the
    videos are the world's clips, which score fidelity, alignment and camera 1, from every noise seed."""
    cfg = dataclasses.replace(small_cfg(), teacher="oracle", num_captions=3, seeds=[0, 1], euler_steps=5, guidance=1.0)
    world, _ = E.world_videos(cfg)
    captions = tw.captions(cfg.num_captions, cfg.caption_seed)
    encode = lambda ps: torch.tensor([captions.index(p) if p else -1 for p in ps], dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    result = E.evaluate(OracleTeacher(world), encode, cfg, log=lambda *a: None)
    assert torch.allclose(result["videos"], torch.cat([world, world]), atol=1e-4)
    for m in ("fidelity", "alignment", "camera"):
        assert result["model"][m]["mean"] == 1.0


def test_denoise_scores_one_step_predictions_of_noised_world_clips():
    """--denoise: the oracle teacher predicts the velocity toward its clip, so x_t - sigma v gives that clip back at
    every t: the world's clips score 1 on fidelity, alignment and camera in every row; an oracle of the frozen clips
    gives the frozen clips' scores (camera 1 only where no pan is asked, no motion), split by caption as by_caption
    splits them."""
    cfg = dataclasses.replace(small_cfg(), teacher="oracle", num_captions=5, seeds=[0, 1], batch_size=2, guidance=1.0,
                              denoise=[300.0, 950.0])
    world, frozen = E.world_videos(cfg)
    captions = tw.captions(cfg.num_captions, cfg.caption_seed)
    encode = lambda ps: torch.tensor([captions.index(p) if p else -1 for p in ps], dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    out = E.denoise(OracleTeacher(world), encode, cfg, log=lambda *a: None)
    assert list(out) == ["300.0", "950.0"]
    for row in out.values():
        assert all(row[m] == 1.0 for m in ("fidelity", "alignment", "camera"))
    out = E.denoise(OracleTeacher(frozen), encode, cfg, log=lambda *a: None)
    want = [E.score(v, c) for v, c in zip(frozen, captions)]
    for row in out.values():
        assert row["camera"] == pytest.approx(sum(w["camera"] for w in want) / len(want)) and row["alignment"] == 0.0
        assert row["by_caption"] == pytest.approx(E.by_caption(want + want, captions + captions), nan_ok=True)
    with pytest.raises(SystemExit, match="--denoise"):
        E.check(dataclasses.replace(small_cfg(), denoise=[500.0]))  # a student, not --teacher


def test_png_teacher_rows_are_model_teacher_world(monkeypatch):
    """--png_teacher: per caption the rows are the student's rollout, the teacher's own sample and the world's clip,
    all cut to the teacher's training length (its checkpoint's num_frames). With the oracle teacher the middle row is
    the world's clip, so its frames must equal the third row's."""
    cfg = dataclasses.replace(small_cfg(), num_captions=3, seeds=[0], euler_steps=5, guidance=1.0, png_teacher="t")
    world, _ = E.world_videos(cfg)  # [3, 3, 12, 16, 16]
    captions = tw.captions(cfg.num_captions, cfg.caption_seed)
    oracle = OracleTeacher(world[:, :, :6])
    oracle.trained_with = {"num_frames": 6}
    encode = lambda ps: torch.tensor([captions.index(p) if p else -1 for p in ps], dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    import model

    monkeypatch.setattr(model.WanModel, "from_pretrained", classmethod(lambda cls, path, **kw: oracle))
    student = torch.rand(3, 3, 12, 16, 16) * 2 - 1
    rows = E.teacher_rows(student, world, encode, cfg)
    assert len(rows) == 9 and all(r.shape == (3, 6, 16, 16) for r in rows)
    for i in range(3):
        assert torch.equal(rows[3 * i], student[i, :, :6]) and torch.equal(rows[3 * i + 2], world[i, :, :6])
        assert torch.allclose(rows[3 * i + 1], world[i, :, :6], atol=1e-4)


def test_png_teacher_needs_a_png_and_a_student(tmp_path):
    with pytest.raises(SystemExit, match="give --out_png"):
        E.main([f"--png_teacher={tmp_path}"])
    with pytest.raises(SystemExit, match="no such file"):
        E.main([f"--png_teacher={tmp_path / 'nothing.safetensors'}", f"--out_png={tmp_path / 'g.png'}"])


def test_over_runs_is_the_mean_with_a_students_t_interval():
    """Ablation rows over training seeds: the mean of the runs' means and mean ± t(n-1) s / sqrt(n), checked against
    hand-computed values (3 runs: t(2) = 4.3027; s of 0.2, 0.4, 0.6 is 0.2)."""
    rows = [{"fidelity": {"mean": v}, "camera": {"mean": c}} for v, c in ((0.2, 1.0), (0.4, math.nan), (0.6, 0.5))]
    agg = E.over_runs(rows)
    half = 4.3027 * 0.2 / math.sqrt(3)
    assert agg["fidelity"]["mean"] == pytest.approx(0.4)
    assert (agg["fidelity"]["lo"], agg["fidelity"]["hi"]) == pytest.approx((0.4 - half, 0.4 + half))
    assert agg["fidelity"]["runs"] == [0.2, 0.4, 0.6]
    # a nan run is left out: 2 runs, t(1) = 12.7062, s = 0.3536
    assert agg["camera"]["mean"] == pytest.approx(0.75)
    assert agg["camera"]["hi"] == pytest.approx(0.75 + 12.7062 * math.sqrt(0.125) / math.sqrt(2))
    one = E.over_runs(rows[:1])
    assert one["fidelity"]["lo"] == one["fidelity"]["hi"] == 0.2
    # beyond the table, the expansion is close to the exact quantiles t(11) = 2.2010, t(30) = 2.0423
    assert E.t975(11) == pytest.approx(2.2010, abs=1e-3) and E.t975(30) == pytest.approx(2.0423, abs=1e-3)


def test_cli_runs_scores_every_student_and_the_mean_over_runs(tmp_path, capsys):
    torch.manual_seed(0)
    paths = []
    for i in range(3):
        model, te = tiny_student_and_encoder()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * i * torch.randn_like(p))  # three different "training seeds"
        paths.append(tmp_path / f"s{i}.safetensors")
        save_safetensors(model, paths[-1])
    te.save(tmp_path / "toy")
    common = [f"--text_encoder={tmp_path / 'toy'}", "--num_captions=2", "--num_frames=12", "--segment_frames=6"]
    singles = []
    for p in paths:
        singles.append(E.main([f"--ckpt={p}", *common])["model"]["fidelity"]["mean"])
    capsys.readouterr()
    result = E.main([f"--ckpt={paths[0]}", f"--runs={paths[1]}", f"--runs={paths[2]}", *common])
    assert result["over_runs"]["fidelity"]["runs"] == pytest.approx(singles)
    assert result["over_runs"]["fidelity"]["mean"] == pytest.approx(sum(singles) / 3)
    assert "over 3 training runs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--runs=.*no such file"):
        E.main([f"--ckpt={paths[0]}", f"--runs={tmp_path / 'missing.safetensors'}", *common])


def test_mean_curves_leaves_out_nan():
    a, b = {"fidelity": [1.0, math.nan, math.nan]}, {"fidelity": [3.0, 5.0, math.nan]}
    out = E.mean_curves([a, b])["fidelity"]
    assert out[:2] == [2.0, 5.0] and math.isnan(out[2])


def test_compare_tabulates_and_draws_saved_results(tmp_path, capsys):
    """--out_json writes the printed result; --compare reads such files back: the table shows each file's mean over
    its runs (or its mean over videos), the run file's curves are the mean of the single runs' curves, and the
    picture draws every file in its own colour. Mixed kinds, other lengths and non-results are refused by name."""
    import imageio.v2 as imageio

    paths = []
    for i in range(2):
        model, te = tiny_student_and_encoder()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * i * torch.randn_like(p))
        paths.append(tmp_path / f"s{i}.safetensors")
        save_safetensors(model, paths[-1])
    te.save(tmp_path / "toy")
    common = [f"--text_encoder={tmp_path / 'toy'}", "--num_captions=2", "--num_frames=12", "--segment_frames=6"]
    single = [E.main([f"--ckpt={p}", *common, f"--out_json={tmp_path / f'one{i}.json'}"]) for i, p in enumerate(paths)]
    both = E.main([f"--ckpt={paths[0]}", f"--runs={paths[1]}", *common, f"--out_json={tmp_path / 'both.json'}"])
    capsys.readouterr()
    saved = json.loads((tmp_path / "both.json").read_text())
    assert saved["over_runs"]["fidelity"]["mean"] == pytest.approx(both["over_runs"]["fidelity"]["mean"])
    want = [(x + y) / 2 for x, y in zip(single[0]["segments"]["model"]["fidelity"],
                                        single[1]["segments"]["model"]["fidelity"])]
    assert saved["segments"]["over_runs"]["fidelity"] == pytest.approx(want)

    png = tmp_path / "cmp.png"
    E.main([f"--compare={tmp_path / 'one1.json'}", f"--compare={tmp_path / 'both.json'}", f"--curve_png={png}"])
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("one1 ")).split()
    assert float(row[1 + E.METRICS.index("fidelity")]) == pytest.approx(single[1]["model"]["fidelity"]["mean"], abs=5e-4)
    row = next(line for line in out if line.startswith("both ")).split()
    assert float(row[1 + 3 * E.METRICS.index("fidelity")]) == pytest.approx(both["over_runs"]["fidelity"]["mean"],
                                                                             abs=5e-4)
    img = imageio.imread(png)[..., :3].reshape(-1, 3)
    for color in (E.PALETTE[0], E.PALETTE[1], (150, 150, 150)):
        assert (img == torch.tensor(color).numpy()).all(axis=1).any(), color

    fake_switch = tmp_path / "sw.json"
    curves = {"follow": [1.0], "linger": [0.0], "bg_follow": [1.0]}
    fake_switch.write_text(json.dumps({"model": {}, "world": {}, "chunks": {"frame_end": [3], "model": curves,
                                                                         "world": curves}}))
    short = dict(saved, segments=dict(saved["segments"], frame_end=[6]))
    (tmp_path / "short.json").write_text(json.dumps(short))
    (tmp_path / "other.json").write_text(json.dumps({"model": {}, "world": {}, "segments": {"frame_end": [6, 12]}}))
    for bad, why in ((fake_switch, "a --switch result among plain"), (tmp_path / "short.json", "curves end at"),
                     (tmp_path / "other.json", "not a result"), (tmp_path / "missing.json", "cannot read")):
        with pytest.raises(SystemExit, match=f"--compare={bad}: {why}"):
            E.main([f"--compare={tmp_path / 'both.json'}", f"--compare={bad}"])
