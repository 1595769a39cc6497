"""
Rewards for Re-DMD (paper §3.3). The interface training uses:

    r = reward(pixels, prompts)   # pixels [B, 3, T, H, W] in [-1, 1], prompts: list of B str -> [B] fp32, no grad

Re-DMD weights each sample's DMD gradient by exp(r / beta), so r should be a z-score (mean 0, std 1 over typical
samples): beta = 1/2 then means a one-sigma better video counts e^2 = 7.4x more.

- MotionReward: weightless, no downloads. The mean magnitude of temporal change, z-scored with running statistics.
  Enough to run Re-DMD end to end and to favour dynamic videos in toy experiments.
- VideoAlignReward: the paper's reward, VideoAlign's motion quality (MQ) from its Qwen2-VL-2B reward model, written
  from scratch below MotionReward (vision tower, language model, reward head, preprocessing, chat format, loading of
  the official `checkpoint-11352/model.pth` with its LoRA merged). r = (MQ - 1.1646) / 1.3811, VideoAlign's own
  normalisation; `.score()` also gives VQ and TA.

    python reward.py convert checkpoint-11352/model.pth videoalign.safetensors   # once; then load the safetensors
"""

import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


class MotionReward:
    """r = z-score of log(eps + mean_t |x_{t+1} - x_t|): how much the video moves, relative to what it has seen.

    Running statistics: until `1 / (1 - momentum)` samples have been seen they are the exact mean and variance of
    every sample so far (batches pooled by the law of total variance), after that an exponential moving average
    with that momentum, so the reward follows the generator as it changes. The std is floored at `min_std`: a first
    batch of two near-identical videos must not make the next batch's z-scores explode. The statistics are plain
    floats in state_dict(), so a resumed run continues exactly. The log makes the score scale-free."""

    def __init__(self, momentum=0.99, eps=1e-3, min_std=0.1):
        self.momentum, self.eps, self.min_std = momentum, eps, min_std
        self.mean, self.var, self.count = 0.0, 0.0, 0  # of the raw score, over the samples seen

    def raw(self, pixels):
        """pixels [B, C, T, H, W] in [-1, 1] -> [B] log mean absolute frame difference."""
        if pixels.dim() != 5 or pixels.shape[2] < 2:
            raise ValueError(f"MotionReward needs pixels [B, C, T >= 2, H, W]; got {tuple(pixels.shape)}")
        d = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().float().mean(dim=(1, 2, 3, 4))
        return torch.log(self.eps + d)

    @torch.no_grad()
    def __call__(self, pixels, prompts=None):
        s = self.raw(pixels)
        n = s.numel()
        m, v = s.mean().item(), s.var(unbiased=False).item()  # one host sync per training step, outside any model
        a = min(self.momentum, self.count / (self.count + n))  # pooled average first, then the EMA
        self.var = a * self.var + (1 - a) * v + a * (1 - a) * (self.mean - m) ** 2
        self.mean = a * self.mean + (1 - a) * m
        self.count += n
        return (s - self.mean) / max(self.var**0.5, self.min_std)

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, sd):
        self.mean, self.var, self.count = sd["mean"], sd["var"], sd["count"]


# =============================================================================
# VideoAlign's reward model (VideoReward), from scratch: Qwen2-VL-2B + LoRA + a reward head
#
# Facts about the released model (REFERENCE §8 and VideoAlign's public code, KwaiVGI/VideoAlign):
#   - Qwen2-VL-2B-Instruct; the vision tower fully tuned; LoRA (r 64, alpha 128) on the Linear layers of the language
#     model (lm_head, rm_head, embed_tokens and visual excluded); three added tokens <|VQ_reward|> <|MQ_reward|>
#     <|TA_reward|> (ids 151657-151659, embedding resized to 151660 rows); rm_head = Linear(1536 -> 1, no bias).
#   - The reward tokens are not appended by code: they sit inside the prompt template (VideoAlign's
#     `DETAILED_PROMPT_WITH_SPECIAL_TOKEN`, template type "detailed_special"), one after each rating request. The head
#     is read at the three of them in order of position, which in that template is [VQ, MQ, TA].
#   - Its forward calls the language model with position_ids=None, which (in the transformers version it was trained
#     with) means plain 1-D positions 0..L-1 for every token, vision tokens included: no multimodal 3-D RoPE. The vision
#     tower keeps its own 2-D RoPE.
#   - Video input: 2 fps sampling, frames resized to <= 200704 pixels in multiples of 28, uint8 -> [0, 1] -> CLIP
#     normalisation. Scores are z-scored with published statistics: MQ z = (MQ - 1.1646) / 1.3811.
# Module names are those of transformers' Qwen2-VL as VideoAlign saved them (`visual.*`, `model.layers.*`, `rm_head`),
# so the merged checkpoint loads as a strict copy; other layouts go through the one table QWEN_RENAMES.

