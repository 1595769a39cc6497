"""
The toy world's text side, written once into data/toy/ (nanoGPT's data/*/prepare.py in spirit):
  - tokenizer.json        a word-level tokenizer over the world's vocabulary (<pad> 0, </s> 1, <unk> 2)
  - text_encoder/         a frozen, randomly initialised tiny umT5 (config.json + model.safetensors), the same
                          t5.py encoder as Wan's at a tiny size: the DiT learns to read its states
  - prompts.txt           captions from the world's grammar, one per line, for the ODE and Re-DMD stages

    python data/prepare_toy.py            # deterministic: the same files every time
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import toyworld  # noqa: E402
from model import PRESETS  # noqa: E402
from t5 import tiny_text_encoder  # noqa: E402


def main(out=os.path.join(ROOT, "data", "toy"), seed=0, n_prompts=2000):
    dit = PRESETS["toy"]
    te = tiny_text_encoder(toyworld.WORDS, dit.text_dim, dit.text_len, seed=seed)
    te.save(out)
    enc = te.encoder
    with open(os.path.join(out, "prompts.txt"), "w") as fh:
        fh.write("\n".join(toyworld.captions(n_prompts, seed=seed)) + "\n")
    print(f"wrote {out}: {len(toyworld.WORDS)} words, a {sum(p.numel() for p in enc.parameters())}-parameter encoder, "
          f"{n_prompts} prompts")


if __name__ == "__main__":
    main()
