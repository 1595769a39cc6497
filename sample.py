"""
Streaming generation. PLACEHOLDER until the sampling issue lands: with no weights in the repository
yet, this streams latent chunks from a tiny RANDOM WanModel through the EMA-Sink cache, so the whole
streaming path (model.py + sink.py) runs end to end in seconds. It decodes nothing and the numbers it
prints are not a video. The real sample.py (text encoder, VAE, mp4, prompt switching) replaces it.

    python sample.py                       # the embedded default: 20 chunks from the tiny random model
    python sample.py --num_chunks=100 --mode=static
"""

import argparse
import time

import torch
from tqdm import tqdm

from model import PRESETS, WanModel
from sink import MODES, SinkCache, rollout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_chunks", type=int, default=20, help="chunks of 3 latent frames to stream (default 20)")
    p.add_argument("--mode", default="ema", choices=MODES, help="sink mode (default ema)")
    p.add_argument("--alpha", type=float, default=0.999, help="EMA momentum of the sink (default 0.999)")
    p.add_argument("--window_frames", type=int, default=9, help="attention window in latent frames, sink included")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights and the noise")
    a = p.parse_args()

    print("sample.py is a placeholder: a tiny RANDOM model streams latents through the EMA-Sink cache "
          "(no weights, no decoding); see README 'Status'.")
    torch.manual_seed(a.seed)
    model = WanModel(PRESETS["tiny"]).eval()
    cache = SinkCache(model, 1, 8, 8, mode=a.mode, alpha=a.alpha, window_frames=a.window_frames,
                      max_frames=3 * a.num_chunks if a.mode == "full" else None)
    cache.set_prompt(model, torch.randn(1, 8, model.cfg.text_dim))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x0 in tqdm(rollout(model, cache, a.num_chunks), total=a.num_chunks, desc="chunks"):
            pass
    dt = time.perf_counter() - t0
    print(f"streamed {cache.frames} latent frames in {dt:.2f} s ({cache.frames / dt:.1f} latent frames/s); "
          f"cache {cache.nbytes() / 1e6:.2f} MB, RoPE positions {cache.k_fpos[:cache.n_frames].tolist()}, "
          f"last chunk mean {x0.mean():.4f} std {x0.std():.4f}")


if __name__ == "__main__":
    main()