from model import CheckpointError, _read_safetensors, check_keys, rename, save_safetensors  # shared by every loader

VIDEOALIGN_WHERE = "Hugging Face KwaiVGI/VideoReward: checkpoint-11352/model.pth (+ model_config.json)"
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
REWARD_NAMES = ("VQ", "MQ", "TA")
# VideoAlign's inference_config: raw score -> (raw - mean) / std
REWARD_NORM = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2-VL's chat template adds it when there is no system turn
TEMPLATE_PLACEHOLDERS = ("{text_prompt}", "{prompt}")  # VideoAlign's name first; the template holds exactly one
LORA_ALPHA = 128  # REFERENCE §8; model_config.json next to the checkpoint, or lora_alpha=, take precedence
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 200704  # qwen-vl-utils' floor; VideoAlign's max_frame_pixels


@dataclass
class QwenVLConfig:
    # vision tower
    vis_dim: int = 1280
    vis_depth: int = 32
    vis_heads: int = 16
    vis_mlp: int = 5120
    patch_size: int = 14
    temporal_patch: int = 2
    merge: int = 2  # 2x2 patches -> one language token
    vis_rope_theta: float = 10000.0
    # language model
    vocab: int = 151660
    dim: int = 1536
    layers: int = 28
    heads: int = 12
    kv_heads: int = 2
    mlp: int = 8960
    eps: float = 1e-6
    rope_theta: float = 1e6
    # reward head and the token ids it relies on
    reward_dim: int = 1  # rm_head's outputs: 1 (one score per reward token, VideoAlign) or 3 (read the diagonal)
    video_token_id: int = 151656  # <|video_pad|>
    reward_token_ids: tuple = (151657, 151658, 151659)


QWEN_PRESETS = {
    "qwen2-vl-2b": QwenVLConfig(),
    "tiny": QwenVLConfig(vis_dim=32, vis_depth=2, vis_heads=2, vis_mlp=64, vocab=49, dim=48, layers=2, heads=4,
                         kv_heads=2, mlp=64, video_token_id=45, reward_token_ids=(46, 47, 48)),
}

