"""The README's two commands: CI runs exactly the test command, and the main job runs with no arguments."""

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
    """The embedded default: a tiny random model streams the paper's prompt switch into a playable mp4 and says
    that its weights are random and where the real ones come from."""
    import imageio.v2 as imageio

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # steadier on a shared machine; the command is unchanged
    out = subprocess.run([sys.executable, str(ROOT / "sample.py")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout and "--ckpt" in out.stdout and "--wan" in out.stdout
    assert "chunk 7: prompt -> 'Dark coffee streams into the empty glass'" in out.stdout  # 5 s -> chunk 7
    with imageio.get_reader(str(tmp_path / "out.mp4")) as r:
        frames = [f for f in r]
    assert len(frames) == 160 and frames[0].shape == (64, 64, 3)  # 10 s at 16 fps
    assert "wrote out.mp4: 160 frames" in out.stdout and "FPS" in out.stdout
