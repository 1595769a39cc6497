"""The README's two commands: CI runs exactly the test command, and the main job runs with no arguments."""

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


def test_sample_runs_with_no_arguments():
    out = subprocess.run([sys.executable, "sample.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "placeholder" in out.stdout and "streamed 60 latent frames" in out.stdout
    # the window is full and renumbered: 3 sink frames + 6 ring frames, positions 0..8
    assert "RoPE positions [0, 1, 2, 6, 7, 8, 3, 4, 5]" in out.stdout
