"""train.py end to end on tiny models: torchrun with DDP and FSDP2, exact resume, gradient accumulation, NaN stop."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import PRESETS, WanModel
from sink import SinkCache

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red ball bounces left", "a blue square moves up", "a green circle turns", "the camera pans right over a red ball"]


def tiny(tmp, out, *extra):
    """A tiny run's settings (tests/test_resume.py uses them too). --reward=motion: the weightless toy reward, since
    the default VideoAlign reward needs its weights files."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"--prompts={prompts}", f"--out_dir={out}", "--num_frames=6", "--height=4", "--width=4", "--batch_size=2",
            "--ode_pairs=4", "--ode_steps=8", "--save_interval=2", "--student_every=2", "--lr_student=1e-3", "--lr_critic=1e-3",
            "--reward=motion", *extra]


def run(args, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        # tests/dist_fingerprint.py: train.main(args), then each rank prints a fingerprint of the full weights
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "tests/dist_fingerprint.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_torchrun_two_ranks_both_stages(tmp_path, backend):
    out = tmp_path / "out"
    for stage in ("ode", "redmd"):
        # FSDP with checkpointing: gradient that enters a block through the K/V it wrote (--cache_grad=through, the
        # default) must pass FSDP's backward hooks, which only see a block's outputs
        extra = ["--grad_ckpt=true"] if backend == "fsdp" else []
        stdout = run(tiny(tmp_path, out, f"--stage={stage}", f"--dist={backend}", "--max_iters=3", *extra), nproc=2)
        fps = dict(re.findall(r"rank (\d) student fingerprint ([0-9.e+-]+)", stdout))  # ranks share stdout: lines may run together
        assert set(fps) == {"0", "1"}, stdout[-2000:]
        assert fps["0"] == fps["1"], f"{stage}: ranks disagree after training: {fps}"
        assert (out / stage / "step_000003" / "generator.safetensors").exists()
    log = rows(out / "redmd" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "student_loss" in log[1] and "student_loss" not in log[0]  # student every 2nd iteration, critic every one
    assert all("critic_loss" in r for r in log)
    assert "student: " + str(out / "ode" / "step_000003" / "generator.safetensors") in stdout


def test_ode_stage_learns_and_pairs_are_teacher_trajectories(tmp_path, one_thread):
    import train
    from config import configure, read_prompt_file
    from dmd import FlowMatch, cfg as guide

    out = tmp_path / "out"
    run(tiny(tmp_path, out, "--stage=ode", "--max_iters=16", "--save_interval=100"))
    losses = [r["ode_loss"] for r in rows(out / "ode" / "log.jsonl")]
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses  # per-step losses are noisy: compare 4-step means
    assert json.loads((out / "ode" / "pairs" / "done.json").read_text())["grid"] == "exact"
    shards = sorted((out / "ode" / "pairs").glob("*.safetensors"))
    assert len(shards) == 2  # 4 pairs in batches of 2
    # t: exactly the student's warped schedule (1000, 937.5, 833.3, 625) and the clean end 0, the same float32 values
    # the rollout's torch.full((B,), ts[j]) holds
    student_t = FlowMatch(5.0).timesteps([1000, 750, 500, 250])
    for shard in shards:
        assert torch.equal(load_file(str(shard))["t"], torch.tensor(student_t + [0.0]))

    # the latents: the teacher's Euler trajectory, integrated here on the 8-step shift-8 grid plus the student's t
    # (11 steps), must hold the stored latents at exactly those t
    grid = sorted({1000 * 8 * u / (1 + 7 * u) for u in (1 - i / 8 for i in range(9))} | set(student_t), reverse=True)
    assert len(grid) == 12 and min(abs(g - 625) for g in grid) == 0.0
    cfg, lat = train.resolve(configure(train.TrainConfig(), tiny(tmp_path, tmp_path / "again", "--stage=ode")))
    dev = torch.device("cpu")
    proc = type("Proc", (), {"device": dev, "print": staticmethod(lambda *a: None)})
    teacher = train.load_net(cfg.teacher, "teacher", cfg, proc).eval()  # the same seeded random teacher as the run's
    prompts = read_prompt_file(cfg.prompts)
    encode = train.text_encoder(cfg, prompts, teacher.cfg, dev)
    for shard in shards:
        first = int(shard.stem.split("_")[-1])  # shard_r000_{first pair index}
        sd = load_file(str(shard))
        assert sd["lat"].shape == (2, 5, 16, 6, 4, 4)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + first)
        x = torch.randn(2, 16, *lat, generator=g)
        ps = [prompts[first % 4], prompts[(first + 1) % 4]]
        ctx = torch.cat([encode(ps), encode([cfg.negative_prompt]).expand(2, -1, -1)])  # cond and uncond
        points = {}
        with torch.no_grad():
            for a, b in zip(grid, grid[1:]):
                points[a] = x
                v = teacher(torch.cat([x, x]), torch.full((4,), a), ctx)
                x = x + (b - a) / 1000 * guide(v[:2], v[2:], cfg.ode_guidance)
        points[0.0] = x
        want = torch.stack([points[t] for t in student_t + [0.0]], dim=1)
        assert torch.allclose(sd["lat"], want, atol=1e-5), (sd["lat"] - want).abs().amax()
        # the plain 8-step grid's point nearest 625 (533.3), which the old code kept, holds another latent
        assert (sd["lat"][:, 3] - points[grid[grid.index(625.0) + 1]]).abs().amax() > 1e-2
    assert sd["lat"][:, 0].std() > 0.8  # the first kept point is the initial noise


def distances(q_pos, k_pos):
    """RoPE frame distances (query position minus key position) of every query and key frame."""
    return {q - k for q in q_pos for k in k_pos}


def test_rope_frame_distances_of_each_stage(tmp_path, monkeypatch, one_thread):
    """The distances README's Training section lists. Streaming (Re-DMD and sampling: the cache with train.py's
    defaults, chunk 3, window 9, sink 3) renumbers positions every chunk, so once the window is full the sink is 4..8
    frames from a query and the rest -2..5; the ODE stage's one forward over 21 frames keeps absolute positions:
    causal (the default) shows -2..20, window the sink at up to 20 too."""
    import model
    import train
    from config import configure

    defaults = train.TrainConfig()
    cache = SinkCache.from_settings(WanModel(PRESETS["tiny"]), defaults, 1, 2, 2)
    seen = []  # per chunk: (distances to the sink, distances to the other cached frames and the chunk itself)
    for _ in range(7):  # 21 latent frames
        cache.advance()
        q, k = cache.q_fpos.tolist(), cache.k_fpos[: cache.n_frames].tolist()
        seen.append((distances(q, k[:3]), distances(q, k[3:])))
    assert seen[0] == (set(range(-2, 3)), set())  # the first chunk is the sink
    assert seen[1] == (set(range(1, 6)), set(range(-2, 3)))
    assert all(s == set(range(4, 9)) and r == set(range(-2, 6)) for s, r in seen[2:])  # the window full

    def ode(mask, F=21):
        """Per chunk of an F-frame ODE forward: (distances to frames 0..2, distances to the others)."""
        kw = train.ode_attention(replace(defaults, ode_mask=mask))
        out = []
        for s in range(0, F, 3):
            keys = [f for a, b in model.chunk_keys(s + 3, kw["window_frames"], kw["sink_frames"]) for f in range(a, b)]
            out.append((distances(range(s, s + 3), [f for f in keys if f < 3]),
                        distances(range(s, s + 3), [f for f in keys if f >= 3])))
        return out

    causal = ode("causal")
    assert set().union(*(a | b for a, b in causal)) == set(range(-2, 21))
    assert causal[-1] == (set(range(16, 21)), set(range(-2, 18)))  # the last chunk sees frame 0 at 18..20
    window = ode("window")
    assert set().union(*(a | b for a, b in window)) == set(range(-2, 21))
    assert window[:3] == causal[:3]  # the window (9 frames) is not full before the 4th chunk
    assert [a for a, _ in window[3:]] == [set(range(7 + 3 * i, 12 + 3 * i)) for i in range(4)]  # the sink: 7..20
    assert all(b == set(range(-2, 6)) for _, b in window[3:])  # the window's other frames: as streaming

    # ... and what the ODE stage's student forward is given: the masks above, for each --ode_mask
    calls = []
    real = WanModel.forward

    def spy(self, x, t, context=None, **kw):
        if kw.get("chunk_frames") is not None:  # the student; the teacher samples bidirectionally
            calls.append((kw["chunk_frames"], kw["window_frames"], kw["sink_frames"]))
        return real(self, x, t, context, **kw)

    monkeypatch.setattr(WanModel, "forward", spy)
    train.main(tiny(tmp_path, tmp_path / "causal", "--stage=ode", "--max_iters=1", "--ode_pairs=2"))
    assert calls == [(3, None, 0)]
    shutil.copytree(tmp_path / "causal" / "ode" / "pairs", tmp_path / "window" / "ode" / "pairs")
    calls.clear()
    train.main(tiny(tmp_path, tmp_path / "window", "--stage=ode", "--max_iters=1", "--ode_pairs=2",
                    "--ode_mask=window"))
    assert calls == [(3, 9, 3)]


def test_resume_is_exact(tmp_path):
    base = ["--stage=redmd", "--save_interval=2"]
    run(tiny(tmp_path, tmp_path / "a", *base, "--max_iters=4"))
    run(tiny(tmp_path, tmp_path / "b", *base, "--max_iters=2"))
    run(tiny(tmp_path, tmp_path / "b", *base, "--max_iters=4", "--resume=true"))
    a, b = rows(tmp_path / "a" / "redmd" / "log.jsonl"), rows(tmp_path / "b" / "redmd" / "log.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        for key in ("student_loss", "critic_loss", "reward", "weight"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    wa = load_file(str(tmp_path / "a" / "redmd" / "step_000004" / "generator_ema.safetensors"))
    wb = load_file(str(tmp_path / "b" / "redmd" / "step_000004" / "generator_ema.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    """batch 2 x accum 1 and batch 1 x accum 2 draw the same pairs, so one accumulated step must see the same loss and
    the same gradient (its norm, logged before clipping). Weights after the step are no test: AdamW's first step is
    lr * sign(g), which float rounding flips wherever g is ~0."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(tiny(tmp_path, a, "--stage=ode", "--max_iters=1", "--batch_size=2", "--grad_accum=1"))
    for d in (b, c):
        shutil.copytree(a / "ode" / "pairs", d / "ode" / "pairs")  # the same ODE pairs for every run
    run(tiny(tmp_path, b, "--stage=ode", "--max_iters=1", "--batch_size=1", "--grad_accum=2"))
    run(tiny(tmp_path, c, "--stage=ode", "--max_iters=1", "--batch_size=1", "--grad_accum=1"))
    ra, rb, rc = (rows(d / "ode" / "log.jsonl")[0] for d in (a, b, c))
    assert ra["ode_loss"] == pytest.approx(rb["ode_loss"], rel=1e-5)
    assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    assert rc["grad_norm"] != pytest.approx(ra["grad_norm"], rel=1e-3)  # half the batch is another gradient


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import dmd
    import train

    real = dmd.flow_matching_loss
    calls = {"n": 0}

    def poisoned(v, eps, x):
        calls["n"] += 1
        loss = real(v, eps, x)
        return loss * float("nan") if calls["n"] >= 3 else loss  # the third critic step goes bad

    monkeypatch.setattr(dmd, "flow_matching_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"critic loss is nan at step 3.*last good checkpoint is .*step_000002"):
        train.main(tiny(tmp_path, out, "--stage=redmd", "--max_iters=4", "--student_every=5"))
    assert (out / "redmd" / "step_000002").exists() and not (out / "redmd" / "step_000003").exists()
    assert (out / "redmd" / "latest").read_text() == "step_000002"


def test_compile_and_bf16_autocast_run(tmp_path):
    """--compile wires torch.compile into every model (aot_eager here: inductor takes minutes on a CPU), and bf16
    autocast with gradient checkpointing trains."""
    run(tiny(tmp_path, tmp_path / "c", "--stage=redmd", "--max_iters=2", "--compile=true", "--compile_backend=aot_eager"))
    assert "student_loss" in rows(tmp_path / "c" / "redmd" / "log.jsonl")[1]
    run(tiny(tmp_path, tmp_path / "b", "--stage=redmd", "--max_iters=2", "--dtype=bfloat16", "--grad_ckpt=true"))
    assert all(math.isfinite(r["critic_loss"]) for r in rows(tmp_path / "b" / "redmd" / "log.jsonl"))


def test_lr_schedule_is_warmup_then_cosine():
    """train.lr_scale against the closed form: linear warm-up to 1, then 1 (no decay) or a cosine to min_lr_frac at
    max_iters, as in nanoGPT."""
    from train import TrainConfig, lr_scale

    c = TrainConfig(warmup_iters=10, max_iters=110, decay_lr=True, min_lr_frac=0.1)
    assert [lr_scale(s, c) for s in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_scale(60, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_scale(110, c) == pytest.approx(0.1)
    assert lr_scale(35, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    flat = TrainConfig(warmup_iters=0, max_iters=110)
    assert all(lr_scale(s, flat) == 1.0 for s in (1, 50, 110))


def test_toy_recipe_each_stage_runs(tmp_path):
    """The toy preset end to end at a few steps: teacher (on the shipped toy VAE's latents of the world's clips) ->
    ODE pairs and init -> Re-DMD (the toy reward on decoded pixels), each stage finding the previous one's output
    through its folder, with the shipped toy text encoder (data/toy)."""
    out = tmp_path / "toy"
    small = ["config/toy.py", f"--out_dir={out}", f"--teacher={out}/teacher", "--num_frames=6", "--height=16",
             "--width=16", "--batch_size=2", "--save_interval=2", "--log_interval=1"]
    run([*small, "--stage=teacher", "--max_iters=3", "--beta1=0.9", "--warmup_iters=2", "--decay_lr=true",
         "--min_lr_frac=0.25", "--save_interval=1", "--keep_ckpts=3"])
    assert (out / "teacher" / "step_000002" / "teacher_ema.safetensors").exists()
    lr = [r["lr"] for r in rows(out / "teacher" / "log.jsonl")]  # warm-up 1/2, 1, then the cosine's end, 1/4
    assert lr[0] == pytest.approx(lr[1] / 2) and lr[2] == pytest.approx(lr[1] / 4)
    # --init: a second teacher run (here on longer clips) starts from the first one's EMA, not from a random init
    more = [a for a in small if not a.startswith(("--out_dir", "--num_frames"))]
    run([*more, f"--out_dir={tmp_path / 'longer'}", "--num_frames=9", "--stage=teacher", "--max_iters=1",
         "--lr_teacher=1e-12", f"--init={out}/teacher"])
    start = load_file(str(out / "teacher" / "step_000003" / "teacher_ema.safetensors"))
    after = load_file(str(tmp_path / "longer" / "teacher" / "step_000001" / "teacher.safetensors"))
    assert all(torch.allclose(after[k], start[k], atol=1e-8) for k in start)
    stdout = run([*small, "--stage=ode", "--max_iters=2", "--ode_pairs=2", "--ode_steps=4"])
    assert f"teacher: {out}/teacher/step_000003/teacher_ema.safetensors" in stdout  # the latest
    stdout = run([*small, "--stage=redmd", "--max_iters=2", "--student_every=1"])
    assert f"student: {out}/ode/step_000002/generator.safetensors" in stdout
    log = rows(out / "redmd" / "log.jsonl")
    assert all(math.isfinite(r["student_loss"]) and math.isfinite(r["critic_loss"]) for r in log)
    from model import WanModel

    student = WanModel.from_pretrained(out / "redmd" / "step_000002" / "generator_ema.safetensors")
    assert student.cfg.in_dim == 16 and student.cfg.text_len == 24  # the toy preset (toy VAE latents), loadable by sample.py