# ----------------------------------------------------------------------------- helpers


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_freq(dim, theta, device=None):
    """(dim/2,) fp32 RoPE frequencies theta^(-2i/dim)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def grid_list(grid_thw):
    """[n, 3] (CPU long tensor or list) -> list of (t, h, w) python ints: metadata, not data."""
    return [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]


def vision_positions(grid, merge, device=None):
    """(N, 2) long (row, col) of every patch in the tower's token order: frame pair, then merge blocks row-major,
    then the merge x merge patches of a block row-major (so 4 consecutive tokens form one language token)."""
    out = []
    for t, h, w in grid:
        r = torch.arange(h, device=device).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        c = torch.arange(w, device=device).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        rc = torch.stack([r, c], dim=-1).permute(0, 2, 1, 3, 4).reshape(h * w, 2)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- vision tower


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch), no bias: a Linear on each flattened patch."""

    def __init__(self, cfg):
        super().__init__()
        k = (cfg.temporal_patch, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.vis_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x):  # x (N, 3*tp*p*p) patches, (C, tp, p, p) order -> (N, vis_dim)
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.vis_heads
        self.qkv = nn.Linear(cfg.vis_dim, 3 * cfg.vis_dim)
        self.proj = nn.Linear(cfg.vis_dim, cfg.vis_dim)

    def forward(self, x, cos, sin, runs):
        """x (N, D); cos, sin (N, head_dim) fp32; runs: list of (n, S) = n attention segments of S tokens each, in
        order (a segment is one temporal slice of one video: attention never crosses frame pairs or videos)."""
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).unbind(1)  # each (N, H, Dh)
        q = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(v.dtype)  # 2-D RoPE in fp32
        k = (k.float() * cos[:, None] + rotate_half(k.float()) * sin[:, None]).to(v.dtype)
        out, start = [], 0
        for n, S in runs:  # equal-size segments batched into one SDPA call: (n, H, S, Dh)
            qs, ks, vs = (t[start : start + n * S].view(n, S, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(n * S, D))
            start += n * S
        return self.proj(torch.cat(out))


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vis_dim, cfg.vis_mlp)
        self.fc2 = nn.Linear(cfg.vis_mlp, cfg.vis_dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vis_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.vis_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, runs):
        x = x + self.attn(self.norm1(x), cos, sin, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each 2x2 block of patches concatenated (4 * vis_dim) -> Linear -> GELU -> Linear(dim)."""

    def __init__(self, cfg):
        super().__init__()
        self.width = cfg.vis_dim * cfg.merge**2
        self.ln_q = nn.LayerNorm(cfg.vis_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.dim))

    def forward(self, x):  # (N, vis_dim) -> (N / merge^2, dim)
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vis_depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, 3*tp*p*p) from `preprocess_video` (videos concatenated); grid_thw [n, 3] per video
        (t, h, w) in patches -> (N / merge^2, dim) language-model embeddings, videos in order."""
        cfg, grid = self.cfg, grid_list(grid_thw)
        x = self.patch_embed(pixel_values)
        pos = vision_positions(grid, cfg.merge, x.device)  # (N, 2)
        f = pos[..., None].float() * inv_freq(cfg.vis_dim // cfg.vis_heads // 2, cfg.vis_rope_theta, x.device)
        f = f.flatten(1)  # (N, head_dim/2): row frequencies, then column frequencies
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()  # (N, head_dim) fp32
        runs = []  # consecutive videos with equal slices share one batched attention call
        for t, h, w in grid:
            if runs and runs[-1][1] == h * w:
                runs[-1] = (runs[-1][0] + t, h * w)
            else:
                runs.append((t, h * w))
        for blk in self.blocks:
            x = blk(x, cos, sin, runs)
        return self.merger(x)


# ----------------------------------------------------------------------------- language model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalised in fp32, cast back, then scaled (Qwen2's order)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    """Causal GQA with biases on q/k/v and 1-D RoPE."""

    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads, hd = cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * hd)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * hd)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * hd)
        self.o_proj = nn.Linear(cfg.heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin):  # x (B, L, D); cos, sin (L, head_dim) in x's dtype
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)  # (B, Hkv, L, Dh)
        v = self.v_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp, bias=False)
        self.down_proj = nn.Linear(cfg.mlp, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, x):
        """x (B, L, D) input embeddings -> (B, L, D) final hidden states. Positions are 0..L-1 for every token, as
        the reward model was trained (right padding is harmless: causal attention never looks ahead)."""
        cfg, L = self.cfg, x.shape[1]
        pos = torch.arange(L, device=x.device, dtype=torch.float32)
        f = pos[:, None] * inv_freq(cfg.dim // cfg.heads, cfg.rope_theta, x.device)  # (L, head_dim/2)
        f = torch.cat([f, f], -1)  # (L, head_dim) fp32, cast to the model dtype like transformers
        cos, sin = f.cos().to(x.dtype), f.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


# ----------------------------------------------------------------------------- the reward model


class VideoAlignModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg)
        self.model = LanguageModel(cfg)
        self.rm_head = nn.Linear(cfg.dim, cfg.reward_dim, bias=False)

    def hidden_states(self, input_ids, pixel_values, grid_thw):
        """input_ids (B, L) with merged-token-count <|video_pad|> per video; pixel_values, grid_thw from
        `preprocess_video` (videos concatenated in batch order) -> (B, L, dim) final hidden states."""
        x = self.model.embed_tokens(input_ids)  # (B, L, D)
        v = self.visual(pixel_values, grid_thw).to(x.dtype)  # (sum of merged tokens, D)
        is_video = (input_ids == self.cfg.video_token_id)[..., None]  # (B, L, 1)
        return self.model(x.masked_scatter(is_video, v))  # row-major fill: video b goes to sequence b

    def reward_positions(self, input_ids):
        """(B, 3) long: positions of the reward tokens in order of appearance (sort, not nonzero: no host sync).
        Every row must hold exactly three reward tokens (VideoAlignReward checks this when it builds the ids)."""
        L = input_ids.shape[1]
        is_r = sum(input_ids == i for i in self.cfg.reward_token_ids).bool()  # (B, L)
        pos = torch.where(is_r, torch.arange(L, device=input_ids.device), L)
        return pos.sort(dim=1).values[:, :3]

    def forward(self, input_ids, pixel_values, grid_thw):
        """-> (B, 3) fp32 raw [VQ, MQ, TA]: rm_head read at the three reward tokens."""
        h = self.hidden_states(input_ids, pixel_values, grid_thw)
        pos = self.reward_positions(input_ids)  # (B, 3)
        r = self.rm_head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))  # (B, 3, reward_dim)
        r = r[..., 0] if self.cfg.reward_dim == 1 else r.diagonal(dim1=1, dim2=2)
        return r.float()

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, config=None, lora_alpha=None):
        """Load the official `model.pth` (LoRA merged on the fly) or a converted `.safetensors` (the normal path).
        Built on the meta device and filled with assign=True, one tensor converted at a time.
        config: QwenVLConfig or preset name for a checkpoint without one in its metadata (default qwen2-vl-2b)."""
        sd, cfg, src = load_videoalign_state_dict(path, config=config, lora_alpha=lora_alpha)
        check_videoalign_state_dict(sd, cfg, src)
        with torch.device("meta"):
            model = cls(cfg)
        for k in list(sd):
            sd[k] = sd[k].to(device=device, dtype=dtype if dtype is not None and sd[k].is_floating_point() else None)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()


