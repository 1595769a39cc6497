"""
Qwen2-VL-2B as VideoAlign's video reward model uses it, written from scratch: the vision tower, the language model,
the reward head, and the video preprocessing (qwen-vl-utils' frame sampling and resizing, the processor's patch
layout). reward.py wraps it into the reward Re-DMD trains with.

Facts about the released model (VideoAlign's public code, GitHub KlingAIResearch/VideoAlign, and its checkpoint on
Hugging Face, KlingTeam/VideoReward, formerly KwaiVGI/VideoReward):
  - Qwen2-VL-2B-Instruct; the vision tower fully tuned; LoRA (r 64, alpha 128) on the Linear layers of the language
    model (lm_head, rm_head, embed_tokens and visual excluded); three added tokens <|VQ_reward|> <|MQ_reward|>
    <|TA_reward|> (ids 151657-151659, embedding resized to 151660 rows); rm_head = Linear(1536 -> N, no bias), read
    at the three reward tokens in order of position: N = 1 in the release (token i's one output is score i), N = 3
    in VideoAlign's training script (token i's output i, the diagonal of the 3x3). The loader takes N from the
    tensor (weights.videoalign).
  - Its forward calls the language model with position_ids=None, which (in the transformers version it was trained
    with) means plain 1-D positions 0..L-1 for every token, vision tokens included: no multimodal 3-D RoPE. The
    vision tower keeps its own 2-D RoPE.
  - Video input: 2 fps sampling, frames resized to <= 200704 pixels in multiples of 28, uint8 -> [0, 1] -> CLIP
    normalisation.
Module names are those of transformers' Qwen2-VL as VideoAlign saved them (`visual.*`, `model.layers.*`, `rm_head`), so
the merged checkpoint loads as a strict copy; the PEFT wrapper, the LoRA merge and newer transformers layouts are
handled in weights.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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
    reward_dim: int = 1  # rm_head's width, read from the checkpoint: 1 (one score per reward token) or 3 (diagonal)
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
        """-> (B, 3) fp32 raw [VQ, MQ, TA]: rm_head read at the three reward tokens; with width 3, score i is output i
        at reward token i (VideoAlign's diagonal)."""
        h = self.hidden_states(input_ids, pixel_values, grid_thw)
        pos = self.reward_positions(input_ids)  # (B, 3)
        r = self.rm_head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))  # (B, 3, reward_dim)
        r = r[..., 0] if self.cfg.reward_dim == 1 else r.diagonal(dim1=1, dim2=2)
        return r.float()

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, config=None, lora_alpha=None, norm=None):
        """Load VideoAlign's official `model.pth` (its LoRA merged on the fly, in fp32, cast once to `dtype`) or a
        `.safetensors` written by `python weights.py convert videoalign` (the normal path): strictly, one tensor at a
        time onto the meta-built model. dtype: a torch dtype, or None to keep the stored one. config: QwenVLConfig or
        preset name for a checkpoint that does not state its sizes (default qwen2-vl-2b; the rm_head width is always
        read from the file). norm: the score statistics the caller normalises with, refused if model_config.json's
        inference_config states others (reward.VideoAlignReward passes its REWARD_NORM)."""
        if isinstance(config, str):
            if config not in QWEN_PRESETS:
                raise ValueError(f"unknown config {config!r}; presets are {sorted(QWEN_PRESETS)}")
            config = QWEN_PRESETS[config]
        ckpt, cfg = weights.videoalign(path, QwenVLConfig, QWEN_PRESETS["qwen2-vl-2b"], config, lora_alpha,
                                       dtype=dtype, norm=norm)
        name = next((n for n, c in QWEN_PRESETS.items() if c == cfg), None)
        return weights.build(cls, cfg, ckpt, f"a VideoAlignModel ({f'preset {name!r}' if name else cfg})", dtype, device)


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
