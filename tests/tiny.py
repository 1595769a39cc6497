"""Tiny random stand-ins for the real weights, written to disk in the real layouts, so tests run sample.py through
its real loading path (--ckpt STUDENT --wan FOLDER): a student safetensors (read by model.py) and a Wan2.1 folder
holding a umT5 .pth with its tokenizer.json (t5.py) and a VAE .pth (vae.py), sizes inferred from the tensors.
Their videos are noise: they exercise files, shapes and plumbing, not quality."""

import torch

from model import PRESETS, WanModel
from t5 import tiny_text_encoder
from vae import VAE_PRESETS, WanVAE
import weights
from weights import save_safetensors

# the tiny tokenizer's vocabulary: enough English for the prompts the tests use (others map to <unk>)
WORDS = (
    "a an the of on in into with and at to from by is are its over under near through while as it this that "
    "empty glass rustic wooden table dark coffee streams pours cup mug water milk tea wine light shadow sun sunset "
    "cat dog bird fish horse man woman child people person hand face eyes hair walks runs jumps flies swims sits "
    "stands dances smiles looks turns falls rises opens closes red blue green yellow white black orange purple "
    "golden silver small big old young slow fast bright calm quiet city street road car train boat sea ocean wave "
    "beach river lake mountain forest tree flower grass sky cloud rain snow fire smoke night day morning evening "
    "room window door house kitchen garden camera close-up view shot slowly quickly gently surfing cinematic"
).split()

WAN_T5, WAN_VAE = weights.WAN_T5_FILE, weights.WAN_VAE_FILE  # Wan2.1's original layout
WAN_TOKENIZER = "google/umt5-xxl/tokenizer.json"


def models(seed=0):
    """The tiny DiT (PRESETS['tiny']: dim 64, 2 layers, text_dim 32, text_len 16), a word-level umT5 of the DiT's
    text width and length, and the tiny Wan VAE; random weights (seeded), fp32, eval mode."""
    torch.manual_seed(seed)
    model = WanModel(PRESETS["tiny"]).eval()
    te = tiny_text_encoder(WORDS, model.cfg.text_dim, model.cfg.text_len, seed=seed, lowercase=True)
    vae = WanVAE(VAE_PRESETS["tiny"]).eval()
    return model, te, vae


def write_wan(folder, te, vae, parts=("tokenizer", "t5", "vae")):
    """A Wan2.1-T2V-1.3B folder in the original layout holding `parts` of the tiny text encoder and VAE."""
    (folder / WAN_TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
    if "tokenizer" in parts:
        te.tokenizer.save(folder / WAN_TOKENIZER)
    if "t5" in parts:
        torch.save(te.encoder.state_dict(), folder / WAN_T5)
    if "vae" in parts:
        torch.save(vae.state_dict(), folder / WAN_VAE)
    return folder


def write_files(folder, seed=0):
    """models(seed) on disk: folder/student.safetensors (config in its metadata) and the Wan folder folder/wan.
    Returns (student path, wan folder, the in-memory models)."""
    model, te, vae = tiny = models(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, folder / "student.safetensors")
    return folder / "student.safetensors", write_wan(folder / "wan", te, vae), tiny
