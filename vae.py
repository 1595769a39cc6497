"""The Wan2.1 causal video VAE, written from scratch.

Pixels [B, 3, 1 + 4k, H, W] in [-1, 1] <-> latents [B, 16, 1 + k, H/8, W/8]: 8x spatial, 4x temporal, causal in time.
Every temporal convolution looks only at the past, so a video can be decoded chunk by chunk with a small
per-stream cache (the last 2 input frames of each temporal conv) and give exactly the whole-video result:
`vae.stream_decoder()` is what the streaming generator uses. The latents seen by the DiT are normalised,
z = (mu - mean) / std; `encode` returns and `decode` takes that normalised z.
Module names are those of Wan's `Wan2.1_VAE.pth`, so that file loads as a strict copy; the Diffusers layout
(`vae/diffusion_pytorch_model.safetensors`) is renamed in weights.py.

The toy world's VAE is the same network, smaller (VAE_PRESETS["toy"]): 16x16 frames -> 16 x 4 x 4 latents, each frame
coded alone (VAEConfig.frame_by_frame). `python vae.py train` trains it once; data/toy/vae.safetensors is the result.
"""

import json
import math
import os
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from config import cli, opt, train_command

# Per-channel statistics of Wan2.1 latent means: the DiT sees z = (mu - mean) / std.
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip

# ----------------------------------------------------------------------------- config


@dataclass
class VAEConfig:
    base_dim: int = 96  # channels of the first encoder stage / last decoder stage
    z_dim: int = 16  # latent channels
    dim_mult: list = field(default_factory=lambda: [1, 2, 4, 4])  # channels of stage i = base_dim * dim_mult[i]
    num_res_blocks: int = 2  # per encoder stage (the decoder has one more per stage)
    temporal_downsample: list = field(default_factory=lambda: [False, True, True])  # per encoder downsample
    latents_mean: list = field(default_factory=lambda: list(WAN21_LATENTS_MEAN))
    latents_std: list = field(default_factory=lambda: list(WAN21_LATENTS_STD))
    # code every frame alone, as Wan's VAE codes a video's first frame (the past of each temporal conv is zeros): an
    # image autoencoder applied frame by frame. Needs no temporal downsampling. The toy VAE's: trained on single frames,
    # it would meet a past it never saw in a video
    frame_by_frame: bool = False

    def __post_init__(self):
        self.dim_mult = [int(m) for m in self.dim_mult]
        self.temporal_downsample = [bool(t) for t in self.temporal_downsample]
        self.latents_mean = [float(v) for v in self.latents_mean]
        self.latents_std = [float(v) for v in self.latents_std]
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per downsample), "
                             f"got {self.temporal_downsample}")
        if self.frame_by_frame and any(self.temporal_downsample):
            raise ValueError("frame_by_frame codes frames alone: it takes no temporal_downsample")
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim={self.z_dim} entries, "
                             f"got {len(self.latents_mean)} / {len(self.latents_std)}")

    @property
    def temporal_stride(self):  # 4 for Wan2.1
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self):  # 8 for Wan2.1
        return 2 ** (len(self.dim_mult) - 1)


