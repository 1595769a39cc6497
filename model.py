"""
The Wan2.1 text-to-video diffusion transformer (DiT), written from scratch.

One network class serves every use in this repository:
  - bidirectional (the teacher, and plain Wan2.1 inference): model(x, t, ctx)
  - chunk-causal over a whole sequence (ODE initialisation, teacher-forced checks):
        model(x, t, ctx, chunk_frames=3, window_frames=9, sink_frames=3)
  - streaming, one chunk at a time against a KV cache (sink.py): model(x, t, cache=cache)

Module names are Wan's checkpoint parameter names, so loading the original
`diffusion_pytorch_model.safetensors` is a strict copy; every other layout (Diffusers, the Self /
Reward Forcing .pt, ComfyUI prefixes) is renamed in weights.py, which also converts them:

    python weights.py convert dit SRC DST.safetensors
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import weights
from sink import Window

# -----------------------------------------------------------------------------
# config


@dataclass
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256  # sinusoidal time-embedding width
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512  # context is zero-padded to this many rows (and they are NOT masked)
    in_dim: int = 16  # latent channels
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)  # (t, h, w)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_max_len: int = 1024  # largest RoPE position per axis

    @property
    def head_dim(self):
        return self.dim // self.num_heads


PRESETS = {
    "wan2.1-t2v-1.3b": WanConfig(),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # CPU-sized: 4 heads of 16 channels, so the 3D RoPE split (8/4/4) is non-trivial
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, text_len=16),
    # the toy world's models (config/toy.py): the toy VAE's 16 x 4 x 4 latents of a 16x16 frame, one token per latent
    # pixel (16 tokens per frame: a CPU trains it in minutes), one 96-channel head (RoPE split 32/32/32: 16 frequencies
    # per axis; 4 heads of 24 left 4 per axis, two of them ~0 over a 4 x 4 token grid, and learned slower)
    "toy": WanConfig(dim=96, ffn_dim=256, num_heads=1, num_layers=4, freq_dim=64, text_dim=64, text_len=24, in_dim=16,
                     out_dim=16, patch_size=(1, 1, 1)),
    # the same network on RGB pixels, 4x4 patches (the toy world before it had a VAE; no --vae)
    "toy-pixels": WanConfig(dim=96, ffn_dim=256, num_heads=1, num_layers=4, freq_dim=64, text_dim=64, text_len=24,
                            in_dim=3, out_dim=3, patch_size=(1, 4, 4)),
}

# -----------------------------------------------------------------------------
# helpers


def sinusoidal_embedding(t, dim):
    """t (...) in [0, 1000] -> (..., dim) as [cos(t w), sin(t w)], w_j = 10000^(-j / (dim/2)). fp64 like Wan."""
    half = dim // 2
    w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    a = t.to(torch.float64)[..., None] * w
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def rope_split(head_dim):
    """Channels of one head given to the (t, h, w) axes: e.g. 128 -> (44, 42, 42)."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_tables(head_dim, max_len, device=None):
    """cos, sin tables (max_len, head_dim/2) in fp32 from fp64 angles: column block j holds the
    frequencies of axis j (t, h, w), each axis with its own 1 / 10000^(2k / axis_dim)."""
    pos = torch.arange(max_len, dtype=torch.float64, device=device)
    freqs = [1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d) for d in rope_split(head_dim)]
    a = pos[:, None] * torch.cat(freqs)[None]  # (max_len, head_dim/2)
    return torch.cos(a).float(), torch.sin(a).float()


def apply_rope(x, cos, sin):
    """Rotate adjacent channel pairs (x[2k], x[2k+1]) as complex numbers.
    x (B, L, H, D); cos, sin (L, D/2) fp32. Computed in fp32, returned in x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    c, s = cos[:, None], sin[:, None]  # (L, 1, D/2)
    # written into the pair slots: torch.stack(..., dim=-1) copies element by element on CPU, ~1.7x slower (1 thread)
    out = x.new_empty(x.shape, dtype=torch.float32).unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.flatten(-2).type_as(x)


def layer_norm(x, eps):
    """LayerNorm without affine, in fp32 (every LN of the block except norm3)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def modulate(x, shift, scale):
    # x (B, F, T, D) fp32; shift, scale (B, F, 1, D) fp32
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift in one pass


# kept in fp32 whatever the load dtype: the time path and the modulation tables (as in Wan)
FP32_PARAMS = re.compile(r"^(time_embedding|time_projection)\.|modulation$")