# ----------------------------------------------------------------------------- preprocessing


def round_by(x, f):
    return round(x / f) * f  # python round (half to even), as qwen-vl-utils


def sample_frame_indices(total, fps, sample_fps=2.0, factor=2, min_frames=4, max_frames=768):
    """qwen-vl-utils' `smart_nframes` for a video of `total` frames at `fps`, then uniform sampling:
    n = total / fps * sample_fps clamped to [min_frames, min(max_frames, total)] and rounded to a multiple of
    `factor` (at most `total`); indices linspace(0, total - 1, n).round(). 81 frames at 16 fps -> n = 10.125 -> 10."""
    lo = math.ceil(min_frames / factor) * factor
    hi = math.floor(min(max_frames, total) / factor) * factor
    n = min(round_by(min(max(total / fps * sample_fps, lo), hi), factor), total)
    if not factor <= n <= total:
        raise ValueError(f"a video of {total} frames gives {n} sampled frames; VideoAlign needs at least {factor}")
    return torch.linspace(0, total - 1, n).round().long()


def smart_resize(h, w, factor=28, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS):
    """qwen-vl-utils' `smart_resize`: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.
    480x832 with max 200704 -> 336x588."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"aspect ratio of {h}x{w} is above 200")
    hb, wb = max(factor, round_by(h, factor)), max(factor, round_by(w, factor))
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def patchify(frames, patch=14, tp=2, merge=2):
    """frames (T, C, H, W), T a multiple of tp, H and W of patch * merge -> ((gt*gh*gw, C*tp*patch*patch), (gt, gh, gw)).
    Qwen2-VL's processor layout: tokens by frame pair, then merge blocks row-major, then the block's patches
    row-major; each patch vector flattened as (C, tp, patch, patch)."""
    T, C, H, W = frames.shape
    gt, gh, gw = T // tp, H // patch, W // patch
    x = frames.reshape(gt, tp, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    return x.reshape(gt * gh * gw, C * tp * patch * patch), (gt, gh, gw)


def preprocess_video(pixels, fps=16, layout=None, sample_fps=2.0, max_pixels=VIDEO_MAX_PIXELS,
                     min_pixels=VIDEO_MIN_PIXELS, patch=14, tp=2, merge=2):
    """One video in OUR pixel range [-1, 1], [T, 3, H, W] or [3, T, H, W] (layout "tchw" / "cthw"; inferred when
    unambiguous) -> (pixel_values (N, 3*tp*patch*patch) fp32, grid_thw (1, 3) long), VideoAlign's input:
      1. frames sampled at `sample_fps` from a video at `fps` (`sample_frame_indices`);
      2. [-1, 1] -> [0, 255] and rounded: the uint8 video VideoAlign was trained on (it decodes mp4 files);
      3. bicubic antialiased resize to `smart_resize` (as torchvision does on uint8: clamp, round);
      4. / 255 -> [0, 1], CLIP mean/std normalisation, last frame repeated to a multiple of tp, patchify.
    (reference quirk) The released Reward Forcing code fed VideoAlign [-1, 1] pixels (and all 81 frames) where the
    model expects [0, 1]; step 2 is the conversion it skipped."""
    if pixels.dim() != 4 or 3 not in pixels.shape[:2]:
        raise ValueError(f"preprocess_video needs one video [T, 3, H, W] or [3, T, H, W]; got {tuple(pixels.shape)}")
    if layout is None:
        if pixels.shape[0] == 3 and pixels.shape[1] == 3:
            raise ValueError("a [3, 3, H, W] video is ambiguous: pass layout='tchw' or 'cthw'")
        layout = "tchw" if pixels.shape[1] == 3 else "cthw"
    x = pixels if layout == "tchw" else pixels.transpose(0, 1)  # (T, 3, H, W)
    x = x[sample_frame_indices(x.shape[0], fps, sample_fps, factor=tp).to(x.device)]
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255)  # [-1, 1] -> uint8 values
    H, W = smart_resize(x.shape[2], x.shape[3], patch * merge, min_pixels, max_pixels)
    if (H, W) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(H, W), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255).round()
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = (x / 255 - mean) / std
    if x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, -1, -1, -1)])
    pv, grid = patchify(x, patch, tp, merge)
    return pv, torch.tensor([grid])


# ----------------------------------------------------------------------------- loading

PEFT_PREFIXES = ["base_model.model.", "module."]  # stripped when every key carries them
# checkpoint name -> our name (regex, replacement), after the PEFT prefix is stripped and LoRA merged. VideoAlign saved
# with transformers' older layout, which is ours as is; transformers >= 4.52 nests the language model and the tower.
QWEN_RENAMES = [
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
]
QWEN_DROP = re.compile(r"^lm_head\.|inv_freq$")  # the LM head (tied to the embedding, unused by the reward); buffers
LORA_KEY = re.compile(r"^(.*)\.lora_(A|B|embedding_A|embedding_B)\.([^.]+?)(\.weight)?$")


def merge_lora(sd, alpha, src, use_rslora=False, rank=None):
    """PEFT LoRA -> plain weights: X.base_layer.{weight,bias} + X.lora_A.<adapter>.weight (r, in) +
    X.lora_B.<adapter>.weight (out, r) -> X.weight = W + s B A, s = alpha / r (alpha / sqrt(r) with rsLoRA), computed
    in fp32 and cast back to W's dtype. An embedding LoRA (lora_embedding_A (r, vocab), _B (dim, r)) adds s (B A)^T.
    PEFT's modules_to_save copies replace their originals. rank: the r the config states, checked against A."""
    out, lora, adapters = {}, {}, set()
    for k, v in sd.items():
        m = LORA_KEY.match(k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
            adapters.add(m.group(3))
        elif ".original_module." not in k:
            out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", k.replace(".base_layer.", "."))] = v
    if len(adapters) > 1:
        raise CheckpointError(f"{src}: holds several LoRA adapters {sorted(adapters)}; expected one")
    for base, ab in lora.items():
        kind = "embedding_" if "embedding_A" in ab or "embedding_B" in ab else ""
        if set(ab) != {kind + "A", kind + "B"} or f"{base}.weight" not in out:
            raise CheckpointError(f"{src}: incomplete LoRA for {base!r}: has {sorted(ab)}, base weight "
                                  f"{'present' if f'{base}.weight' in out else 'missing'}")
        A, B = ab[kind + "A"].float(), ab[kind + "B"].float()  # (r, in), (out, r)
        r = A.shape[0]
        if rank is not None and r != rank:
            raise CheckpointError(f"{src}: LoRA of {base!r} has rank {r} but model_config.json says lora_r={rank}")
        delta = (alpha / (math.sqrt(r) if use_rslora else r)) * (B @ A)
        W = out[f"{base}.weight"]
        out[f"{base}.weight"] = (W.float() + (delta.T if kind else delta)).to(W.dtype)
    return out


def videoalign_names(sd):
    """Strip a prefix shared by every key, then map other layouts through QWEN_RENAMES (LoRA must be merged first)."""
    return rename(sd, QWEN_RENAMES, PEFT_PREFIXES)


def read_lora_config(ckpt_file):
    """VideoAlign's model_config.json (beside checkpoint-NNNN/ or the file) -> its peft_lora_config dict, or {}."""
    d = os.path.dirname(os.path.abspath(ckpt_file))
    for folder in (d, os.path.dirname(d)):
        f = os.path.join(folder, "model_config.json")
        if os.path.isfile(f):
            with open(f) as fh:
                return json.load(fh).get("peft_lora_config", {}) or {}
    return {}


def resolve_config(config):
    if config is None or isinstance(config, QwenVLConfig):
        return config
    if config not in QWEN_PRESETS:
        raise ValueError(f"unknown config {config!r}; presets are {sorted(QWEN_PRESETS)}")
    return QWEN_PRESETS[config]


def config_from_json(text, src):
    try:
        kw = json.loads(text)
        kw["reward_token_ids"] = tuple(kw["reward_token_ids"])
        return QwenVLConfig(**{k: v for k, v in kw.items() if k in {f.name for f in fields(QwenVLConfig)}})
    except Exception as err:
        raise CheckpointError(f"{src}: unreadable config in the safetensors metadata ({err})") from err


def find_checkpoint(path):
    """A file, a checkpoint-NNNN/ folder holding model.pth, or VideoAlign's root folder (latest checkpoint-NNNN/)."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.pth")):
            return os.path.join(path, "model.pth")
        steps = sorted((d for d in os.listdir(path) if re.fullmatch(r"checkpoint-\d+", d)), key=lambda d: int(d[11:]))
        if steps and os.path.isfile(os.path.join(path, steps[-1], "model.pth")):
            return os.path.join(path, steps[-1], "model.pth")
        raise CheckpointError(f"{path}: no model.pth here or in a checkpoint-NNNN/ folder (expected {VIDEOALIGN_WHERE})")
    raise FileNotFoundError(f"{path}: no such file or directory. Expected the VideoAlign reward model: {VIDEOALIGN_WHERE}, "
                            "or the .safetensors that `python reward.py convert` wrote from it")


def load_videoalign_state_dict(path, config=None, lora_alpha=None):
    """Read a VideoAlign checkpoint -> (state dict with our names, LoRA merged, lm_head dropped; QwenVLConfig; source
    path for error messages). Accepted: the official torch pickle `model.pth` (PEFT-wrapped, read with
    weights_only=True and mmap), its folders, or a .safetensors (ours carries its config in the metadata).
    LoRA alpha: `lora_alpha`, else model_config.json's peft_lora_config, else 128 (REFERENCE §8)."""
    src = find_checkpoint(os.fspath(path))
    cfg = resolve_config(config)
    if src.endswith(".safetensors"):
        sd = {}
        meta = _read_safetensors(src, sd)
        if cfg is None and "config" in meta:
            cfg = config_from_json(meta["config"], src)
    else:
        try:
            sd = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise CheckpointError(f"{src}: not a torch checkpoint or safetensors file ({err})") from err
        if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{src}: expected a flat dict of tensors (VideoAlign's model.pth), got {type(sd).__name__}"
                                  + (f" with keys {sorted(sd)[:10]}" if isinstance(sd, dict) else ""))
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    lcfg = read_lora_config(src)
    alpha = lora_alpha if lora_alpha is not None else lcfg.get("lora_alpha", LORA_ALPHA)
    sd = merge_lora(sd, alpha, src, use_rslora=bool(lcfg.get("use_rslora", False)), rank=lcfg.get("lora_r"))
    sd = {k: v for k, v in videoalign_names(sd).items() if not QWEN_DROP.search(k)}
    return sd, cfg or QWEN_PRESETS["qwen2-vl-2b"], src


def check_videoalign_state_dict(sd, cfg, src):
    """Strict key and shape check against a meta-device model: one error listing everything wrong, with counts."""
    name = next((n for n, c in QWEN_PRESETS.items() if c == cfg), None)
    with torch.device("meta"):
        check_keys(sd, VideoAlignModel(cfg), src, f"a VideoAlignModel ({f'preset {name!r}' if name else cfg})")


def convert(src, dst, dtype=None, config=None, lora_alpha=None):
    """VideoAlign's model.pth (or any accepted checkpoint) -> one safetensors file: LoRA merged, lm_head dropped, our
    names, config in the metadata, checked strictly first, written atomically. Returns the config."""
    sd, cfg, where = load_videoalign_state_dict(src, config=config, lora_alpha=lora_alpha)
    check_videoalign_state_dict(sd, cfg, where)
    for k in list(sd):
        if dtype is not None and sd[k].is_floating_point():
            sd[k] = sd[k].to(dtype)
    save_safetensors(sd, dst, cfg)
    return cfg


# ----------------------------------------------------------------------------- chat format and prompt template


class QwenChat:
    """Qwen2-VL's chat format for one user turn holding a video then text, built by hand (its chat template with
    add_generation_prompt=True), tokenized with `tokenizers` from the checkpoint's tokenizer.json. A tokenizer without
    the reward tokens (Qwen2-VL-2B-Instruct's own) gets them added, as VideoAlign did; their ids are checked."""

    def __init__(self, tokenizer_json, cfg):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.fspath(tokenizer_json))
        missing = [t for t in REWARD_TOKENS if self.tok.token_to_id(t) is None]
        if missing:
            self.tok.add_special_tokens(missing)
        expect = {"<|video_pad|>": cfg.video_token_id, **dict(zip(REWARD_TOKENS, cfg.reward_token_ids))}
        for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", *expect):
            got = self.tok.token_to_id(t)
            if got is None or got != expect.get(t, got):
                raise ValueError(f"{tokenizer_json}: token {t} has id {got}, the model expects {expect.get(t, 'one')}; "
                                 "use the tokenizer.json of the VideoAlign checkpoint or of Qwen2-VL-2B-Instruct")
        self.video_id = cfg.video_token_id
        self.pad_id = self.tok.token_to_id("<|endoftext|>") or 0

    @staticmethod
    def text(user_text):
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|><|video_pad|><|vision_end|>{user_text}<|im_end|>\n<|im_start|>assistant\n")

    def encode(self, user_text, n_video_tokens):
        """-> list of ids, the one <|video_pad|> expanded to n_video_tokens (the merged vision tokens t*h/2*w/2).
        Special tokens are split out before the rest is tokenized, so expanding after is exact."""
        ids = self.tok.encode(self.text(user_text), add_special_tokens=False).ids
        i = ids.index(self.video_id)
        return ids[:i] + [self.video_id] * n_video_tokens + ids[i + 1 :]