VAE_PRESETS = {
    "wan2.1": VAEConfig(),
    # CPU-sized; unequal multipliers so that shortcut convs and the decoder's channel halving are exercised
    "tiny": VAEConfig(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    # the toy world's (data/toyworld.py): 16x16 RGB frames -> 16 x 4 x 4 latents, each frame coded alone (the world's
    # frames are small; what the DiT needs is fewer, richer tokens). Its statistics are measured by train_toy_vae and
    # stored in the file's config.
    "toy": VAEConfig(base_dim=32, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temporal_downsample=[False, False],
                     latents_mean=[0.0] * 16, latents_std=[1.0] * 16, frame_by_frame=True),
}

# ----------------------------------------------------------------------------- causal cache


class CausalCache:
    """The state one video stream carries from one call to the next; owned by the caller.

    frames[m]: for a temporal conv m with kernel k, its last k - 1 input frames [B, C, k-1, H, W] (zeros before the
               video started); for a temporal Downsample, the last frame [B, C, 1, h, w] that reached its time_conv.
    started:   the temporal Upsample / Downsample modules that have already let the video's first frame through.
    Every entry has a fixed size, so the cache does not grow with the number of calls.
    """

    def __init__(self):
        self.frames = {}
        self.started = set()


class CausalConv3d(nn.Conv3d):
    """Conv3d, causal in time: the k_t - 1 frames before the input come from the cache (zeros at the start).

    Spatial padding is symmetric ("same"); no temporal padding ever comes from the future.
    """

    def __init__(self, in_dim, out_dim, kernel_size):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_dim, out_dim, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.past = kt - 1  # history frames needed: 2 for k_t = 3, 0 for 1x1x1 convs

    def forward(self, x, cache=None):
        # x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        if self.past:
            past = cache.frames.get(self) if cache is not None else None
            if past is None:  # start of the video: the past is zeros
                past = x.new_zeros(*x.shape[:2], self.past, *x.shape[3:])
            x = torch.cat([past, x], dim=2)  # [B, C_in, past + T, H, W]
            if cache is not None:
                cache.frames[self] = x[:, :, -self.past:].clone()  # clone: do not keep the whole input alive
        return super().forward(x)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma, over dim 1 (no eps-under-the-root, no bias, no mean removal)."""

    def __init__(self, dim, images=False):
        super().__init__()
        # gamma [C, 1, 1, 1] for video tensors [B, C, T, H, W]; [C, 1, 1] for image tensors [B, C, H, W]
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.scale = dim**0.5

    def forward(self, x):
        # normalise in fp32 when x is half precision; same shape out
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """RMS, SiLU, conv3, RMS, SiLU, (dropout), conv3, plus a 1x1x1 shortcut conv when the channels change."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        # indices 0, 2, 3, 6 hold the parameters, as in the checkpoint (index 5 was dropout, p = 0 in Wan)
        self.residual = nn.ModuleList([
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3),
        ])  # fmt: skip
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        # x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, with a residual."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):  # frames are independent: nothing to cache
        # x: [B, C, T, H, W] -> same
        B, C, T, H, W = x.shape
        h = x.transpose(1, 2).reshape(B * T, C, H, W)
        qkv = self.to_qkv(self.norm(h))  # [BT, 3C, H, W], channels ordered q | k | v
        q, k, v = qkv.reshape(B * T, 3, C, H * W).transpose(2, 3).unbind(1)  # each [BT, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)  # [BT, HW, C]
        h = self.proj(h.transpose(1, 2).reshape(B * T, C, H, W))  # [BT, C, H, W]
        return x + h.reshape(B, T, C, H, W).transpose(1, 2)


class Upsample(nn.Module):
    """2x spatial upsampling (nearest, then conv3x3 halving the channels); optionally 2x temporal.

    Temporal (time_conv): a causal (3,1,1) conv C -> 2C whose two halves become frames 2t and 2t+1. The video's very
    first frame skips it (1 frame in, 1 out); the frames after it go through time_conv as a fresh causal sequence.
    So T latent frames become 1 + 2(T - 1), whether they arrive all at once or one by one.
    """

    def __init__(self, dim, temporal):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        if temporal:
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1))
        self.temporal = temporal

    def forward(self, x, cache):
        # x: [B, C, T, H, W] -> [B, C/2, T', 2H, 2W]; T' = 2T (temporal), 2T - 1 (temporal, first call), T (spatial)
        B, C = x.shape[:2]
        if self.temporal:
            first = x[:, :, :0]
            if self not in cache.started:  # the video's first frame passes through unchanged
                cache.started.add(self)
                first, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] > 0:
                T, H, W = x.shape[2:]
                x = self.time_conv(x, cache).reshape(B, 2, C, T, H, W)  # [B, 2, C, T, H, W]
                x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)  # frame 2t <- half 0, 2t+1 <- half 1
            x = torch.cat([first, x], dim=2)
        T, H, W = x.shape[2:]
        x = self.resample(x.transpose(1, 2).reshape(B * T, C, H, W))  # per frame: [BT, C/2, 2H, 2W]
        return x.reshape(B, T, *x.shape[1:]).transpose(1, 2)


