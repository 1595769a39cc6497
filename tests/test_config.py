"""config.configure: presets, typed overrides, list fields, unknown keys."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from config import configure


@dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    compile: bool = False
    name: str = "run"
    window: Optional[int] = 9
    prompt: list[str] = field(default_factory=lambda: ["default"], metadata={"help": "repeatable"})


def test_overrides_are_typed(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("lr = 0.5\nsteps = 3 * 7\n_private = 1\n")
    c = configure(Cfg(), [str(preset), "--steps=4", "--compile", "true", "--window=none", "--name", "x=y",
                          "--prompt=0:a", "--prompt", "5:b"])
    assert c.lr == 0.5 and c.steps == 4 and c.compile is True and c.window is None and c.name == "x=y"
    assert c.prompt == ["0:a", "5:b"]
    assert configure(Cfg(), []).prompt == ["default"]
    assert configure(Cfg(), ["--window=0x10"]).window == 16
    c = configure(Cfg(), ["--compile", "--steps=2"])  # a bare boolean flag, followed by another setting
    assert c.compile is True and c.steps == 2
    assert configure(Cfg(), ["--steps=2", "--compile"]).compile is True  # ... or last
    assert configure(Cfg(), ["--compile", "false"]).compile is False


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown setting --stpes; did you mean --steps"):
        configure(Cfg(), ["--stpes=3"])
    with pytest.raises(SystemExit, match="unknown setting --pro; did you mean --prompt"):
        configure(Cfg(), ["--pro=3"])  # a prefix of a setting's name is suggested too
    with pytest.raises(SystemExit, match="--steps takes an int, got 'many'"):
        configure(Cfg(), ["--steps=many"])
    with pytest.raises(SystemExit, match="--compile takes true or false"):
        configure(Cfg(), ["--compile=maybe"])
    with pytest.raises(SystemExit, match="--lr needs a value"):
        configure(Cfg(), ["--lr"])
    (tmp_path / "bad.py").write_text("learning_rate = 1\n")
    with pytest.raises(SystemExit, match="unknown setting 'learning_rate'"):
        configure(Cfg(), [str(tmp_path / "bad.py")])
    with pytest.raises(SystemExit, match="cannot read it"):
        configure(Cfg(), ["config/nope.py"])
    with pytest.raises(SystemExit) as e:
        configure(Cfg(), ["--help"], doc="my script")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "my script" in out and "--prompt=['default']" in out and "repeatable" in out


def test_prompt_files_and_presets_from_any_directory(tmp_path, monkeypatch):
    """train.py and sample.py read prompt files one way (blank and # lines skipped); config/toy.py finds the toy's
    files from any working directory."""
    from pathlib import Path

    import train
    from config import read_prompt_file

    f = tmp_path / "p.txt"
    f.write_text("# the toy captions\n\na red ball\n  # indented comment\n a blue cube \n")
    assert read_prompt_file(f) == ["a red ball", "a blue cube"]
    f.write_text("# nothing\n")
    with pytest.raises(SystemExit, match="p.txt: no prompts in it"):
        read_prompt_file(f)
    toy = Path(__file__).resolve().parent.parent / "config" / "toy.py"
    monkeypatch.chdir(tmp_path)
    cfg = configure(train.TrainConfig(), [str(toy)])
    assert Path(cfg.text_encoder, "tokenizer.json").is_file() and Path(cfg.prompts).is_file()


def test_real_runs_default_to_the_papers_reward_and_mask():
    """train.py's defaults are the paper's: the VideoAlign reward (no silent toy reward in a real run) and the ODE
    stage's full block-causal mask; config/toy.py chooses the learned toy reward itself, whose file is shipped."""
    from pathlib import Path

    import train

    cfg = train.TrainConfig()
    assert cfg.reward == "videoalign" and cfg.ode_mask == "causal"
    assert train.ode_attention(cfg) == {"window_frames": None, "sink_frames": 0}
    toy = Path(__file__).resolve().parent.parent / "config" / "toy.py"
    toy_cfg = configure(train.TrainConfig(), [str(toy)])
    assert toy_cfg.reward == "toy" and toy_cfg.ode_mask == "causal" and Path(train.TOY_REWARD).is_file()
