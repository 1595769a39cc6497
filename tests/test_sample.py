"""sample.py: playable mp4s with the right frame count, prompt switches at the scheduled chunk, --prompts files,
interactive prompts, the real-weights loading path (--ckpt / --wan on tiny random files, tests/tiny.py), and errors
naming missing weights."""

import io
import os
import queue
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import sample
import tiny

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--height", "32", "--width", "32"]


def read_frames(path):
    import imageio.v2 as imageio

    with imageio.get_reader(str(path)) as r:
        return [f for f in r]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random student and Wan folder on disk, and the same models in memory."""
    return tiny.write_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def models(files):
    return files[2]


@pytest.fixture(scope="module")
def wan_args(files):
    """sample.py's real path on the tiny files: --ckpt STUDENT --wan FOLDER, 32x32 pixels."""
    return ["--ckpt", str(files[0]), "--wan", str(files[1]), *SMALL]


def test_short_run_writes_playable_mp4(tmp_path, wan_args):
    out = tmp_path / "a.mp4"
    sample.main(["--prompt", "a cat walks on the beach", "--num_frames", "21", "--out", str(out), *wan_args])
    frames = read_frames(out)
    assert len(frames) == 1 + 4 * (6 - 1)  # 2 chunks = 6 latent frames
    assert frames[0].shape == (32, 32, 3) and frames[0].dtype.name == "uint8"
    # a length between chunk boundaries: 2 chunks are generated, the mp4 is cut to the frames asked for
    sample.main(["--prompt", "a cat", "--num_frames", "15", "--out", str(tmp_path / "b.mp4"), *wan_args])
    assert len(read_frames(tmp_path / "b.mp4")) == 15


def test_time_to_chunk_mapping():
    assert [sample.chunk_start_frame(k) for k in range(5)] == [0, 9, 21, 33, 45]
    assert sample.chunk_at(0, 16) == 0
    assert sample.chunk_at(0.5, 16) == 1  # frame 8 -> chunk 1 (starts at frame 9)
    assert sample.chunk_at(5, 16) == 7  # frame 80 -> chunk 7 (frame 81, 5.06 s): never before its time
    assert sample.chunks_for(21) == 2 and sample.chunks_for(22) == 3 and sample.chunks_for(240) == 21
    assert sample.parse_schedule(["5:b", "0:a: with a colon", "10.5 : c"]) == [(0.0, "a: with a colon"), (5.0, "b"),
                                                                               (10.5, "c")]
    with pytest.raises(SystemExit, match="must start at 0"):
        sample.parse_schedule(["3:late"])


def run(models, prompts, recache=False, new_prompts=None, on_chunk=None, num_frames=45, out=None):
    """stream_video on the in-memory tiny models: (stats, [(cross-attention K, x0) per chunk])."""
    model, te, vae = models
    cfg = sample.configure(sample.SampleConfig(), ["--num_frames", str(num_frames), "--recache", str(recache), *SMALL])
    sched = sample.encode_schedule(te, sample.parse_schedule(prompts), CPU, torch.float32)
    seen = []

    def record(k, cache, x0, frames):
        seen.append((cache.ctx_k.clone(), x0.clone()))
        if on_chunk:
            on_chunk(k)

    with tempfile.TemporaryDirectory() as tmp:
        stats = sample.stream_video(cfg, model, vae, sched, out or f"{tmp}/v.mp4", te=te, new_prompts=new_prompts,
                                    on_chunk=record, log=lambda *a: None)
    return stats, seen


