"""umT5-XXL text encoder (encoder half only) and its tokenizer, as Wan2.1 uses them.

Prompts are cleaned, tokenized (EOS appended, padded to 512), run through the encoder, and every row past a
prompt's real length is zeroed: the result [B, 512, 4096] is the DiT's cross-attention context.
Module names follow Wan's `models_t5_umt5-xxl-enc-bf16.pth`, so that file loads as a strict copy; the
Hugging Face UMT5EncoderModel layout (Diffusers `text_encoder/`) is renamed in weights.py.
"""

import html
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights

# Wan's default negative prompt.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
PAD_ID, EOS_ID = 0, 1


@dataclass
class T5Config:  # umT5-XXL's encoder; small ones for toy worlds and tests come from tiny_text_encoder
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096  # num_heads * head_dim
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512


# ----------------------------------------------------------------------------- model


def relative_bucket(rel, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of rel = k_pos - q_pos (long tensor) -> long tensor in [0, num_buckets)."""
    half = num_buckets // 2  # keys after the query (rel > 0) use buckets half..num_buckets-1
    exact = half // 2  # distances 0..exact-1 each get their own bucket
    n = rel.abs()
    # log-spaced buckets for exact <= n < max_distance (n clamped so log(0) is never taken; those n use `n`)
    ratio = torch.log(n.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = (exact + (ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(n < exact, n, far)


class RMSNorm(nn.Module):
    """T5 layer norm: weight only, no mean subtraction, variance in fp32, cast back to the input dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., dim)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class RelativeBias(nn.Module):
    """Per-layer learned bias for each (bucket, head)."""

    def __init__(self, num_buckets, num_heads):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets):  # (L, L) long -> (1, H, L, L)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim, dim_attn, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, bias):  # x (B, L, dim), bias (B, H, L, L) additive
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, L, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, d); T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))  # (B, L, dim)


class FeedForward(nn.Module):
    """Gated FFN: fc2(fc1(h) * gelu_tanh(gate(h)))."""

    def __init__(self, dim, dim_ffn):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):  # (B, L, dim)
        return self.fc2(self.fc1(x) * self.gate(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativeBias(cfg.num_buckets, cfg.num_heads)  # umT5: one table per layer

    def forward(self, x, buckets, key_bias):  # x (B, L, dim), buckets (L, L), key_bias (B, 1, 1, L)
        bias = self.pos_embedding(buckets).to(x.dtype) + key_bias  # (B, H, L, L)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids, mask=None):  # ids (B, L) long, mask (B, L) 1 = real token -> (B, L, dim)
        B, L = ids.shape
        x = self.token_embedding(ids)  # (B, L, dim)
        pos = torch.arange(L, device=ids.device)
        buckets = relative_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)  # (L, L)
        key_bias = torch.zeros(B, 1, 1, L, dtype=x.dtype, device=x.device)  # (B, 1, 1, L)
        if mask is not None:  # padded keys get the most negative finite value (never -inf: no NaN rows)
            key_bias = key_bias.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(x.dtype).min)
        for block in self.blocks:
            x = block(x, buckets, key_bias)
        return self.norm(x)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Strictly load a Diffusers text_encoder/ folder, Wan's .pth, or a folder holding either (weights.t5), one
        tensor at a time onto the meta-built encoder, cast to `dtype` (None: as stored) and moved to `device`."""
        ckpt, cfg = weights.t5(path, T5Config)
        return weights.build(cls, cfg, ckpt, f"T5Encoder({cfg})", dtype, device)


# ----------------------------------------------------------------------------- tokenizer and context


def clean_prompt(text):
    """html-unescape twice, collapse whitespace, strip (Wan also runs ftfy.fix_text; we do not)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class Tokenizer:
    """umT5 tokenizer.json -> fixed-length ids: tokens + EOS(1), truncated to text_len with EOS last, padded with 0."""

    def __init__(self, path, text_len=512):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(path))
        self.tok.no_padding()  # we pad and truncate ourselves
        self.tok.no_truncation()
        self.tok.post_processor = None  # no template-added specials: we append EOS ourselves
        self.text_len = text_len
        for token, want in (("<pad>", PAD_ID), ("</s>", EOS_ID)):
            got = self.tok.token_to_id(token)
            if got is not None and got != want:
                raise ValueError(f"{path}: {token} has id {got}, expected {want}")

    @classmethod
    def from_words(cls, words, text_len=512, lowercase=False):
        """A word-level tokenizer over `words` (ids: <pad> 0, </s> 1, <unk> 2, then the words in order), for toy
        worlds and tests where a tiny random encoder stands in for umT5. lowercase: lower-case the input first."""
        import tempfile

        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, normalizers, pre_tokenizers

        vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": 2}
        for w in words:
            vocab.setdefault(w, len(vocab))
        tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        with tempfile.TemporaryDirectory() as d:
            tok.save(f"{d}/tokenizer.json")
            return cls(f"{d}/tokenizer.json", text_len)

    def unknown_words(self, text):
        """The words of `text` a word-level vocabulary (the toy world's) does not hold, which would all read as one
        <unk> token; [] for subword tokenizers such as umT5's, which spell out any word."""
        if type(self.tok.model).__name__ != "WordLevel":
            return []
        unk = self.tok.token_to_id("<unk>")
        text = clean_prompt(text)
        enc = self.tok.encode(text, add_special_tokens=False)
        return [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == unk]

    def save(self, path):
        """Write the tokenizer.json this Tokenizer reads (special-token handling is ours, not the file's)."""
        self.tok.save(str(path))

    def __call__(self, prompts):  # list[str] -> ids (B, text_len) long, mask (B, text_len) long
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.text_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        encs = self.tok.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=False)
        for i, enc in enumerate(encs):
            toks = enc.ids
            if len(toks) + 1 > self.text_len:
                warnings.warn(f"prompt {i} has {len(toks)} tokens + EOS, more than text_len={self.text_len}: "
                              f"truncated to {self.text_len - 1} tokens + EOS")
                toks = toks[: self.text_len - 1]
            toks = list(toks) + [EOS_ID]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = 1
        return ids, mask


