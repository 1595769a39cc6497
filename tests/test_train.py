"""train.py end to end on tiny models: torchrun with DDP and FSDP2, exact resume, gradient accumulation, NaN stop."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red ball bounces left", "a blue square moves up", "a green circle turns", "the camera pans right over a red ball"]


def tiny(tmp, out, *extra):
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"--prompts={prompts}", f"--out_dir={out}", "--num_frames=6", "--height=4", "--width=4", "--batch_size=2",
            "--ode_pairs=4", "--ode_steps=8", "--save_interval=2", "--student_every=2", "--lr_student=1e-3", "--lr_critic=1e-3",
            *extra]


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
        stdout = run(tiny(tmp_path, out, f"--stage={stage}", f"--dist={backend}", "--max_iters=3"), nproc=2)
        fps = dict(re.findall(r"rank (\d) student fingerprint ([0-9.e+-]+)", stdout))  # ranks share stdout: lines may run together
        assert set(fps) == {"0", "1"}, stdout[-2000:]
        assert fps["0"] == fps["1"], f"{stage}: ranks disagree after training: {fps}"
        assert (out / stage / "step_000003" / "generator.safetensors").exists()
    log = rows(out / "redmd" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "student_loss" in log[1] and "student_loss" not in log[0]  # student every 2nd iteration, critic every one
    assert all("critic_loss" in r for r in log)
    assert "student: " + str(out / "ode" / "step_000003" / "generator.safetensors") in stdout


def test_ode_stage_learns_and_pairs_are_teacher_trajectories(tmp_path):
    out = tmp_path / "out"
    run(tiny(tmp_path, out, "--stage=ode", "--max_iters=16", "--save_interval=100"))
    losses = [r["ode_loss"] for r in rows(out / "ode" / "log.jsonl")]
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses  # per-step losses are noisy: compare 4-step means
    shards = sorted((out / "ode" / "pairs").glob("*.safetensors"))
    sd = load_file(str(shards[0]))
    # t: the teacher steps nearest the student's warped schedule (1000, 937.5, 833.3, 625) and the clean end 0
    assert sd["t"][0] == 1000.0 and sd["t"][-1] == 0.0 and len(sd["t"]) == 5
    grid = [1000 * 8 * u / (1 + 7 * u) for u in (1 - i / 8 for i in range(9))]  # 8 Euler steps, shift 8
    nearest = [min(grid, key=lambda g: abs(g - st)) for st in (1000, 937.5, 2500 / 3, 625)]
    assert sd["t"][:4].tolist() == pytest.approx(nearest)
    assert sd["lat"].shape == (2, 5, 16, 6, 4, 4)
    assert sd["lat"][:, 0].std() > 0.8  # the first kept point is the initial noise


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


def test_toy_recipe_each_stage_runs(tmp_path):
    """The toy preset end to end at a few steps: teacher -> ODE pairs and init -> Re-DMD, each stage finding the
    previous one's output through its folder, with the shipped toy text encoder (data/toy)."""
    out = tmp_path / "toy"
    small = ["config/toy.py", f"--out_dir={out}", f"--teacher={out}/teacher", "--num_frames=6", "--height=16",
             "--width=16", "--batch_size=2", "--save_interval=2", "--log_interval=1"]
    run([*small, "--stage=teacher", "--max_iters=2", "--beta1=0.9"])
    assert (out / "teacher" / "step_000002" / "teacher_ema.safetensors").exists()
    stdout = run([*small, "--stage=ode", "--max_iters=2", "--ode_pairs=2", "--ode_steps=4"])
    assert f"teacher: {out}/teacher/step_000002/teacher_ema.safetensors" in stdout
    stdout = run([*small, "--stage=redmd", "--max_iters=2", "--student_every=1"])
    assert f"student: {out}/ode/step_000002/generator.safetensors" in stdout
    log = rows(out / "redmd" / "log.jsonl")
    assert all(math.isfinite(r["student_loss"]) and math.isfinite(r["critic_loss"]) for r in log)
    from model import WanModel

    student = WanModel.from_pretrained(out / "redmd" / "step_000002" / "generator_ema.safetensors")
    assert student.cfg.in_dim == 3 and student.cfg.text_len == 24  # the toy preset, loadable by sample.py