def param_dtype(name, tensor, dtype):
    if dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if FP32_PARAMS.search(name) else dtype


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class LayerNorm(nn.Module):
    """The affine LayerNorm before cross-attention (Wan's `norm3`), computed in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)


def linear(mod, x):
    """nn.Linear applied in the weight's dtype (the residual stream stays fp32)."""
    return mod(x.to(mod.weight.dtype))


# -----------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """Projections shared by self- and cross-attention: q, k, v, o and the RMS norms of q and k (over the full width)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q = RMSNorm(D, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(D, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(Attention):
    def forward(self, x, rope, layer, cache=None, chunks=None):
        """x (B, L, D). rope = (cos_q, sin_q, cos_k, sin_k), each (L_q or L_k, head_dim/2).
        cache: streaming state (sink.py): the chunk's un-roped K/V go in, the window's K/V come out.
        chunks: (tokens_per_frame, chunk_frames, window_frames, sink_frames) for chunk-causal attention."""
        H = self.num_heads
        q = self.norm_q(linear(self.q, x)).unflatten(-1, (H, -1))  # (B, L, H, Dh)
        k = self.norm_k(linear(self.k, x)).unflatten(-1, (H, -1))
        v = linear(self.v, x).unflatten(-1, (H, -1))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_keys, H, Dh): sink + window, current chunk included
        cos_q, sin_q, cos_k, sin_k = rope
        q = apply_rope(q, cos_q, sin_q).transpose(1, 2)  # (B, H, L, Dh)
        k = apply_rope(k, cos_k, sin_k).transpose(1, 2)
        v = v.transpose(1, 2)
        if chunks is None:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = chunk_causal_attention(q, k, v, *chunks)
        return linear(self.o, y.transpose(1, 2).flatten(2))  # (B, L, D)


def chunk_keys(e, window_frames, sink_frames):
    """Key frames seen by the chunk that ends (exclusive) at frame e: the sink frames [0, S) and the
    window's latest frames [lo, e), lo = max(S, e - (W - S)); everything before e when W is None.
    Returns a list of (start, end) frame spans. The same rule as the streaming cache in sink.py."""
    S = sink_frames
    if window_frames is None:
        return [(0, e)]
    lo = max(S, e - (window_frames - S))
    return [(0, e)] if lo <= S else [(0, S), (lo, e)]


def chunk_causal_attention(q, k, v, T, C, W, S):
    """Chunk-causal attention over a whole sequence: each chunk of C frames attends to itself, the
    S sink frames and the earlier frames inside the W-frame window (W None: every earlier frame).
    Equal to one SDPA call with the block mask, but done one query chunk at a time so that no
    (L, L) mask is materialised (21 frames at 832x480 would be a 1 GB mask) and every call can use
    a dense, mask-free kernel. q, k, v (B, H, L, Dh) with roped q, k; T tokens per frame."""
    nf = q.shape[2] // T
    out = []
    for s in range(0, nf, C):
        e = min(s + C, nf)
        spans = chunk_keys(e, W, S)
        kc = torch.cat([k[:, :, a * T : b * T] for a, b in spans], dim=2)
        vc = torch.cat([v[:, :, a * T : b * T] for a, b in spans], dim=2)
        out.append(F.scaled_dot_product_attention(q[:, :, s * T : e * T], kc, vc))
    return torch.cat(out, dim=2)


class CrossAttention(Attention):
    def kv(self, ctx):
        """ctx (B, text_len, D) -> K, V (B, text_len, H, Dh). Cached per prompt when streaming."""
        k = self.norm_k(linear(self.k, ctx)).unflatten(-1, (self.num_heads, -1))
        v = linear(self.v, ctx).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x, k, v):
        q = self.norm_q(linear(self.q, x)).unflatten(-1, (self.num_heads, -1))
        # no RoPE and no mask: the zero-padded text rows are attended to, as in Wan
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return linear(self.o, y.transpose(1, 2).flatten(2))