def read_template(path):
    """The prompt template is part of the checkpoint's training contract: VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN
    text, read verbatim from a file the user provides. Refuse rather than score with another text."""
    how = ("save VideoAlign's template verbatim, from a clone of github.com/KwaiVGI/VideoAlign: python -c \"import "
           "prompt_template as p; open('videoalign_template.txt', 'w').write(p.DETAILED_PROMPT_WITH_SPECIAL_TOKEN)\"")
    if path is None:
        raise ValueError(f"VideoAlign needs its prompt template file and none was given; {how}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such template file; {how}")
    with open(path, encoding="utf-8") as fh:
        return check_template(fh.read(), path, how)


def check_template(text, src="template", how=""):
    holders = [(p, text.count(p)) for p in TEMPLATE_PLACEHOLDERS if p in text]
    if len(holders) != 1 or holders[0][1] != 1:
        raise ValueError(f"{src}: needs exactly one prompt placeholder, {TEMPLATE_PLACEHOLDERS[0]} (or "
                         f"{TEMPLATE_PLACEHOLDERS[1]}); found {holders or 'none'}. {how}")
    at = [text.find(t) for t in REWARD_TOKENS]
    if any(text.count(t) != 1 for t in REWARD_TOKENS) or at != sorted(at):
        raise ValueError(f"{src}: needs each of {', '.join(REWARD_TOKENS)} exactly once and in that order (the reward "
                         f"head is read at them); is this VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN? {how}")
    return text