def test_prompt_switch_changes_cross_attention_cache(models):
    model, te, _ = models
    a, b = "an empty glass on a rustic wooden table", "dark coffee streams into the empty glass"
    with torch.no_grad():
        k_a = model.cross_kv(te([a]))[0]
        k_b = model.cross_kv(te([b]))[0]
    assert not torch.equal(k_a, k_b)
    # 1 s at 16 fps = frame 16 -> chunk 2 (frames 21..32); 45 frames = 4 chunks
    stats, seen = run(models, [f"0:{a}", f"1:{b}"])
    assert stats["switches"] == [(2, b)] and len(seen) == 4
    for k, (ctx_k, _) in enumerate(seen):
        assert torch.equal(ctx_k, k_a if k < 2 else k_b), f"chunk {k} has the wrong prompt's K"
    # same seed without a switch: identical chunks before the switch, different ones from it on
    _, plain = run(models, [a])
    assert all(torch.equal(seen[k][1], plain[k][1]) for k in (0, 1))
    assert not torch.allclose(seen[2][1], plain[2][1])
    # --recache also re-encodes the window under the new prompt: the switched chunk changes again
    stats_r, rec = run(models, [f"0:{a}", f"1:{b}"], recache=True)
    assert stats_r["switches"] == [(2, b)] and torch.equal(rec[2][0], k_b)
    assert torch.equal(rec[1][1], seen[1][1]) and not torch.allclose(rec[2][1], seen[2][1])


def test_interactive_prompt_takes_effect_at_next_chunk(models, monkeypatch):
    model, te, _ = models
    q = queue.Queue()
    new = "a red bird flies over the sea"
    stats, seen = run(models, ["a cat"], new_prompts=q, on_chunk=lambda k: q.put(new) if k == 1 else None)
    assert stats["switches"] == [(2, new)]
    with torch.no_grad():
        assert torch.equal(seen[2][0], model.cross_kv(te([new]))[0])
        assert torch.equal(seen[1][0], model.cross_kv(te(["a cat"]))[0])
    # the stdin reader: stripped, non-empty lines in order
    monkeypatch.setattr("sys.stdin", io.StringIO("first prompt\n\n  second  \n"))
    lines = sample.stdin_lines()
    assert [lines.get(timeout=5), lines.get(timeout=5)] == ["first prompt", "second"]


def test_prompts_file_one_video_per_line(tmp_path, wan_args):
    f = tmp_path / "prompts.txt"
    f.write_text("a cat walks\n\n# a comment\na dog runs on the beach\n")
    sample.main(["--prompts", str(f), "--num_frames", "9", "--out", str(tmp_path / "v.mp4"), *wan_args])
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["v_000.mp4", "v_001.mp4"]
    assert [len(read_frames(tmp_path / n)) for n in ("v_000.mp4", "v_001.mp4")] == [9, 9]


def test_real_weights_path_equals_the_models_written(tmp_path, wan_args, models):
    """--ckpt/--wan load the files (strictly, through model.py, t5.py, vae.py) and give the video of the models that
    were written to them."""
    prompt = "a cat walks on the beach"
    sample.main(["--prompt", prompt, "--num_frames", "21", "--out", str(tmp_path / "files.mp4"), *wan_args])
    run(models, [prompt], num_frames=21, out=str(tmp_path / "memory.mp4"))
    a, b = read_frames(tmp_path / "files.mp4"), read_frames(tmp_path / "memory.mp4")
    assert len(a) == len(b) == 21 and all((x == y).all() for x, y in zip(a, b))


def test_missing_or_wrong_weights_name_the_file(tmp_path, models, files):
    _, te, vae = models
    ckpt = tmp_path / "rewardforcing.pt"
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--wan", str(tmp_path / "wan")])
    assert "rewardforcing.pt" in str(e.value) and "JaydenLu666/Reward-Forcing-T2V-1.3B" in str(e.value)
    with pytest.raises(SystemExit, match="--ckpt is given but not --wan"):  # a Wan student (16 latent channels)
        sample.main(["--ckpt", str(files[0])])
    ckpt.write_bytes(b"not a checkpoint")
    wan = tiny.write_wan(tmp_path / "wan", te, vae, parts=("tokenizer",))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--wan", str(wan)])
    msg = str(e.value)
    assert "models_t5_umt5-xxl-enc-bf16.pth" in msg and "Wan2.1_VAE.pth" in msg and "Wan-AI/Wan2.1-T2V-1.3B" in msg
    assert "tokenizer.json" not in msg  # present, so not listed
    wan = tiny.write_wan(tmp_path / "wan", te, vae)
    with pytest.raises(SystemExit) as e:  # all files there, but the student is not a checkpoint
        sample.main(["--ckpt", str(ckpt), "--wan", str(wan)])
    assert "student DiT" in str(e.value) and str(ckpt) in str(e.value) and "JaydenLu666" in str(e.value)