# -----------------------------------------------------------------------------
# block


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e0, ctx, ctx_kv, rope, layer, cache=None, chunks=None):
        """x (B, F, T, D) fp32 residual stream; e0 (B, F, 6, D) fp32 per-frame time projection;
        ctx (B, text_len, D) embedded text, or ctx_kv = this layer's cached cross-attention K, V (B, text_len, H, Dh).
        The K/V are computed here, inside the block, so that FSDP's per-block sharding sees its own parameters."""
        B, nF, T, D = x.shape
        mod = (self.modulation.float() + e0).unsqueeze(3)  # (B, F, 6, 1, D)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(2)  # (B, F, 1, D) each
        h = modulate(layer_norm(x, self.eps), shift_a, scale_a).flatten(1, 2)  # (B, F*T, D)
        # x + gate * y in one pass (addcmul), here and for the FFN
        x = torch.addcmul(x, gate_a, self.self_attn(h, rope, layer, cache, chunks).float().view(B, nF, T, D))
        h = self.norm3(x).flatten(1, 2)
        if ctx_kv is None:  # projected only now, so the K/V are not held through self-attention
            ctx_kv = self.cross_attn.kv(ctx)
        x = x + self.cross_attn(h, *ctx_kv).float().view(B, nF, T, D)
        h = modulate(layer_norm(x, self.eps), shift_f, scale_f)
        x = torch.addcmul(x, gate_f, self.ffn(h.to(self.ffn[0].weight.dtype)).float())
        if isinstance(cache, Window):  # training: the chunk's new K/V leave as outputs, so that a gradient reaching
            k, v = cache.new  # them from later chunks passes this block's backward hooks (FSDP unshards there);
            cache.new = None  # not kept on the Window: a checkpoint's argument holding its own outputs is a cycle
            return x, k, v
        return x


class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        # x (B, F, T, D) fp32; e (B, F, D) fp32: the time embedding BEFORE time_projection
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unsqueeze(3).unbind(2)  # (B, F, 1, D)
        return linear(self.head, modulate(layer_norm(x, self.eps), shift, scale))