class Downsample(nn.Module):
    """2x spatial downsampling (zero-pad right/bottom, conv3x3 stride 2); optionally 2x temporal.

    Temporal (time_conv): a (3,1,1) conv with stride 2 and no padding. The video's first frame passes through alone
    and then serves as the history: output frames are y_0 = x_0, y_k = conv(x_{2k-2}, x_{2k-1}, x_{2k}). Every call
    after the first frame must bring an even number of frames (the encoder feeds 1, then groups of 4).
    """

    def __init__(self, dim, temporal):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.temporal = temporal

    def forward(self, x, cache):
        # x: [B, C, T, H, W] -> [B, C, T', H/2, W/2]; T' = T/2 (temporal), (T + 1)/2 (temporal, first call), T
        B, C, T, H, W = x.shape
        x = self.resample(x.transpose(1, 2).reshape(B * T, C, H, W))  # [BT, C, H/2, W/2]
        x = x.reshape(B, T, *x.shape[1:]).transpose(1, 2)  # [B, C, T, H/2, W/2]
        if not self.temporal:
            return x
        first = x[:, :, :0]
        if self not in cache.started:  # the video's first frame passes through and becomes the history
            cache.started.add(self)
            first, x = x[:, :, :1], x[:, :, 1:]
            cache.frames[self] = first.clone()
        if x.shape[2] % 2:
            raise ValueError(f"temporal downsampling needs an even number of frames after the first, got {x.shape[2]}")
        if x.shape[2] > 0:
            x = torch.cat([cache.frames[self], x], dim=2)  # [B, C, 1 + 2n, h, w]
            cache.frames[self] = x[:, :, -1:].clone()
            x = self.time_conv(x)  # [B, C, n, h, w]
        return torch.cat([first, x], dim=2)


# ----------------------------------------------------------------------------- encoder / decoder


def _middle(dim):
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim, out_dim):  # norm, SiLU, conv (indices 0 and 2 hold the parameters)
    return nn.ModuleList([RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3)])