def test_a_toy_student_of_ones_own_needs_only_ckpt(tmp_path, capsys):
    """--ckpt alone on a toy-world student: the toy text encoder and the toy VAE, 16x16 frames shown 8x. In
    interactive mode a line with words outside the toy vocabulary is ignored with a message, not streamed as <unk>."""
    import shutil

    ckpt = tmp_path / "my_toy_student.safetensors"
    shutil.copy(sample.TOY_STUDENT, ckpt)
    sample.main(["--ckpt", str(ckpt), "--num_frames=6", "--out", str(tmp_path / "t.mp4"),
                 "--prompt", "a red circle moves right"])
    frames = read_frames(tmp_path / "t.mp4")
    assert len(frames) == 6 and frames[0].shape == (128, 128, 3)
    model, te, vae = sample.load_toy(ckpt, CPU, torch.float32)
    q = queue.Queue()
    cfg = sample.configure(sample.SampleConfig(), ["--num_frames=9", "--height=16", "--width=16"])
    sched = sample.encode_schedule(te, [(0.0, "a red circle moves right")], CPU, torch.float32)
    good, bad = "a blue square moves left", "a purple dog moves left"

    def on_chunk(k, *_):
        if k == 0:
            q.put(good)
            q.put(bad)  # the latest line wins, unless the toy cannot read it

    stats = sample.stream_video(cfg, model, vae, sched, str(tmp_path / "i.mp4"), te=te, new_prompts=q,
                                on_chunk=on_chunk, log=lambda *a: None)
    assert stats["switches"] == [(1, good)]
    assert "ignored 'a purple dog moves left': the toy world's vocabulary has no 'dog', 'purple'" in capsys.readouterr().out


def test_toy_latents_are_decoded_by_the_toy_vae_and_rgb_ones_are_the_frames(tmp_path):
    """A toy student streams through the toy VAE: every chunk's frames are vae.decode of that chunk's latents (3
    latent frames -> 3 video frames). A toy network on RGB frames (model preset toy-pixels, in_dim 3) is still a toy
    student, with no VAE: its frames are its latents, clamped."""
    from model import PRESETS, WanModel
    from vae import WanVAE
    from weights import save_safetensors

    cfg = sample.configure(sample.SampleConfig(), ["--num_frames=9", "--height=16", "--width=16"])
    torch.manual_seed(0)
    pixels_ckpt = tmp_path / "pixels.safetensors"
    save_safetensors(WanModel(PRESETS["toy-pixels"]), pixels_ckpt)
    for ckpt in (sample.TOY_STUDENT, pixels_ckpt):
        model, te, vae = sample.load_toy(ckpt, CPU, torch.float32)
        sched = sample.encode_schedule(te, [(0.0, "a red circle moves right")], CPU, torch.float32)
        seen = []
        sample.stream_video(cfg, model, vae, sched, str(tmp_path / "v.mp4"), log=lambda *a: None,
                            on_chunk=lambda k, cache, x0, frames: seen.append((x0.clone(), frames.clone())))
        assert len(seen) == 3
        for x0, frames in seen:
            if ckpt == pixels_ckpt:
                assert isinstance(vae, sample.PixelFrames) and torch.equal(frames, x0.clamp(-1, 1))
            else:
                assert isinstance(vae, WanVAE) and vae.cfg.frame_by_frame and x0.shape == (1, 16, 3, 4, 4)
                with torch.no_grad():
                    assert frames.shape == (1, 3, 3, 16, 16) and torch.allclose(frames, vae.decode(x0), atol=1e-6)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full to fill a disk")
def test_a_disk_that_fills_mid_video_is_one_line_not_a_traceback(tmp_path):
    """The output folder passes the up-front check, then every write fails (an mp4 path linked to /dev/full): ffmpeg
    prints its reason, sample.py ends with one line naming the file and exit status 2, no traceback."""
    out = tmp_path / "full.mp4"
    out.symlink_to("/dev/full")
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out={out}"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "No space left on device" in p.stderr  # ffmpeg's own reason
    assert re.search(rf"writing {re.escape(str(out))} failed after \d+ frames: ffmpeg stopped", p.stderr.splitlines()[-1])