def fill_template(template, prompt):
    holder = next(p for p in TEMPLATE_PLACEHOLDERS if p in template)
    return template.replace(holder, prompt)


# ----------------------------------------------------------------------------- the reward callable


class VideoAlignReward:
    """r = reward(pixels [B, 3, T, H, W] in [-1, 1], prompts) -> [B] fp32 VideoAlign MQ z-score, no grad.

    fps: the frame rate of the videos given (Wan: 16), from which 2 fps are sampled as VideoAlign does."""

    def __init__(self, model, chat, template, fps=16):
        self.model, self.chat, self.fps = model, chat, fps
        self.template = check_template(template)

    @classmethod
    def from_pretrained(cls, ckpt_path, tokenizer_json, template_file, dtype=None, device=None, fps=16, lora_alpha=None):
        template = read_template(template_file)  # refuse before reading 5 GB of weights
        model = VideoAlignModel.from_pretrained(ckpt_path, dtype=dtype, device=device, lora_alpha=lora_alpha)
        return cls(model, QwenChat(tokenizer_json, model.cfg), template, fps=fps)

    def inputs(self, pixels, prompts):
        """-> (input_ids (B, L) right-padded, pixel_values (N, 3*tp*p*p), grid_thw (B, 3)) on the model's device."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"VideoAlignReward needs pixels [B, 3, T, H, W] in [-1, 1]; got {tuple(pixels.shape)}")
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {pixels.shape[0]} videos")
        cfg, p = self.model.cfg, next(self.model.parameters())
        pv, grids = zip(*(preprocess_video(v, self.fps, layout="cthw", patch=cfg.patch_size, tp=cfg.temporal_patch,
                                           merge=cfg.merge) for v in pixels))
        grid = torch.cat(grids)  # (B, 3) CPU
        ids = [self.chat.encode(fill_template(self.template, text), int(g.prod()) // cfg.merge**2)
               for text, g in zip(prompts, grid)]
        for text, row in zip(prompts, ids):
            if sum(row.count(i) for i in cfg.reward_token_ids) != 3:
                raise ValueError(f"prompt {text[:60]!r} changes the number of reward tokens; it must not contain them")
        L = max(map(len, ids))
        input_ids = torch.tensor([row + [self.chat.pad_id] * (L - len(row)) for row in ids], device=p.device)
        return input_ids, torch.cat(pv).to(p.device, p.dtype), grid

    @torch.no_grad()
    def score(self, pixels, prompts, normalize=False):
        """-> {"VQ", "MQ", "TA"}: [B] fp32 raw scores, or VideoAlign's z-scores with normalize=True."""
        raw = self.model(*self.inputs(pixels, prompts))  # (B, 3)
        out = {}
        for i, name in enumerate(REWARD_NAMES):
            mean, std = REWARD_NORM[name]
            out[name] = (raw[:, i] - mean) / std if normalize else raw[:, i]
        return out

    @torch.no_grad()
    def __call__(self, pixels, prompts):
        return self.score(pixels, prompts, normalize=True)["MQ"]


def main(argv):
    import argparse

    p = argparse.ArgumentParser(prog="python reward.py", description="VideoAlign reward tools. `convert` writes "
                                "VideoAlign's checkpoint-11352/model.pth as one safetensors file with the LoRA merged.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="merge the LoRA and write one safetensors file (the normal load path)")
    c.add_argument("src", help="checkpoint-11352/model.pth, its folder, or VideoAlign's root folder")
    c.add_argument("dst", help="output .safetensors path (written atomically)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)")
    c.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: model_config.json, else 128)")
    c.add_argument("--config", default=None, choices=sorted(QWEN_PRESETS), help="model sizes (default: qwen2-vl-2b)")
    a = p.parse_args(argv)
    cfg = convert(a.src, a.dst, dtype=getattr(torch, a.dtype) if a.dtype else None, config=a.config,
                  lora_alpha=a.lora_alpha)
    print(f"wrote {a.dst}: {cfg}")


if __name__ == "__main__":
    main(sys.argv[1:])
