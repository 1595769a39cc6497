"""
Checkpoint layouts: everything this repository knows about how official weights are stored, in one place.

The networks (model.py, t5.py, vae.py, qwen2vl.py) name their modules after the official checkpoints, so loading
those is a strict copy. This module holds what the networks should not: the one file reader, the rename tables of
every other layout, the LoRA merge, the one strict key/shape check, and the sizes a checkpoint implies.
"""

import json
import os

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the network it is loaded into (every loader raises it)."""


def save_safetensors(model_or_sd, path, cfg=None):
    """Write one safetensors file, our module names, with `cfg` (a dataclass) in its metadata; atomically (a
    temporary file renamed into place), so an interrupted write never leaves a truncated checkpoint."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    if isinstance(model_or_sd, torch.nn.Module):
        cfg, sd = getattr(model_or_sd, "cfg", cfg), model_or_sd.state_dict()
    else:
        sd = model_or_sd
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    meta = {"format": "pt"}
    if cfg is not None:
        meta["config"] = json.dumps(asdict(cfg))
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)