# -----------------------------------------------------------------------------
# model


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        self.trained_with = None  # from_pretrained: the train.py settings stored in the checkpoint, if any
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.grad_ckpt = False  # recompute each block in backward (streaming too, through a training cache)
        self.init_rope()

    def init_weights(self):
        """Wan's initialisation for training from scratch (the toy teacher): xavier-uniform linears with zero biases,
        the patch embedding likewise, N(0, 0.02) text and time embedders, and a zero output head, so every block
        starts as a small perturbation and the first prediction is 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        return self

    def init_rope(self, device=None):
        """(Re)build the RoPE tables; non-persistent, so they are rebuilt after a meta-device load."""
        device = device if device is not None else self.patch_embedding.weight.device
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.rope_max_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope(self, fpos, h, w):
        """cos, sin (len(fpos) * h * w, head_dim / 2) for tokens ordered (f, h, w), w fastest;
        fpos (F,) long holds each frame's RoPE position (sink.py renumbers frames inside its window)."""
        dt, dh, _ = (d // 2 for d in rope_split(self.cfg.head_dim))
        nf = fpos.shape[0]

        def grid(tab):
            tf = tab[fpos, :dt].view(nf, 1, 1, -1).expand(nf, h, w, -1)
            th = tab[:h, dt : dt + dh].view(1, h, 1, -1).expand(nf, h, w, -1)
            tw = tab[:w, dt + dh :].view(1, 1, w, -1).expand(nf, h, w, -1)
            return torch.cat([tf, th, tw], dim=-1).flatten(0, 2)

        return grid(self.rope_cos), grid(self.rope_sin)

    def embed_text(self, context):
        """context (B, L <= text_len, text_dim) -> (B, text_len, D); zero-padded to text_len first."""
        B, L, _ = context.shape
        if L > self.cfg.text_len:
            raise ValueError(f"context has {L} rows; the model takes at most text_len={self.cfg.text_len}")
        context = F.pad(context, (0, 0, 0, self.cfg.text_len - L))
        return linear(self.text_embedding[2], self.text_embedding[1](linear(self.text_embedding[0], context)))

    def cross_kv(self, context):
        """Every layer's cross-attention K and V of a prompt: two tensors (layers, B, text_len, H, Dh).
        Computed once per prompt when streaming (sink.py keeps them in its cache)."""
        ctx = self.embed_text(context)
        kv = [blk.cross_attn.kv(ctx) for blk in self.blocks]
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])

    def time_embed(self, t):
        """t (B, F) -> e (B, F, D), e0 (B, F, 6, D), both fp32 (Wan runs the time path in fp32)."""
        lin0, lin2 = self.time_embedding[0], self.time_embedding[2]
        s = sinusoidal_embedding(t, self.cfg.freq_dim).float()
        e = F.linear(F.silu(F.linear(s, lin0.weight.float(), lin0.bias.float())), lin2.weight.float(), lin2.bias.float())
        p = self.time_projection[1]
        e0 = F.linear(F.silu(e), p.weight.float(), p.bias.float())
        return e, e0.unflatten(-1, (6, -1))

    def forward(self, x, t, context=None, *, cache=None, chunk_frames=None, window_frames=None, sink_frames=0):
        """Flow velocity v ~ noise - x0.

        x (B, in_dim, F, H, W) latents; t (B,) or (B, F) timesteps in [0, 1000] (per frame for
        chunk-wise training); context (B, L <= text_len, text_dim) umT5 states, zero-padded inside.
        Streaming (sink.py): `cache` supplies the window's K/V, the RoPE frame positions, and (when
        context is None) the prompt's cached cross-attention K/V.
        Chunk-causal: chunk_frames set -> each chunk of that many latent frames sees itself, the first
        `sink_frames` frames and the frames inside `window_frames` (None: all earlier frames).
        Returns (B, out_dim, F, H, W)."""
        cfg = self.cfg
        B, _, nF, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = nF // pt, H // ph, W // pw
        T = h * w  # tokens per latent frame

        # 1. patchify: (B, C, F, H, W) -> (B, f, T, D), tokens ordered (f, h, w), w fastest. Made contiguous: left as
        # the conv's channels-first view, every residual add would keep that layout and every LayerNorm copy it
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # (B, D, f, h, w)
        x = x.flatten(3).permute(0, 2, 3, 1).contiguous().float()

        # 2. time: per-frame embeddings, so chunks can sit at different noise levels
        if t.dim() == 1:
            t = t[:, None].expand(B, f)
        elif t.shape != (B, nF):
            raise ValueError(f"t must be (B,) or (B, F) = ({B}, {nF}); got {tuple(t.shape)}")
        else:
            t = t[:, ::pt]
        e, e0 = self.time_embed(t)  # (B, f, D), (B, f, 6, D)

        # 3. text: embedded here (each block projects its own K/V), or the streaming cache's K/V per layer
        if context is not None:
            ctx, kvs = self.embed_text(context), [None] * len(self.blocks)
        elif cache is not None:
            ctx, kvs = None, [(cache.ctx_k[i], cache.ctx_v[i]) for i in range(len(self.blocks))]
        else:
            raise ValueError("forward needs a context, or a cache holding a prompt's cross-attention K/V")

        # 4. RoPE positions: absolute frame indices, or the cache's renumbered window positions
        if cache is None:
            cos, sin = self.rope(torch.arange(f, device=x.device), h, w)
            rope = (cos, sin, cos, sin)
        else:
            rope = self.rope(cache.q_fpos, h, w) + self.rope(cache.k_fpos[: cache.n_frames], h, w)
        chunks = None
        if chunk_frames is not None:
            chunks = (T, chunk_frames // pt, None if window_frames is None else window_frames // pt, sink_frames // pt)

        # checkpointing recomputes each block in backward: a streaming call may be recomputed after later chunks
        # changed the cache, so it reads the frozen Window of a training cache (sink.py), never a sampling buffer
        ckpt = self.grad_ckpt and torch.is_grad_enabled() and (cache is None or cache.grad is not None)
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache.window(i)  # what layer i reads from the cache, and writes
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(block, x, e0, ctx, kvs[i], rope, i, kv, chunks, use_reentrant=False)
            else:
                x = block(x, e0, ctx, kvs[i], rope, i, kv, chunks)
            if isinstance(kv, Window):
                x, k, v = x
                cache.commit(i, k, v)

        # 5. head + unpatchify: channel index ((pt*ph + h)*pw + w)*out_dim + c, c fastest
        y = self.head(x, e).float()  # (B, f, T, pt*ph*pw*out)
        y = y.view(B, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(B, cfg.out_dim, f * pt, h * ph, w * pw)

    # -------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, key=None, num_heads=None):
        """Load any DiT checkpoint layout weights.py accepts (Wan2.1 or Diffusers folders, safetensors, the Self /
        Reward Forcing .pt, train.py checkpoint folders), strictly, one tensor at a time on the meta-built model.
        dtype: cast the weights (the time embedding and modulation stay fp32, as in Wan).
        key: which network of a training checkpoint ('generator_ema' by default when present)."""
        ckpt, cfg = weights.dit(path, WanConfig, key=key, num_heads=num_heads)
        model = weights.build(cls, cfg, ckpt, f"a WanModel with {cfg}", lambda k, t: param_dtype(k, t, dtype), device)
        model.init_rope(device=model.patch_embedding.weight.device)
        model.trained_with = weights.trained_with(ckpt)  # train.py's settings, if it wrote the file
        return model

