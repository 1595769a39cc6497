"""
Configuration, nanoGPT style: every script has one dataclass of settings; the command line overrides it.

    python train.py config/toy.py --lr=3e-4 --compile=true --out_dir out/toy
    python sample.py --prompt "0:a glass on a table" --prompt "5:coffee pours into it"

- A positional argument is a preset: a Python file (config/NAME.py) whose top-level assignments set fields (names
  starting with _ are its own; `__file__` is the preset's path).
- `--key=value` or `--key value` sets one field, parsed by the field's type (bool: true/false/1/0/yes/no, or a
  bare `--flag` for true;
  list fields collect every occurrence; None-able fields take `none`). An unknown key is an error that lists
  close matches. `--help` prints the script's docstring and every field with its default and help text.
- Fields are declared one way: `name: type = opt(default, "help text")` (`opt(factory=list, help=...)` for lists).
- Every script checks its settings in one function next to its config, before any model loads. A bad setting or path
  is `raise SystemExit("--key=value: what is allowed")`; `cli(main)` prints that one line and exits with status 2.
"""

import ast
import dataclasses
import difflib
import os
import sys
import typing

import torch


def opt(default=None, help="", factory=None):
    """A config field with its --help text: the one way every script's config declares a setting."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _parse(name, tp, text):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(tp)):
        if text.lower() == "none":
            return None
        return _parse(name, args[0], text)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} takes true or false, got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text) if tp is not int else int(text, 0)
        except ValueError:
            raise ValueError(f"--{name} takes {'an' if tp is int else 'a'} {tp.__name__}, got {text!r}") from None
    if origin in (list, tuple) or tp in (list, tuple):
        return _parse(name, args[0] if args else str, text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _is_list(tp):
    return typing.get_origin(tp) is list or tp is list


def help_text(cfg, doc=""):
    lines = [doc.strip(), "", "settings (--key=value; a preset file config/NAME.py may come first):"]
    for f in dataclasses.fields(cfg):
        default = getattr(cfg, f.name)
        lines.append(f"  --{f.name}={default!r}" + (f"\n      {f.metadata['help']}" if "help" in f.metadata else ""))
    return "\n".join(lines)


def configure(cfg, argv=None, doc=""):
    """Apply presets and overrides from argv (default sys.argv[1:]) to the dataclass instance cfg; returns cfg."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    seen_lists = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(help_text(cfg, doc))
            sys.exit(0)
        if not arg.startswith("--"):  # a preset file
            try:
                src = open(arg).read()
            except OSError as err:
                raise SystemExit(f"preset {arg!r}: cannot read it ({err.strerror}); presets live in config/*.py")
            ns = {}
            exec(compile(src, arg, "exec"), {"__file__": os.path.abspath(arg)}, ns)  # a preset may locate files by it
            for key, value in ns.items():
                if key.startswith("_"):
                    continue
                if key not in fields:
                    raise SystemExit(f"preset {arg}: unknown setting {key!r}")
                setattr(cfg, key, value)
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key in hints and hints[key] is bool and (i >= len(argv) or argv[i].startswith("--")):
                value = "true"  # a bare boolean flag: --compile
            elif i >= len(argv):
                raise SystemExit(f"--{key} needs a value")
            else:
                value = argv[i]
                i += 1
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3) or [f for f in fields if f.startswith(key)][:3]
            raise SystemExit(f"unknown setting --{key}" + (f"; did you mean {', '.join('--' + c for c in close)}?" if close else "")
                             + " (--help lists them)")
        tp = hints[key]
        try:
            parsed = _parse(key, tp, value)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if _is_list(tp):
            if key not in seen_lists:  # the first occurrence on the command line replaces the default list
                setattr(cfg, key, [])
                seen_lists.add(key)
            getattr(cfg, key).append(parsed)
        else:
            setattr(cfg, key, parsed)
    return cfg


def train_command(cfg, argv, doc, script):
    """`python SCRIPT train [--key=value ...]`, the one command of a script that trains a shipped file once (reward.py,
    vae.py): -> cfg configured from the settings after `train`, or None after printing the help (no argument, -h)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(cfg, doc))
        return None
    if argv[0] != "train":
        raise SystemExit(f"python {script}: the one command is `train` (got {argv[0]!r}); --help lists its settings")
    return configure(cfg, argv[1:], doc)


def cli(main):
    """Run a script's main() from the command line: a SystemExit carrying a message (a bad setting, a missing file)
    becomes that message on stderr, one line, and exit status 2, with no traceback; under torchrun rank 0 alone prints
    it. Other exits (0, 130 after Ctrl-C) pass through."""
    try:
        main()
    except SystemExit as err:
        if not isinstance(err.code, str):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(" ".join(err.code.split("\n")), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def pick_device(name):
    """A --device setting -> torch.device; 'auto' is the current accelerator (CUDA, MPS, ...) if any, else the CPU.
    A name torch does not know, or a device this machine does not have, exits with a one-line message."""
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if name == "auto":
        return accel or torch.device("cpu")
    have = "cpu" + (f", {accel.type}, {accel.type}:N" if accel else "")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device={name}: not a device name; this machine has: auto, {have}") from None
    if dev.type == "cpu":
        return dev
    if accel is None or accel.type != dev.type:
        raise SystemExit(f"--device={name}: no {dev.type} device on this machine (or torch was built without it); "
                         f"this machine has: auto, {have}")
    n = torch.accelerator.device_count()
    if dev.index is not None and dev.index >= n:
        raise SystemExit(f"--device={name}: this machine has {n} {dev.type} device(s), {dev.type}:0 .. {dev.type}:{n - 1}")
    return dev


def pick_dtype(name, device):
    """A --dtype setting -> torch dtype; 'auto' is fp32 on the CPU and bf16 on an accelerator."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype takes float32, bfloat16, float16 or auto, got {name!r}")
    return getattr(torch, name)


# ----------------------------------------------------------------------------- checks every script shares


def read_prompt_file(path, setting="--prompts"):
    """A prompts file: one prompt per line; blank lines and lines starting with '#' are skipped (train.py and
    sample.py read it the same way). Exits with a one-line message if it cannot be read or holds no prompt."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise SystemExit(f"{setting}={path}: cannot read it ({why})") from None
    prompts = [s for s in lines if s and not s.startswith("#")]
    if not prompts:
        raise SystemExit(f"{setting}={path}: no prompts in it (one per line; blank and # lines are skipped)")
    return prompts


def writable_dir(path, label):
    """Create the folder `path` if needed and prove a file can be written there (a probe file, removed at once), so a
    bad output location fails before the work starts, not at its first save. label: the setting, e.g. '--out=x.mp4'."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"{label}: {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise SystemExit(f"{label}: cannot write in {path} ({err.strerror}: {err.filename})") from None
