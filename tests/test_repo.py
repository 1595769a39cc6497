"""The README's two commands: CI runs exactly the test command, and the main job runs with no arguments; and a
setting's name means one thing, in one unit, in every script."""

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command():
    run, test = readme_commands()
    assert run == "pip install -r requirements.txt && python sample.py"
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == test
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split()


def test_sample_runs_with_no_arguments(tmp_path):
    """The embedded default: the shipped toy student streams the toy prompt switch into a playable mp4, says what it
    is and where the real weights come from; the frames are the world's 16x16 pixels shown 8x larger."""
    import imageio.v2 as imageio

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # steadier on a shared machine; the command is unchanged
    out = subprocess.run([sys.executable, str(ROOT / "sample.py")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "the toy student" in out.stdout and "--ckpt" in out.stdout and "--wan" in out.stdout
    # 4 s -> pixel frame 64 = latent frame 64 (no VAE: stride 1) -> chunk 22 (frames 66..68) is the first after it
    assert "chunk 22: prompt -> 'a blue triangle moves down slowly on a white background and the camera pans left'" in out.stdout
    with imageio.get_reader(str(tmp_path / "out.mp4")) as r:
        frames = [f for f in r]
    assert len(frames) == 160 and frames[0].shape == (128, 128, 3)  # 10 s at 16 fps
    assert "wrote out.mp4: 160 frames" in out.stdout and "FPS" in out.stdout
    # nearest-neighbour 8x: every 8x8 block of a frame is one colour (up to mp4 compression)
    f = frames[80].astype(float)
    block = f.reshape(16, 8, 16, 8, 3)
    assert (block - block.mean(axis=(1, 3), keepdims=True)).__abs__().mean() < 12


SCRIPTS = {"train": "TrainConfig", "sample": "SampleConfig", "eval": "EvalConfig", "bench": "BenchConfig"}
RETIRED = {"mode": "sink_mode", "backend": "compile_backend", "size": "scale (bench.py) or height and width"}


def test_a_setting_means_one_thing_in_every_script():
    """A name shared by scripts has one type; frame counts are video frames and heights / widths pixels, and their
    help says so; --compile is a bool; the retired names are gone; every setting has help text."""
    seen = {}
    for module, cls in SCRIPTS.items():
        for f in dataclasses.fields(getattr(importlib.import_module(module), cls)):
            assert f.metadata.get("help"), f"{module}.py --{f.name}: no help text"
            assert f.name not in RETIRED, f"{module}.py --{f.name} is now --{RETIRED[f.name]}"
            seen.setdefault(f.name, []).append((module, f))
    for name, uses in seen.items():
        assert len({str(f.type) for _, f in uses}) == 1, f"--{name} has different types: {uses}"
    assert all(f.type is bool for _, f in seen.get("compile", []))
    for name, unit in (("num_frames", "video frames"), ("height", "pixels"), ("width", "pixels")):
        assert {m for m, _ in seen[name]} == {"train", "sample", "eval"}
        for module, f in seen[name]:
            assert unit in f.metadata["help"], f"{module}.py --{name}: the help does not say {unit!r}"
