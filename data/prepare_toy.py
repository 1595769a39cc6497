"""
The toy world's text side, written once into data/toy/ (nanoGPT's data/*/prepare.py in spirit):
  - tokenizer.json        a word-level tokenizer over the world's vocabulary (<pad> 0, </s> 1, <unk> 2)
  - text_encoder/         a frozen, randomly initialised tiny umT5 (config.json + model.safetensors), the same
                          t5.py encoder as Wan's at a tiny size: the DiT learns to read its states
  - prompts.txt           captions from the world's grammar, one per line, for the ODE and Re-DMD stages

    python data/prepare_toy.py            # deterministic: the same files every time
"""

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import toyworld  # noqa: E402
from model import PRESETS  # noqa: E402
from t5 import tiny_text_encoder  # noqa: E402


def main(out=os.path.join(ROOT, "data", "toy"), seed=0, n_prompts=2000):
    from safetensors.torch import save_file

    dit = PRESETS["toy"]
    os.makedirs(os.path.join(out, "text_encoder"), exist_ok=True)
    te = tiny_text_encoder(toyworld.WORDS, dit.text_dim, dit.text_len, seed=seed)
    te.tokenizer.save(os.path.join(out, "tokenizer.json"))
    enc, cfg = te.encoder, te.encoder.cfg
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, os.path.join(out, "text_encoder", "model.safetensors"))
    hf = {"vocab_size": cfg.vocab, "d_model": cfg.dim, "d_kv": cfg.dim_attn // cfg.num_heads, "d_ff": cfg.dim_ffn,
          "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "relative_attention_num_buckets": cfg.num_buckets,
          "relative_attention_max_distance": cfg.max_distance, "layer_norm_epsilon": cfg.eps}
    with open(os.path.join(out, "text_encoder", "config.json"), "w") as fh:
        json.dump(hf, fh, indent=1)
    with open(os.path.join(out, "prompts.txt"), "w") as fh:
        fh.write("\n".join(toyworld.captions(n_prompts, seed=seed)) + "\n")
    print(f"wrote {out}: {len(toyworld.WORDS)} words, a {sum(p.numel() for p in enc.parameters())}-parameter encoder, "
          f"{n_prompts} prompts")


if __name__ == "__main__":
    main()