def tiny_text_encoder(words, dim, text_len, seed=0, lowercase=False):
    """The one builder of the small stand-in for umT5 used by toy worlds and tests: a word-level tokenizer over
    `words` and a randomly initialised (seeded, frozen) 2-layer T5Encoder of width `dim` with 4 heads. The toy world
    writes one to data/toy/ (data/prepare_toy.py); train.py builds one when no --text_encoder is given."""
    tok = Tokenizer.from_words(words, text_len=text_len, lowercase=lowercase)
    cfg = T5Config(vocab=tok.tok.get_vocab_size(), dim=dim, dim_attn=dim, dim_ffn=2 * dim,
                   num_heads=4 if dim % 4 == 0 else 1, num_layers=2, text_len=text_len)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
        torch.manual_seed(seed)
        enc = T5Encoder(cfg)
    return TextEncoder(tok, enc).eval()


class TextEncoder(nn.Module):
    """Prompts -> DiT context (B, text_len, dim): encoder output with rows past each prompt's length set to 0."""

    def __init__(self, tokenizer: Tokenizer, encoder: T5Encoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.requires_grad_(False)

    @torch.no_grad()
    def encode(self, ids, mask):  # ids, mask (B, L) -> (B, L, dim), rows with mask == 0 exactly zero
        dev = self.encoder.token_embedding.weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        hidden = self.encoder(ids, mask)  # (B, L, dim)
        return hidden.masked_fill(~mask.bool()[..., None], 0.0)  # = cut to length, zero-pad back

    def forward(self, prompts):  # list[str] -> (B, text_len, dim)
        return self.encode(*self.tokenizer(prompts))

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, text_len=512):
        """folder: a Wan2.1 root (google/umt5-xxl/tokenizer.json + .pth) or a Diffusers root (tokenizer/, text_encoder/)."""
        folder = Path(folder)
        tok, enc = weights.wan_file(folder, "tokenizer"), weights.wan_file(folder, "umT5 text encoder")
        lost = [w for w, f in (("tokenizer.json (tokenizer/ or google/umt5-xxl/)", tok),
                               (f"encoder weights (text_encoder/ or {weights.WAN_T5_FILE})", enc)) if f is None]
        if lost:
            raise FileNotFoundError(f"{folder}: missing {' and '.join(lost)}; download them from {weights.WAN_WHERE}")
        return cls(Tokenizer(tok, text_len), T5Encoder.from_pretrained(enc, dtype=dtype, device=device))

    def save(self, folder):
        """Write tokenizer.json and text_encoder/ (config.json with Diffusers' umT5 names + model.safetensors): the
        layout from_pretrained reads back (data/prepare_toy.py writes the toy world's encoder this way)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(folder / "tokenizer.json")
        enc, c = self.encoder, self.encoder.cfg
        save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, folder / "text_encoder" / "model.safetensors")
        hf = {"vocab_size": c.vocab, "d_model": c.dim, "d_kv": c.dim_attn // c.num_heads, "d_ff": c.dim_ffn,
              "num_heads": c.num_heads, "num_layers": c.num_layers, "relative_attention_num_buckets": c.num_buckets,
              "relative_attention_max_distance": c.max_distance, "layer_norm_epsilon": c.eps}
        (folder / "text_encoder" / "config.json").write_text(json.dumps(hf, indent=1))
