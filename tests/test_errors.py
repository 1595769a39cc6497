"""Bad settings and paths, tried as a new user would: every probe runs the real command in a fresh process and must end
with exit status 2, one line on stderr naming the setting (or file) and what is allowed, no traceback, and nothing
loaded or written (stdout holds no progress, only notes)."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "data" / "toy"


def probes(tmp):
    """(command, what the one line must contain). tmp holds the files some probes need."""
    (tmp / "a_file").write_text("x")
    (tmp / "comments.txt").write_text("# only a comment\n\n")
    (tmp / "prompts.txt").write_text("# a comment line is skipped\na red ball\n")
    (tmp / "toy_prompts.txt").write_text("a red circle moves right\na purple dog jumps\n")
    used = tmp / "used" / "redmd"  # a stage folder holding an earlier run's checkpoints
    for step in (4, 6):
        (used / f"step_{step:06d}").mkdir(parents=True)
    (used / "latest").write_text("step_000006")
    # a run whose latest checkpoint has a corrupt state.pt (its weights files read), the one before it intact
    corrupt = tmp / "corrupt" / "redmd"
    for step in (2, 4):
        (corrupt / f"step_{step:06d}").mkdir(parents=True)
        for name in ("generator", "generator_ema", "critic"):
            save_file({"w": torch.zeros(2)}, str(corrupt / f"step_{step:06d}" / f"{name}.safetensors"))
        (corrupt / f"step_{step:06d}" / "state.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    (corrupt / "latest").write_text("step_000004")
    # ODE pairs of an earlier run: one written by the old code (done.json without "grid"), one with other settings
    for name, record in (("old_pairs", {"ode_steps": 48}), ("other_pairs", {"grid": "exact", "ode_steps": 99})):
        (tmp / name / "ode" / "pairs").mkdir(parents=True)
        (tmp / name / "ode" / "pairs" / "done.json").write_text(json.dumps(record))
    not_writable = "/proc/no_such_dir"  # cannot be created, even by root (a read-only folder can be, by root)
    # the default --reward=videoalign needs its weights: the probes take the weightless toy reward unless they test it
    default = ["train.py", f"--prompts={tmp / 'prompts.txt'}", f"--out_dir={tmp / 'out'}", "--num_frames=6",
               "--height=4", "--width=4"]
    train = default + ["--reward=motion"]
    sample = ["sample.py", f"--out={tmp / 'o.mp4'}"]
    return [
        # sample.py: the device, the cache, numbers
        (sample + ["--device=cuda"], "--device=cuda: no cuda device"),
        (sample + ["--device=gpu"], "--device=gpu: not a device name"),
        (sample + ["--device=cuda:3"], "--device=cuda:3"),
        (sample + ["--alpha=2"], "--alpha=2.0: the EMA momentum is in [0, 1]"),
        (sample + ["--chunk_frames=0"], "--chunk_frames=0: a chunk holds at least 1"),
        (sample + ["--window_frames=2"], "--window_frames=2: the window holds the sink (3) and the current chunk (3)"),
        (sample + ["--sink_mode=ring"], "--sink_mode=ring: takes one of ema, static, none, full"),
        (sample + ["--num_frames=-1"], "--num_frames=-1: must be >= 0"),
        (sample + ["--live", "--port=70000"], "--port=70000: takes 0 .. 65535"),
        (sample + ["--live", "--interactive=true"], "--live streams one video that the page steers"),
        (sample + ["--quality=11"], "--quality=11"),
        (sample + ["--height=10"], "--height=10: must be a multiple of 4"),
        (sample + ["--steps=4"], "unknown setting --steps"),
        (sample + ["--sink_mode=full", "--num_frames=3000"], "more than the model's 1024 RoPE positions"),
        # sample.py: prompts
        (sample + ["--prompt=x:foo"], "'x' is not a start time in seconds"),
        (sample + ["--prompt=5"], "--prompt='5': a start time with no prompt"),
        (sample + ["--prompt=-1:a red circle"], "the start time -1 s must be a number >= 0"),
        (sample + ["--prompt=a purple dog"], "the toy world's vocabulary has no 'dog', 'purple'"),
        (sample + [f"--prompts={tmp / 'comments.txt'}"], "no prompts in it"),
        (sample + [f"--prompts={tmp / 'nowhere.txt'}"], "nowhere.txt: cannot read it"),
        # sample.py: output paths and weights
        (["sample.py", f"--out={not_writable}/o.mp4"], f"--out={not_writable}/o.mp4: cannot write in"),
        (["sample.py", f"--out={tmp / 'a_file'}/o.mp4"], "a_file is a file, not a folder"),
        (["sample.py", f"--out={tmp}"], "an .mp4 file path"),
        (["sample.py", f"--out={tmp / 'video.mp4'}", "--out", str(tmp / "x.txt")], "x.txt: an .mp4 file path"),
        (sample + [f"--ckpt={tmp / 'nowhere.pt'}"], "nowhere.pt: no such file. The student checkpoint is"),
        (sample + [f"--ckpt={tmp / 'a_file'}", f"--wan={tmp}"], "missing tokenizer"),
        (sample + [f"--wan={tmp}"], "--wan is given but not --ckpt"),
        # eval.py
        (["eval.py", "--num_frames=0"], "--num_frames=0: must be >= 1"),
        (["eval.py", "--alpha=2"], "--alpha=2.0"),
        (["eval.py", "--device=gpu"], "--device=gpu"),
        (["eval.py", "--chunk_frames=0"], "--chunk_frames=0"),
        (["eval.py", f"--ckpt={tmp / 'nowhere'}"], "nowhere: no such file or folder"),
        (["eval.py", f"--out_png={not_writable}/a.png"], "cannot write in"),
        (["eval.py", "--height=8"], "--height 8 and --width 16 must be equal"),
        (["eval.py", "--sink_mode=full", "--num_frames=3000"], "more than the model's 1024 RoPE positions"),
        (["eval.py", f"--out_json={tmp / 'r.txt'}"], "r.txt: a .json file path"),
        (["eval.py", f"--compare={tmp / 'nowhere.json'}"], "nowhere.json: cannot read a result from it"),
        (["eval.py", f"--compare={tmp / 'a_file'}", f"--out_png={tmp / 'a.png'}"], "only --curve_png goes with it"),
        (["eval.py", "--denoise=500"], "--denoise=[500.0]: timesteps in (0, 1000], with --teacher"),
        (["eval.py", f"--teacher={TOY / 'teacher.safetensors'}", "--denoise=0"], "--denoise=[0.0]"),
        # train.py: settings
        (train + ["--device=cuda"], "--device=cuda: no cuda device"),
        (train + ["--device=gpu"], "--device=gpu: not a device name"),
        (train + ["--alpha=2"], "--alpha=2.0"),
        (train + ["--chunk_frames=0"], "--chunk_frames=0"),
        (train + ["--window_frames=2"], "--window_frames=2"),
        (train + ["--stage=sft"], "--stage=sft: takes teacher, ode or redmd"),
        (train + ["--num_frames=7"], "--num_frames=7: 7 latent frames, not a multiple of --chunk_frames=3"),
        (train + ["--height=5"], "--height=5 --width=4: pixels must be multiples of 2 x 2"),
        (train + ["--beta=0"], "--beta=0.0: the temperature is > 0"),
        (train + ["--lr_student=0"], "--lr_student=0.0: must be > 0"),
        (train + ["--reward=clip"], "--reward=clip: takes videoalign, toy, motion, none"),
        (train + ["--stage=ode", f"--init={tmp / 'a_file'}"], f"--init={tmp / 'a_file'}: only --stage=teacher takes it"),
        (train + ["--reward=toy", f"--reward_ckpt={tmp / 'nowhere.safetensors'}"],
         f"--reward=toy: {tmp / 'nowhere.safetensors'}: no such file (train it once: python reward.py train)"),
        (train + ["--batch_size=0"], "--batch_size=0: must be >= 1"),
        (train + ["--sink_mode=full", "--num_frames=3000"], "more than the model's 1024 RoPE positions"),
        (default, "--reward=videoalign (the default: the paper's VideoAlign motion-quality reward) needs "
                  "--reward_ckpt (unset), --reward_tokenizer (unset), --reward_template (unset)"),
        (train + ["--reward=videoalign", f"--reward_ckpt={tmp / 'nowhere.safetensors'}",
                  f"--reward_tokenizer={tmp / 'a_file'}"],
         f"needs --reward_ckpt={tmp / 'nowhere.safetensors'} (no such file), --reward_template (unset). "),
        (train + ["--ode_mask=full"], "--ode_mask=full: takes causal (full block-causal, the paper) or window"),
        # train.py: files and folders
        (["train.py", "--stage=ode"], "--prompts is required"),
        (train + [f"--prompts={tmp / 'comments.txt'}"], "no prompts in it"),
        (train + [f"--teacher={tmp / 'nowhere'}"], "--teacher="),
        (train + [f"--teacher={tmp / 'a_file'}"], "a_file"),
        (train + [f"--text_encoder={tmp}"], "missing tokenizer"),
        (train + [f"--text_encoder={TOY}", f"--prompts={tmp / 'toy_prompts.txt'}"],
         "words outside the vocabulary of --text_encoder"),
        (train + [f"--out_dir={not_writable}"], f"--out_dir={not_writable}: cannot write in"),
        (train + [f"--out_dir={tmp / 'a_file'}"], "a_file is a file, not a folder"),
        (train + [f"--out_dir={tmp / 'used'}"], "already holds checkpoints of a run (latest: step_000006); continue it "
                                                "with --resume=true, or give a new --out_dir"),
        (train + [f"--out_dir={tmp / 'corrupt'}", "--resume=true"],
         "step_000004/state.pt: cannot resume from it"),
        # (the ODE stage needs no reward files: these run with the default --reward)
        (default + ["--stage=ode", f"--out_dir={tmp / 'old_pairs'}"],
         f"{tmp / 'old_pairs' / 'ode' / 'pairs'} holds ODE pairs of an older train.py, at the teacher steps nearest "
         "the student's timesteps (its done.json has no \"grid\": \"exact\")"),
        (default + ["--stage=ode", f"--out_dir={tmp / 'other_pairs'}"],
         "holds ODE pairs sampled with --ode_steps=99 (now 48)"),
        # weights.py convert and bench.py
        (["weights.py", "convert", "dit", str(tmp / "nowhere.pt"), str(tmp / "x.safetensors")], "nowhere.pt"),
        (["weights.py", "convert", "dit", str(tmp / "a_file"), str(tmp / "x.safetensors")], "a_file: not a torch"),
        (["weights.py", "convert", "dit", str(tmp / "a_file"), str(tmp / "x.pt")], "must end in .safetensors"),
        (["weights.py", "convert", "dit", str(tmp / "a_file"), f"{not_writable}/x.safetensors"], "cannot write in"),
        (["weights.py", "convert", "dit", "--lora-alph=2", "a", "b"], "unrecognized arguments"),
        # vae.py train, and a VAE that does not fit
        (["vae.py", "train", "--size=10"], "--size=10"),
        (["vae.py", "fit"], "the one command is `train`"),
        (["vae.py", "train", "--step=3"], "unknown setting --step"),
        (["train.py", "config/toy.py", f"--vae={tmp / 'nowhere.safetensors'}", "--stage=teacher"],
         "nowhere.safetensors: no such file or folder"),
        (["train.py", "config/toy.py", "--model=toy-pixels", "--stage=teacher", f"--out_dir={tmp / 'out'}"],
         "the network has in_dim=3; --vae="),
        (["train.py", "config/toy.py", "--vae=", "--stage=teacher", f"--out_dir={tmp / 'out'}"],
         "with no --vae the toy world's latents are its RGB frames (3 channels): --model=toy-pixels"),
        (["bench.py", "--scale=huge"], "--scale must be one of"),
        (["bench.py", "--device=gpu"], "--device=gpu"),
    ]


def run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probes")
    table = probes(tmp)
    with ThreadPoolExecutor(max_workers=3) as pool:  # each probe is a fresh interpreter importing torch
        outs = list(pool.map(run, [cmd for cmd, _ in table]))
    return tmp, list(zip(table, outs))


def test_every_probe_is_one_line_and_exit_status_2(results):
    tmp, rows = results
    wrong = []
    for (cmd, want), out in rows:
        lines = out.stderr.strip().splitlines()
        progress = [s for s in out.stdout.splitlines() if s.strip() and not s.startswith("note:")]
        if out.returncode != 2 or len(lines) != 1 or want not in lines[0] or progress:
            wrong.append(f"{' '.join(cmd)}\n   exit {out.returncode}, stderr {out.stderr[-600:]!r}, stdout {out.stdout[-300:]!r}")
    assert not wrong, "\n".join(wrong)
    # nothing written by the refusals: no video, no checkpoint folder, the used and corrupt runs untouched
    assert not (tmp / "o.mp4").exists() and not (tmp / "out" / "redmd").exists()
    assert sorted(p.name for p in (tmp / "used" / "redmd").iterdir()) == ["latest", "step_000004", "step_000006"]


def test_the_corrupt_checkpoint_names_the_one_before(results):
    _, rows = results
    line = next(out.stderr for (cmd, _), out in rows if any("corrupt" in c for c in cmd))
    assert "resume from the one before with `echo step_000002 >" in line and "corrupt/redmd/latest`" in line


def test_the_default_reward_says_where_its_files_are_and_what_else_runs(results):
    _, rows = results
    line = next(out.stderr for (cmd, want), out in rows if want.startswith("--reward=videoalign (the default"))
    assert "Hugging Face KlingTeam/VideoReward" in line and "checkpoint-11352/model.pth" in line  # VIDEOALIGN_WHERE
    assert "prompt_template.DETAILED_PROMPT_WITH_SPECIAL_TOKEN from GitHub KlingAIResearch/VideoAlign" in line
    assert line.rstrip().endswith("Or --reward=motion (the weightless toy reward) or --reward=none (plain DMD)")


def test_a_different_chunking_from_training_is_noted(tmp_path):
    """sample.py compares the cache settings with those the checkpoint records (train.py writes them into every
    checkpoint), or with the released student's 3-frame chunks when it records none."""
    import sample
    from config import configure
    from model import PRESETS, WanModel
    from weights import save_safetensors

    torch.manual_seed(0)
    ckpt = tmp_path / "student.safetensors"
    save_safetensors(WanModel(PRESETS["toy"]), ckpt, meta={"train_config": '{"chunk_frames": 2, "window_frames": 8}'})
    for args, notes in (([], ["--chunk_frames=3 differs from the 2 its checkpoint records",
                              "--window_frames=9 differs from the 8 its checkpoint records"]),
                        (["--chunk_frames=2", "--window_frames=8"], [])):
        cfg = configure(sample.SampleConfig(), [f"--ckpt={ckpt}", f"--out={tmp_path / 'o.mp4'}", *args])
        kind, jobs = sample.check(cfg)
        assert kind == "toy" and jobs[0][1] == str(tmp_path / "o.mp4")
        from sink import settings_mismatch

        got = settings_mismatch(WanModel.from_pretrained(ckpt).trained_with, cfg)
        assert [g.split(":")[0] for g in got] == notes
    cfg = configure(sample.SampleConfig(), ["--chunk_frames=4", "--window_frames=12"])  # the shipped toy: no record
    assert settings_mismatch(None, cfg) == ["--chunk_frames=4 differs from the 3 Reward Forcing's released student "
                                            "uses: expect artefacts if the student never saw it"]