class Encoder(nn.Module):
    """Pixels [B, 3, T, H, W] -> moments [B, 2 z_dim, T', H/8, W/8] (mu | logvar before the top-level conv1)."""

    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]  # e.g. 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Downsample(out_dim, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x, cache=None):
        # cache=None: x is a whole video; otherwise x continues the stream that `cache` belongs to
        cache = CausalCache() if cache is None else cache
        x = self.conv1(x, cache)  # [B, base_dim, T, H, W]
        for block in [*self.downsamples, *self.middle]:
            x = block(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class Decoder(nn.Module):
    """Latents (un-normalised, after the top-level conv2) [B, z_dim, T, h, w] -> pixels [B, 3, T', 8h, 8w]."""

    def __init__(self, cfg):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in [mult[-1], *mult[::-1]]]  # e.g. 384, 384, 384, 192, 96
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's Upsample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                blocks.append(Upsample(out_dim, temporal=temporal_upsample[i]))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x, cache=None):
        # cache=None: x is a whole video; otherwise x continues the stream that `cache` belongs to
        cache = CausalCache() if cache is None else cache
        x = self.conv1(x, cache)  # [B, C, T, h, w]
        for block in [*self.middle, *self.upsamples]:
            x = block(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


# ----------------------------------------------------------------------------- VAE


class WanVAE(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else VAEConfig()
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # "quant conv": encoder output -> mu | logvar
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # "post-quant conv": latent -> decoder input
        self.decoder = Decoder(cfg)

    def _stats(self, like):
        # per-channel mean, std as [1, z_dim, 1, 1, 1] on like's device and dtype
        mean = torch.tensor(self.cfg.latents_mean, device=like.device, dtype=like.dtype)
        std = torch.tensor(self.cfg.latents_std, device=like.device, dtype=like.dtype)
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    def encode(self, x):
        """Pixels [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latent means [B, z_dim, 1 + k, H/8, W/8]."""
        ts, ss = self.cfg.temporal_stride, self.cfg.spatial_stride
        B, C, T, H, W = x.shape
        if C != 3 or (T - 1) % ts or H % ss or W % ss:
            raise ValueError(
                f"encode expects [B, 3, 1 + {ts}k, H, W] with H, W multiples of {ss}; got {tuple(x.shape)}"
            )
        if self.cfg.frame_by_frame:  # every frame as a video's first: frames folded into the batch
            h = self.encoder(x.transpose(1, 2).reshape(B * T, C, 1, H, W), CausalCache())
            h = h.reshape(B, T, *h.shape[1:]).squeeze(3).transpose(1, 2)  # [B, 2 z_dim, T, H/ss, W/ss]
        else:  # the reference schedule: the first frame alone, then groups of 4 frames, through one cache
            cache = CausalCache()
            chunks = [x[:, :, :1]] + [x[:, :, t : t + ts] for t in range(1, T, ts)]
            h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # [B, 2 z_dim, 1 + k, H/8, W/8]
        mu = self.conv1(h)[:, : self.cfg.z_dim]  # the log-variance half is not needed
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(self, z, frames_per_pass=1):
        """Normalised latents [B, z_dim, F, h, w] -> pixels [B, 3, 1 + 4(F - 1), 8h, 8w] in [-1, 1]."""
        return self.stream_decoder(frames_per_pass)(z)

    def stream_decoder(self, frames_per_pass=1):
        """A fresh StreamDecoder: call it on consecutive latent chunks of one video."""
        return StreamDecoder(self, frames_per_pass)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, cfg=None):
        """Load Wan2.1_VAE.pth, a Diffusers vae/ folder, a .safetensors file, or a folder holding one of these.

        The config comes from Diffusers' config.json where there is one, else from the tensor shapes (`cfg`, if
        given, overrides both); the checkpoint must then match the model exactly.
        """
        ckpt, found = weights.vae(path, VAEConfig)
        cfg = cfg or found
        return weights.build(cls, cfg, ckpt, f"WanVAE({cfg})", dtype, device)


class StreamDecoder:
    """Decodes one video chunk by chunk: dec(z_chunk) -> the pixel frames of that chunk.

    z_chunk: normalised latents [B, z_dim, f, h, w], any f >= 1. The first call returns 1 + 4(f - 1) frames, later
    calls 4f; the concatenation equals vae.decode of the whole video. The decoder runs `frames_per_pass` latent frames
    at a time (1 = the reference algorithm, lowest memory); every choice gives the same result.
    Under autograd the cached frames keep their graph alive: decode long streams under no_grad / inference_mode.
    """

    def __init__(self, vae, frames_per_pass=1):
        if frames_per_pass < 1:
            raise ValueError(f"frames_per_pass must be >= 1, got {frames_per_pass}")
        self.vae, self.frames_per_pass = vae, frames_per_pass
        self.cache = CausalCache()

    def reset(self):
        """Forget the stream: the next call starts a new video."""
        self.cache = CausalCache()

    def __call__(self, z):
        vae = self.vae
        if z.dim() != 5 or z.shape[1] != vae.cfg.z_dim or z.shape[2] < 1:
            raise ValueError(f"expected latents [B, {vae.cfg.z_dim}, f >= 1, h, w], got {tuple(z.shape)}")
        mean, std = vae._stats(z)
        x = vae.conv2(z * std + mean)  # [B, z_dim, f, h, w]
        if vae.cfg.frame_by_frame:  # every frame alone (no cache): frames folded into the batch
            B, Z, f, h, w = x.shape
            y = vae.decoder(x.transpose(1, 2).reshape(B * f, Z, 1, h, w), CausalCache())
            return y.reshape(B, f, *y.shape[1:]).squeeze(3).transpose(1, 2).clamp(-1.0, 1.0)  # [B, 3, f, H, W]
        n = self.frames_per_pass
        out = [vae.decoder(x[:, :, i : i + n], self.cache) for i in range(0, x.shape[2], n)]
        return torch.cat(out, dim=2).clamp(-1.0, 1.0)  # [B, 3, (1 +) 4f (- 4), 8h, 8w]


# ----------------------------------------------------------------------------- a toy VAE, trained once


def train_toy_vae(out_path, steps=4000, seed=0, size=16, batch=64, lr=3e-4, noise=0.05, l2=1e-4, log=print):
    """Train VAE_PRESETS["toy"] on toy-world clips and write it to out_path (safetensors with its config, atomically;
    None: do not write). -> WanVAE.

    An autoencoder, not a variational one: the loss is the MSE of decode(mu + noise * n) against the clip, n ~ N(0, 1),
    plus l2 * mean(mu^2). The fixed latent noise makes the decoder tolerate the small errors a generator's latents
    carry; the L2 term keeps mu from growing until that noise no longer matters. A step sees `batch` frames, each of
    another clip: the toy VAE codes every frame alone (VAEConfig.frame_by_frame). Afterwards the per-channel mean and
    std of mu over 1024 frames become the config's latents_mean / latents_std: the DiT sees unit-variance latents.
    Deterministic for a seed on one thread."""
    from data import toyworld

    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = WanVAE(replace(VAE_PRESETS["toy"]))
    opt_ = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    world = 2000 + seed  # clips of a world no other stage trains or evaluates on
    Z = vae.cfg.z_dim
    T = 12  # the world's clips are rendered at this length; one random frame of each is kept

    def frames(n):  # (n, 3, 1, H, W): frame t_i of clip i
        idx = torch.randint(2**31 - 1, (n,), generator=g).tolist()
        at = torch.randint(T, (n,), generator=g).tolist()
        return torch.stack([toyworld.clip(i, T, size, seed=world)[0][:, t:t + 1] for i, t in zip(idx, at)])

    def mu_of(x):  # (B, 3, 1, H, W) -> (B, Z, 1, H/4, W/4), unnormalised
        return vae.conv1(vae.encoder(x, CausalCache()))[:, :Z]

    log(f"toy VAE: {sum(p.numel() for p in vae.parameters())} parameters, {steps} steps of {batch} frames, "
        f"{size}x{size}, world seed {world}")
    every, ema = max(1, steps // 20), None
    for step in range(1, steps + 1):
        for group in opt_.param_groups:  # linear warm-up over 100 steps, then cosine to 0
            group["lr"] = lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = frames(batch)
        mu = mu_of(x)
        y = vae.decoder(vae.conv2(mu + noise * torch.randn(mu.shape, generator=g)), CausalCache())
        rec = (y - x).pow(2).mean()
        loss = rec + l2 * mu.pow(2).mean()
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        opt_.step()
        ema = rec.item() if ema is None else 0.9 * ema + 0.1 * rec.item()
        if step % every == 0 or step == steps:
            log(f"step {step}/{steps}  reconstruction mse {ema:.5f}  {time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():  # the latent statistics, then a held-out reconstruction check through the public API
        mu = torch.cat([mu_of(frames(64)) for _ in range(16)])
        mean, std = mu.mean(dim=(0, 2, 3, 4)), mu.std(dim=(0, 2, 3, 4))
        vae.cfg = replace(vae.cfg, latents_mean=mean.tolist(), latents_std=std.tolist())
        x = torch.stack([toyworld.clip(i, T, size, seed=world + 1)[0] for i in range(64)])
        err = (vae.decode(vae.encode(x)) - x).pow(2).mean().item()
    log(f"latent std per channel {std.min():.3f} to {std.max():.3f}; held-out 12-frame clips reconstruct at mse "
        f"{err:.5f}")
    if out_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        meta = {"train": json.dumps({"steps": steps, "seed": seed, "size": size, "batch": batch, "lr": lr,
                                     "noise": noise, "l2": l2})}
        weights.save_safetensors(vae, out_path, meta=meta)
        log(f"wrote {out_path} ({os.path.getsize(out_path) / 2**20:.1f} MB) in {time.time() - t0:.0f}s")
    return vae


@dataclass
class ToyVAETrainConfig:
    out: str = opt(os.path.join("data", "toy", "vae.safetensors"), "where the toy VAE's weights go")
    steps: int = opt(4000, "training steps (each: 64 frames, each of another clip)")
    seed: int = opt(0, "initialisation and data seed (clips come from toy world 2000 + seed)")
    size: int = opt(16, "frame height and width in pixels (a multiple of 4, the toy VAE's stride)")
    threads: int = opt(2, "CPU threads (1: every run writes the same weights, bit for bit)")


def main(argv=None):
    """python vae.py train [--key=value ...]: train the toy world's VAE once (its result is shipped)."""
    cfg = train_command(ToyVAETrainConfig(), argv, main.__doc__, "vae.py")
    if cfg is None:
        return
    if cfg.steps < 1 or cfg.size < 12 or cfg.size % 4 or cfg.threads < 1:
        raise SystemExit(f"--steps={cfg.steps} --size={cfg.size} --threads={cfg.threads}: steps >= 1, size a multiple "
                         "of 4 and >= 12, threads >= 1")
    torch.set_num_threads(cfg.threads)
    train_toy_vae(cfg.out, steps=cfg.steps, seed=cfg.seed, size=cfg.size)


if __name__ == "__main__":
    cli(main)
