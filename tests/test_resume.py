"""No lost work: a run stopped at any moment continues exactly. Kills at every point of a checkpoint save (simulated
in-process, and one real SIGKILL), and resume under torchrun with 2 ranks for DDP and FSDP2: the resumed run's
losses and weights equal an uninterrupted run's."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import plumbing
import train
from test_train import ROOT, rows, run, tiny

FILES = ("generator.safetensors", "generator_ema.safetensors", "critic.safetensors", "state.pt")


class Killed(BaseException):
    """Stands in for SIGKILL: raised at a chosen point of a save, and caught by nothing in train.py."""


def complete(folder):
    """The checkpoint `latest` names, checked to hold every file in full (each one loads)."""
    path = plumbing.latest_checkpoint(folder)
    assert path is not None and os.path.isdir(path), f"latest names {path}"
    for f in FILES[:3]:
        load_file(os.path.join(path, f))
    torch.load(os.path.join(path, FILES[3]), weights_only=True)
    return path


def weights(path):
    return load_file(str(path / "generator_ema.safetensors")) | {"critic." + k: v for k, v in
                                                                  load_file(str(path / "critic.safetensors")).items()}


def same_run(a, b):
    """Two stage folders hold the same run: the same log rows (timings aside) and the same final weights."""
    ra, rb = rows(a / "log.jsonl"), rows(b / "log.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if k != "s_per_it":
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (x["step"], k)
    wa, wb = (weights(Path(plumbing.latest_checkpoint(d))) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def args(tmp, out, *extra):
    return tiny(tmp, out, "--stage=redmd", "--keep_ckpts=1", *extra)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """The uninterrupted run: 6 iterations, a checkpoint every 2."""
    tmp = tmp_path_factory.mktemp("reference")
    train.main(args(tmp, tmp / "out", "--max_iters=6"))
    return tmp / "out" / "redmd"


# where a kill lands in StageDir.save, in the order save() does things; each patches one function to raise there
def half_written(monkeypatch):
    real = plumbing.save_safetensors

    def save(sd, path, *a, **k):
        if "step_000004" in str(path):
            real(sd, path, *a, **k)
            data = open(path, "rb").read()
            os.remove(path)
            with open(f"{path}.tmp{os.getpid()}", "wb") as fh:  # where save_safetensors writes before its rename
                fh.write(data[: len(data) // 2])
            raise Killed
        return real(sd, path, *a, **k)

    monkeypatch.setattr(plumbing, "save_safetensors", save)


def before(target):
    """Kill just before the os.replace whose source ends with `target`, while step 4 is being saved."""

    def patch(monkeypatch):
        real = os.replace

        def replace(src, dst):
            saving = [n for n in os.listdir(os.path.dirname(src)) if n.startswith("step_000004")]
            if str(src).endswith(target) and saving:
                raise Killed
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)

    return patch


def before_pruning(monkeypatch):
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        if re.fullmatch(r"step_\d+", os.path.basename(path)):
            raise Killed
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)


KILLS = {"a weights file half written": half_written,
         "every file written, the folder not renamed": before("step_000004.tmp"),
         "the folder renamed, latest not updated": before("latest.tmp"),
         "latest updated, the older checkpoint not pruned": before_pruning}


@pytest.mark.parametrize("where", list(KILLS))
def test_a_kill_during_a_save_loses_nothing(tmp_path, reference, monkeypatch, where):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        KILLS[where](m)
        with pytest.raises(Killed):
            train.main(args(tmp_path, out, "--max_iters=6"))  # killed while saving step 4
    folder = out / "redmd"
    path = complete(folder)  # latest names a complete checkpoint: step 2, or step 4 once its folder is renamed
    assert os.path.basename(path) in ("step_000002", "step_000004")
    assert [r["step"] for r in rows(folder / "log.jsonl")] == [1, 2, 3, 4]  # logged before the kill
    train.main(args(tmp_path, out, "--max_iters=6", "--resume=true"))
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]  # the interrupted save's leftovers are gone
    same_run(folder, reference)


def test_a_real_sigkill_while_saving_every_step(tmp_path, reference):
    """SIGKILL at an unplanned moment of a run that saves every iteration (most of its time is spent saving), then
    --resume=true: the same run as one never stopped."""
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", *args(tmp_path, out, "--max_iters=6", "--save_interval=1")]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in p.stdout:
        if "saved" in line and "step_000003" in line:
            time.sleep(0.05)  # into iteration 4 or its save
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    complete(out / "redmd")
    run(args(tmp_path, out, "--max_iters=6", "--resume=true"))
    same_run(out / "redmd", reference)


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_torchrun_two_ranks_resume_equals_one_uninterrupted_run(tmp_path, backend):
    base = ["--stage=redmd", f"--dist={backend}", "--save_interval=2"]
    a = run(tiny(tmp_path, tmp_path / "a", *base, "--max_iters=4"), nproc=2)
    run(tiny(tmp_path, tmp_path / "b", *base, "--max_iters=2"), nproc=2)
    b = run(tiny(tmp_path, tmp_path / "b", *base, "--max_iters=4", "--resume=true"), nproc=2)
    assert "resumed from" in b and "step 2)" in b
    same_run(tmp_path / "a" / "redmd", tmp_path / "b" / "redmd")
    fingerprint = re.compile(r"rank (\d) student fingerprint ([0-9.e+-]+)")
    assert dict(fingerprint.findall(a)) == dict(fingerprint.findall(b))  # both ranks' full weights, to 10 digits
