"""
The speed protocol: what streaming costs, measured in one process, interleaved and repeated; and what training
holds in memory.

    python bench.py                 # on an accelerator: the 1.3B student at 832x480 with the Wan VAE; on CPU: 'mid'
    python bench.py --quick=true    # tiny sizes, a few repeats, aot_eager compile: the test suite runs this (CPU)
    python bench.py --scale=full --legs=eager
    python bench.py --memory_only=true   # section 5 alone, about a minute on a CPU

1. FLOPs: one steady-state chunk of the 1.3B DiT at 832x480 (9-frame window, 4 denoising steps + the cache pass)
   and one Wan VAE chunk decode, counted by torch.utils.flop_counter.FlopCounterMode on the meta device (no memory,
   no weights), checked within 1% against the published counts (PUBLISHED_TF below) and turned into a projected
   H100 FPS at a stated efficiency.
2. Timed sessions: a session = a fresh cache + stream decoder, `chunks` chunks of streaming (rollout + decode +
   pixels to the host). Legs (eager, compiled) alternate within each repeat, the order flipping every repeat;
   repeat 0 is warm-up (compile, allocator, kernel selection) and is dropped. Within a session the chunks before the
   window is full are dropped too (they have other shapes). Reported: median and quartiles of per-chunk DiT, VAE
   and end-to-end ms, FPS = pixel frames / seconds, and the first-chunk latency of a fresh session.
3. A long session of `long_chunks` (>= 60) chunks: per-chunk ms and process RSS after every chunk (flat once the
   window is full), and the torch.compile recompiles after warm-up (0 expected).
4. Our DiT forward against diffusers' WanTransformer3DModel on one mid-size config with copied weights (written
   by save_pretrained, read by WanModel.from_pretrained): median time ratio ours / diffusers, and the output error
   for information (parity itself is tests/test_model.py's job).
5. Training memory, on the meta device (no memory, no weights): the bytes autograd keeps for backward of one
   training rollout of the 1.3B student (21 latent frames at 832x480, batch 1, bf16), with and without gradient
   checkpointing, for each --cache_grad; the critic step's; and a per-GPU table of the README's FSDP recipe:
   parameters, gradients, optimizer moments, frozen networks, activations and caches (fsdp_memory).
The last line of output is one JSON object with every number.
"""

import gc
import json
import math
import re
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tc

from config import cli, configure, opt, pick_device, pick_dtype
from model import PRESETS, WanConfig, WanModel, param_dtype
from sample import peak_rss_mb, rss_mb, sync, to_uint8
from sink import SinkCache, rollout
from vae import VAE_PRESETS, WanVAE

# The published FLOP counts, in TFLOPs, of Wan2.1-T2V-1.3B at 832x480 with 3-frame chunks and a 9-frame window:
# per DiT forward 11.70 linear + 1.346 per attended frame of self-attention + 0.44 cross-attention = 24.3; a chunk
# is 5 forwards (4 denoising steps + the cache pass) = 121.0, i.e. 10.1 per output pixel frame (12 per chunk);
# the Wan VAE decode costs 3.39 per pixel frame.
PUBLISHED_TF = dict(linear_per_forward=11.70, self_attn_per_frame=1.346, cross_per_forward=0.44,
                    per_forward=24.3, per_chunk=121.0, per_output_frame=10.1, vae_per_frame=3.39)
H100_BF16_TFLOPS = 989.0  # dense peak

# mid size: CPU-feasible, heads of 128 channels like Wan (RoPE split 44/42/42), the diffusers comparison's config
MID = WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, freq_dim=256, text_dim=256)
SCALES = {  # DiT config, VAE preset, pixel height, width
    "full": (PRESETS["wan2.1-t2v-1.3b"], "wan2.1", 480, 832),
    "mid": (MID, "tiny", 128, 128),
    "tiny": (PRESETS["tiny"], "tiny", 32, 32),
}


@dataclass
class BenchConfig:
    quick: bool = opt(False, "tiny sizes, few repeats, aot_eager compile (the test suite's run)")
    scale: str = opt("auto", "timed model: full (1.3B, 832x480, Wan VAE) | mid (dim 256, 4 layers, 128x128, tiny VAE) "
                             "| tiny | auto (full on an accelerator, mid on CPU, tiny with --quick)")
    device: str = opt("auto", "cpu, cuda, ... | auto (the current accelerator, else cpu)")
    dtype: str = opt("auto", "float32 | bfloat16 | float16 | auto (bf16 on an accelerator, fp32 on CPU)")
    chunks: int = opt(0, "chunks per timed session (0: 8, or 5 with --quick)")
    repeats: int = opt(0, "timed repeats per leg after the warm-up repeat (0: 5, or 2 with --quick)")
    long_chunks: int = opt(64, "chunks of the long session (per-chunk ms and RSS)")
    legs: str = opt("both", "timed legs: both (eager and torch.compile'd) | eager | compiled")
    compile_backend: str = opt("auto", "torch.compile backend of the compiled leg (auto: inductor, or aot_eager with "
                                       "--quick)")
    efficiency: float = opt(0.55, "fraction of the H100's bf16 peak assumed for the projected FPS")
    diffusers: bool = opt(True, "time our DiT against diffusers' WanTransformer3DModel (needs diffusers)")
    memory: bool = opt(True, "count the 1.3B's training memory on the meta device, about a minute (not with --quick: "
                             "the tests count it themselves)")
    memory_only: bool = opt(False, "only that count (section 5)")
    world: int = opt(8, "GPUs of the FSDP recipe in the per-GPU memory table")
    diffusers_repeats: int = opt(0, "timed forward pairs of that comparison (0: 10, or 4 with --quick)")
    seed: int = opt(0, "seed of the random weights, prompt and noise")
    threads: int = opt(0, "CPU threads for torch (0: torch's default); 1 is steadier on a shared machine, where "
                          "spinning OpenMP threads collapse")


def log(*a):
    print(*a, flush=True)


def summary(xs):
    """median and quartiles of a list of numbers."""
    if not xs:
        return None
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return dict(median=round(statistics.median(xs), 3), p25=round(q[0], 3), p75=round(q[2], 3), n=len(xs))


# ----------------------------------------------------------------------------- 1. FLOPs on the meta device


def cast_like_wan(model, dtype):
    """Cast a freshly built WanModel as from_pretrained does: the time path and the modulation tables stay fp32."""
    for name, p in model.named_parameters():
        p.data = p.data.to(param_dtype(name, p.data, dtype))
    return model


def count_flops_1p3b():
    """FLOPs of one steady-state chunk of the 1.3B DiT at 832x480 and one Wan VAE chunk decode, on the meta device.

    On meta, F.scaled_dot_product_attention runs its math decomposition, so FlopCounterMode sees the two bmm of every
    attention call. That is checked here against the closed form 4 * Lq * Lk * dim per layer; if a torch version
    counted nothing for SDPA, the closed form would be used instead (and the result says so)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = PRESETS["wan2.1-t2v-1.3b"]
    h, w, C, window = 60, 104, 3, 9  # latent 832x480, the paper's chunk and window
    with torch.device("meta"):
        model = WanModel(cfg)
        cache = SinkCache(model, 1, h, w, chunk_frames=C, window_frames=window, sink_frames=3)
        cache.set_prompt(model, torch.zeros(1, cfg.text_len, cfg.text_dim))
    for _ in range(window // C - 1):  # fill the window's slots; K/V values do not matter for FLOPs
        cache.advance()
    assert cache.n_frames == window - C
    with FlopCounterMode(display=False) as fc:
        next(rollout(model, cache, 1))  # 4 steps + the cache pass, attending to the full 9-frame window
    assert cache.n_frames == window
    counts = fc.get_flop_counts()
    steps = 5
    T = (h // 2) * (w // 2)
    Lq = C * T

    def op_sum(pattern):
        tot = 0
        for mod, ops in counts.items():
            if re.fullmatch(pattern, mod):
                tot += sum(ops.values())
        return tot

    total = fc.get_total_flops()
    glob = {str(k): v for k, v in counts["Global"].items()}
    linear = sum(v for k, v in glob.items() if k in ("aten.addmm", "aten.mm"))
    self_attn = op_sum(r"WanModel\.blocks\.\d+\.self_attn") - op_sum(r"WanModel\.blocks\.\d+\.self_attn\.[qkvo]")
    cross = op_sum(r"WanModel\.blocks\.\d+\.cross_attn") - op_sum(r"WanModel\.blocks\.\d+\.cross_attn\.[qkvo]")
    closed_self = steps * cfg.num_layers * 4 * Lq * (window * T) * cfg.dim
    closed_cross = steps * cfg.num_layers * 4 * Lq * cfg.text_len * cfg.dim
    sdpa_source = "FlopCounterMode (SDPA's math decomposition on meta: bmm)"
    if self_attn == 0 or cross == 0:
        sdpa_source = "closed form 4*Lq*Lk*dim (FlopCounterMode counted no SDPA FLOPs on meta)"
        total += closed_self - self_attn + closed_cross - cross
        self_attn, cross = closed_self, closed_cross
    elif abs(self_attn - closed_self) > 1e-3 * closed_self or abs(cross - closed_cross) > 1e-3 * closed_cross:
        raise RuntimeError(f"counted attention FLOPs {self_attn:.4g} / {cross:.4g} differ from the closed form "
                           f"{closed_self:.4g} / {closed_cross:.4g}")

    # the Wan VAE: one steady-state chunk (3 latent frames -> 12 pixel frames), after a first chunk
    with torch.device("meta"):
        vae = WanVAE(VAE_PRESETS["wan2.1"])
    dec = vae.stream_decoder()
    z = torch.zeros(1, 16, C, h, w, device="meta")
    dec(z)
    with FlopCounterMode(display=False) as fv:
        frames = dec(z)
    vae_per_frame = fv.get_total_flops() / frames.shape[2]
    out_frames = 4 * C  # pixel frames of a steady-state chunk
    tf = 1e12
    ours = dict(linear_per_forward=linear / steps / tf, self_attn_per_frame=self_attn / steps / window / tf,
                cross_per_forward=cross / steps / tf, per_forward=total / steps / tf, per_chunk=total / tf,
                per_output_frame=total / out_frames / tf, vae_per_frame=vae_per_frame / tf)
    rel = {k: ours[k] / PUBLISHED_TF[k] - 1 for k in ours}
    return dict(flops_per_chunk=total, tflops=ours, published_tflops=PUBLISHED_TF,
                rel_err={k: round(v, 5) for k, v in rel.items()}, match_1pct=all(abs(v) <= 0.01 for v in rel.values()),
                sdpa_counted_by=sdpa_source, tokens_per_chunk=Lq, keys=window * T)


def project_h100(fl, efficiency):
    dit, vae = fl["tflops"]["per_output_frame"], fl["tflops"]["vae_per_frame"]
    return dict(peak_tflops=H100_BF16_TFLOPS, efficiency=efficiency,
                ceiling_fps_end_to_end=H100_BF16_TFLOPS / (dit + vae), ceiling_fps_dit=H100_BF16_TFLOPS / dit,
                projected_fps_end_to_end=efficiency * H100_BF16_TFLOPS / (dit + vae),
                projected_fps_dit=efficiency * H100_BF16_TFLOPS / dit)


# ----------------------------------------------------------------------------- 5. training memory, on the meta device

GiB = 2**30


class FusedAttention(torch.autograd.Function):
    """SDPA as a fused kernel (flash / memory-efficient attention) keeps it for backward: q, k, v, the output and a
    (B, H, Lq) fp32 logsumexp. On meta, SDPA would run its math decomposition and keep (Lq, Lk) weights instead.
    Used only to count; it has no backward."""

    @staticmethod
    def forward(ctx, q, k, v, *args, **kwargs):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def _tensors(obj, depth=0):
    """The tensors inside a checkpointed call's arguments: tuples, lists, dicts and plain objects (sink.Window)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 8 and isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif depth < 8 and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth + 1)
    elif depth < 8 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        yield from _tensors(vars(obj), depth + 1)


class SavedBytes:
    """Counts the bytes autograd keeps for backward of the graph the `with` body builds: the tensors saved by
    operations (saved_tensors_hooks) plus the arguments a gradient-checkpointed call keeps to recompute itself
    (non-reentrant checkpointing holds them, not its inner activations). Read `nbytes` once the caller has dropped
    everything but the graph's outputs: a tensor is counted only while it is still alive (a checkpointed call whose
    outputs nobody uses is freed with them). Storages are counted once however many tensors view them, parameters not
    at all. SDPA is counted as a fused kernel keeps it (FusedAttention)."""

    def __init__(self, params):
        self.params = {p.untyped_storage()._cdata for p in params}
        self.refs = []  # (storage id, weak reference to a tensor viewing it, storage bytes)

    def keep(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            sid = t.untyped_storage()._cdata
            if sid not in self.params:
                self.refs.append((sid, weakref.ref(t), t.untyped_storage().nbytes()))
        return t

    def __enter__(self):
        real_ckpt, self.restore = tc.checkpoint, (F.scaled_dot_product_attention, tc.checkpoint)

        def checkpoint(fn, *args, **kwargs):
            for t in _tensors(args):
                self.keep(t)
            return real_ckpt(fn, *args, **kwargs)

        F.scaled_dot_product_attention, tc.checkpoint = FusedAttention.apply, checkpoint
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.keep, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        F.scaled_dot_product_attention, tc.checkpoint = self.restore

    @property
    def nbytes(self):
        gc.collect()
        live = {sid: n for sid, ref, n in self.refs if ref() is not None}
        return sum(live.values())


def rollout_saved_bytes(cfg, h, w, frames, grad, ckpt, chunk=3, window=9, sink=3, dtype=torch.bfloat16):
    """Bytes kept for backward by one training rollout of the student (train.py's generate(): batch 1, the EMA-Sink
    cache, gradient through the last step of every chunk), on the meta device: weights in `dtype` with Wan's fp32
    time path, as FSDP2 hands them to the forward with a bf16 param_dtype. grad: the cache's gradient, 'none' or
    'through'; ckpt: gradient checkpointing per block."""
    with torch.device("meta"):
        model = cast_like_wan(WanModel(cfg), dtype).train()
        ctx = torch.zeros(1, cfg.text_len, cfg.text_dim, dtype=dtype)
    model.grad_ckpt = ckpt
    cache = SinkCache(model, 1, h, w, chunk_frames=chunk, window_frames=window, sink_frames=sink, grad=grad)
    with SavedBytes(model.parameters()) as count:
        x = torch.cat(list(rollout(model, cache, frames // chunk, context=ctx, exit_step=3)), dim=2)
    del cache  # as train.py drops it: what the graph still holds is what backward needs
    assert x.requires_grad
    return count.nbytes


def forward_saved_bytes(cfg, frames, h, w, ckpt=True, dtype=torch.bfloat16):
    """Bytes kept for backward by one bidirectional forward with grad on a whole video, batch 1 (the critic's flow
    matching step), on the meta device, weights as in rollout_saved_bytes."""
    with torch.device("meta"):
        model = cast_like_wan(WanModel(cfg), dtype).train()
        x = torch.zeros(1, cfg.in_dim, frames, h, w, dtype=dtype)
        t, ctx = torch.zeros(1), torch.zeros(1, cfg.text_len, cfg.text_dim, dtype=dtype)
    model.grad_ckpt = ckpt
    with SavedBytes(model.parameters()) as count:
        y = model(x, t, ctx)
    assert y.requires_grad
    return count.nbytes


def numel(module):
    return sum(p.numel() for p in module.parameters())


def training_memory(frames=21, h=60, w=104):
    """The 1.3B student's bytes kept for backward at 832x480, 21 latent frames, batch 1: one rollout (no
    checkpointing / checkpointed, each cache-gradient setting) and the critic's checkpointed forward."""
    cfg = PRESETS["wan2.1-t2v-1.3b"]
    out = {f"rollout_{g}_{'ckpt' if c else 'no_ckpt'}": rollout_saved_bytes(cfg, h, w, frames, g, c)
           for g in ("none", "through") for c in (False, True)}
    out["critic_step_ckpt"] = forward_saved_bytes(cfg, frames, h, w)
    return out


def fsdp_memory(saved, world=8, teacher="wan2.1-t2v-1.3b", cache_grad="through", h=60, w=104):
    """Per-GPU memory of the README's Re-DMD recipe under FSDP2 on `world` GPUs, batch 1 per GPU, every part computed
    on the meta device -> (rows of (name, bytes) with the activations of `cache_grad`, {setting: total} for both
    cache-gradient settings). train.py holds the student, its EMA, the critic and the teacher in fp32, sharded over
    the ranks (the gradients and AdamW's two moments too), and the text encoder, VAE and reward model in bf16 on every
    rank. The two steps do not overlap: the student step keeps its rollout for backward (saved: training_memory()),
    the critic step holds a sampling cache for its no-grad rollout and then its checkpointed forward. Transient
    working memory (a block recomputed in backward, attention and FFN temporaries, the decoded video) comes on top."""
    from qwen2vl import QWEN_PRESETS, VideoAlignModel
    from t5 import T5Config, T5Encoder

    with torch.device("meta"):
        student, teach = WanModel(PRESETS["wan2.1-t2v-1.3b"]), WanModel(PRESETS[teacher])
        n_frozen = {"umT5-XXL text encoder": numel(T5Encoder(T5Config())),
                    "Wan VAE": numel(WanVAE(VAE_PRESETS["wan2.1"])),
                    "VideoAlign reward model": numel(VideoAlignModel(QWEN_PRESETS["qwen2-vl-2b"]))}
        cache = SinkCache(cast_like_wan(student, torch.bfloat16), 1, h, w)
    n_student, n_teacher = numel(student), numel(teach)
    n_block = max(numel(student.blocks[0]), numel(teach.blocks[0]))
    fp32, bf16 = 4, 2
    critic_step = cache.nbytes() + saved["critic_step_ckpt"]
    steps = {g: max(saved[f"rollout_{g}_ckpt"], critic_step) for g in ("through", "none")}
    rows = [
        (f"student: weights, gradients, AdamW moments (fp32 / {world})", 4 * fp32 * n_student / world),
        (f"student EMA (fp32 / {world})", fp32 * n_student / world),
        (f"critic: weights, gradients, AdamW moments (fp32 / {world})", 4 * fp32 * n_student / world),
        (f"teacher {teacher} (fp32 / {world})", fp32 * n_teacher / world),
        *((f"{name} (bf16, every rank)", bf16 * n) for name, n in n_frozen.items()),
        ("FSDP all-gathered blocks (fp32, current + prefetched)", 2 * fp32 * n_block),
    ]
    static = sum(b for _, b in rows)
    rows.append((f"activations and cache: max(student step {saved[f'rollout_{cache_grad}_ckpt'] / GiB:.2f}, critic "
                 f"step {critic_step / GiB:.2f})", steps[cache_grad]))
    return rows, {g: static + b for g, b in steps.items()}


# ----------------------------------------------------------------------------- 2-3. timed streaming sessions


def build(scale, device, dtype, seed):
    cfg, vae_name, H, W = SCALES[scale]
    torch.manual_seed(seed)
    with torch.device(device):  # random weights: speed does not depend on their values
        model = cast_like_wan(WanModel(cfg), dtype).eval()
        vae = WanVAE(VAE_PRESETS[vae_name]).to(dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, min(64, cfg.text_len), cfg.text_dim, generator=g)  # a 64-token prompt (zero-padded inside)
    return model, vae, ctx.to(device=device, dtype=dtype), H, W


def session(model, dit, vae, ctx, H, W, chunks, device, seed, per_chunk=None):
    """One stream from a fresh cache: returns per-chunk ms lists (DiT, VAE, end to end) and the first-chunk latency.
    Syncs after the DiT and after the decode are measurement points; the pixels' .cpu() is the stream's own sync."""
    s = vae.cfg.spatial_stride
    sync(device)
    t_start = time.perf_counter()
    cache = SinkCache(model, 1, H // s, W // s)
    cache.set_prompt(dit, ctx)
    dec = vae.stream_decoder()
    gen = rollout(dit, cache, chunks, generator=torch.Generator(device=device).manual_seed(seed))
    out = dict(dit_ms=[], vae_ms=[], e2e_ms=[], frames=[], fill=[])
    vdtype = vae.conv2.weight.dtype
    for k in range(chunks):
        t0 = time.perf_counter()
        x0 = next(gen)
        sync(device)
        t1 = time.perf_counter()
        frames = dec(x0.to(vdtype))
        sync(device)
        t2 = time.perf_counter()
        pixels = to_uint8(frames)  # to the host, as sample.py hands them to the mp4 writer
        t3 = time.perf_counter()
        if k == 0:
            out["first_chunk_ms"] = (t3 - t_start) * 1e3
        out["dit_ms"].append((t1 - t0) * 1e3)
        out["vae_ms"].append((t2 - t1) * 1e3)
        out["e2e_ms"].append((t3 - t0) * 1e3)
        out["frames"].append(pixels.shape[0])
        out["fill"].append(cache.n_frames)
        if per_chunk is not None:
            per_chunk(k)
    out["full_from"] = out["fill"].index(max(out["fill"]))  # first chunk with the window full
    return out


def unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_legs(a, model, vae, ctx, H, W, device):
    legs = {}
    if a.legs in ("both", "eager"):
        legs["eager"] = model
    if a.legs in ("both", "compiled"):
        legs["compiled"] = torch.compile(model, fullgraph=True, backend=a.compile_backend)
    names = list(legs)
    res = {n: [] for n in names}
    graphs_after_warmup = None
    for r in range(a.repeats + 1):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            res[n].append(session(model, legs[n], vae, ctx, H, W, a.chunks, device, a.seed + r))
            tag = "warm-up, dropped" if r == 0 else f"repeat {r}/{a.repeats}"
            log(f"  {n:8s} session ({tag}): {time.perf_counter() - t:.2f} s")
        if r == 0 and "compiled" in legs:
            graphs_after_warmup = unique_graphs()
    stats = {}
    for n in names:
        runs = res[n][1:]
        steady = [(run, range(run["full_from"], a.chunks)) for run in runs]
        dit = [run["dit_ms"][k] for run, ks in steady for k in ks]
        vae_ms = [run["vae_ms"][k] for run, ks in steady for k in ks]
        e2e = [run["e2e_ms"][k] for run, ks in steady for k in ks]
        fr = [run["frames"][k] for run, ks in steady for k in ks]
        per_rep = [sum(run["frames"][k] for k in ks) / (sum(run["e2e_ms"][k] for k in ks) / 1e3)
                   for run, ks in steady if len(ks)]
        px = statistics.median(fr) if fr else float("nan")  # pixel frames of a steady-state chunk (12)
        stats[n] = dict(
            dit_ms=summary(dit), vae_ms=summary(vae_ms), e2e_ms=summary(e2e),
            fps_dit=px / (statistics.median(dit) / 1e3) if dit else None,
            fps_vae=px / (statistics.median(vae_ms) / 1e3) if vae_ms else None,
            fps_e2e=px / (statistics.median(e2e) / 1e3) if e2e else None,
            fps_e2e_per_repeat=[round(v, 2) for v in per_rep],
            first_chunk_ms=summary([run["first_chunk_ms"] for run in runs]),
            steady_chunks_per_session=a.chunks - runs[0]["full_from"] if runs else 0)
    return legs, stats, graphs_after_warmup


def long_run(a, model, dit, vae, ctx, H, W, device):
    rss = []
    mem = []

    def record(k):
        rss.append(round(rss_mb(), 1))
        if device.type == "cuda":
            mem.append(round(torch.cuda.memory_allocated(device) / 2**20, 1))

    out = session(model, dit, vae, ctx, H, W, a.long_chunks, device, a.seed, per_chunk=record)
    return out, rss, mem


# ----------------------------------------------------------------------------- 4. against diffusers


def diffusers_ratio(a, device, dtype):
    """Median time ratio ours / diffusers of one bidirectional forward on the mid config (3 latent frames of 32x32:
    768 tokens, or 16x16: 192 tokens with --quick; a 512-row context), diffusers' weights copied into ours through
    our loader (save_pretrained, then WanModel.from_pretrained). Both load the weights in `dtype` the way their
    library intends (diffusers' from_pretrained(torch_dtype=...) keeps its fp32 modules, ours keeps the time path
    in fp32)."""
    try:
        import diffusers
    except ImportError as err:
        return None, dict(reason=f"diffusers is not installed ({err}); it is a test-only dependency: "
                                 "pip install -r requirements-dev.txt")

    c = MID
    torch.manual_seed(a.seed)
    d = diffusers.WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_dim,
        out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=c.eps, rope_max_seq_len=c.rope_max_len).eval()
    with torch.no_grad():  # non-trivial norms and modulation, so the output check means something
        for n, p in d.named_parameters():
            if "norm" in n or "scale_shift" in n:
                p.add_(0.3 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        d.save_pretrained(tmp)
        ours = WanModel.from_pretrained(tmp, dtype=dtype, device=device)
        if dtype == torch.float32:
            d = d.to(device)
        else:
            try:  # keeps diffusers' fp32 modules (needs accelerate)
                d = diffusers.WanTransformer3DModel.from_pretrained(tmp, torch_dtype=dtype).to(device).eval()
            except ValueError:  # no accelerate: a plain cast
                d = d.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(a.seed)
    side = 16 if a.quick else 32
    x = torch.randn(1, c.in_dim, 3, side, side, generator=g).to(device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    ctx = F.pad(torch.randn(1, 20, c.text_dim, generator=g), (0, 0, 0, c.text_len - 20)).to(device=device, dtype=dtype)

    def fwd_ours():
        return ours(x, t, ctx)

    def fwd_theirs():
        return d(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    times = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        y_ours, y_ref = fwd_ours().float(), fwd_theirs().float()  # also the warm-up
        fwd_ours(), fwd_theirs()
        for r in range(a.diffusers_repeats):
            for name, f in ((("ours", fwd_ours), ("diffusers", fwd_theirs)) if r % 2 == 0
                            else (("diffusers", fwd_theirs), ("ours", fwd_ours))):
                sync(device)
                t0 = time.perf_counter()
                f()
                sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
    ratios = [o / r for o, r in zip(times["ours"], times["diffusers"])]
    err = ((y_ours - y_ref).abs().max() / y_ref.abs().max()).item()  # for information: parity is tested elsewhere
    info = dict(config=f"dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads x {c.head_dim}, ffn {c.ffn_dim}; "
                       f"x [1, 16, 3, {side}, {side}] ({3 * side * side // 4} tokens), context 512 rows",
                ours_ms=summary(times["ours"]), diffusers_ms=summary(times["diffusers"]),
                ratio_spread=[round(min(ratios), 3), round(max(ratios), 3)], max_rel_err=err)
    return statistics.median(ratios), info


# ----------------------------------------------------------------------------- main


def memory_report(a):
    """Section 5: the student rollout's bytes kept for backward, and the per-GPU table of the FSDP recipe."""
    t = time.perf_counter()
    saved = training_memory()
    log(f"training memory, 1.3B student, 21 latent frames at 832x480, batch 1, bf16, counted on the meta device "
        f"(attention as a fused kernel keeps it; parameters excluded) in {time.perf_counter() - t:.0f} s:")
    for g in ("none", "through"):
        log(f"  rollout, --cache_grad={g:7s}: {saved[f'rollout_{g}_no_ckpt'] / GiB:7.2f} GiB kept for backward, "
            f"{saved[f'rollout_{g}_ckpt'] / GiB:6.2f} GiB with --grad_ckpt=true")
    log(f"  critic step (bidirectional forward with grad, checkpointed): {saved['critic_step_ckpt'] / GiB:.2f} GiB")
    tables = {}
    for teacher in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        rows, totals = fsdp_memory(saved, a.world, teacher)
        total, total_none = totals["through"], totals["none"]
        log(f"  per GPU, Re-DMD on {a.world} GPUs (FSDP2), teacher {teacher}, --cache_grad=through:")
        for name, b in rows:
            log(f"    {name:88s} {b / GiB:6.2f} GiB")
        log(f"    {'total (--cache_grad=none: ' + f'{total_none / GiB:.2f} GiB)':88s} {total / GiB:6.2f} GiB")
        tables[teacher] = dict(rows={n: round(b / GiB, 3) for n, b in rows}, total_gib=round(total / GiB, 3),
                               total_gib_cache_grad_none=round(total_none / GiB, 3))
    return dict(training_memory_gib={k: round(v / GiB, 3) for k, v in saved.items()}, fsdp_per_gpu=tables)


def main(argv=None):
    a = configure(BenchConfig(), argv, doc=__doc__)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    if a.scale == "auto":
        a.scale = "tiny" if a.quick else ("full" if device.type != "cpu" else "mid")
    if a.scale not in SCALES:
        raise SystemExit(f"--scale must be one of {sorted(SCALES)} or auto, got {a.scale!r}")
    if a.legs not in ("both", "eager", "compiled"):
        raise SystemExit(f"--legs takes both, eager or compiled, got {a.legs!r}")
    a.chunks = a.chunks or (5 if a.quick else 8)
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.diffusers_repeats = a.diffusers_repeats or (4 if a.quick else 10)
    if a.compile_backend == "auto":
        a.compile_backend = "aot_eager" if a.quick else "inductor"
    if a.long_chunks < 20:
        raise SystemExit("--long_chunks must be >= 20 (the protocol uses 60+)")
    if a.chunks < 4:
        raise SystemExit("--chunks must be >= 4: the window fills at chunk 3, and only full-window chunks are timed")
    cfg, vae_name, H, W = SCALES[a.scale]
    log(f"bench.py: device {device}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"scale '{a.scale}': DiT dim {cfg.dim} x {cfg.num_layers} layers, VAE '{vae_name}', {W}x{H}; random weights")
    if a.quick:
        log(f"quick mode: tiny sizes ({W}x{H}), {a.repeats} repeats of {a.chunks} chunks, compile backend "
            f"'{a.compile_backend}' (graph capture without code generation: its times say nothing about inductor's speed)")
    result = dict(device=str(device), dtype=str(dtype).replace("torch.", ""), torch=torch.__version__, scale=a.scale,
                  quick=a.quick, threads=torch.get_num_threads(),
                  compile_backend=a.compile_backend if a.legs != "eager" else None)
    if a.world < 1:
        raise SystemExit(f"--world={a.world}: the FSDP recipe runs on at least 1 GPU")
    if a.memory_only:
        result.update(memory_report(a))
        print(json.dumps(result))
        return result

    # 1. FLOPs
    t = time.perf_counter()
    fl = count_flops_1p3b()
    proj = project_h100(fl, a.efficiency)
    T = fl["tflops"]
    log(f"FLOPs, 1.3B DiT at 832x480, chunk of 3 latent frames ({fl['tokens_per_chunk']} tokens), 9-frame window "
        f"({fl['keys']} keys), meta device ({time.perf_counter() - t:.1f} s):")
    for k in PUBLISHED_TF:
        log(f"  {k:20s} {T[k]:9.4f} TF   published {PUBLISHED_TF[k]:8.3f} TF   {100 * fl['rel_err'][k]:+.2f}%")
    log(f"  attention counted by {fl['sdpa_counted_by']}; all within 1%: {fl['match_1pct']}")
    log(f"  H100 projection: ceiling {proj['ceiling_fps_end_to_end']:.1f} FPS end to end "
        f"({proj['ceiling_fps_dit']:.1f} "
        f"DiT alone) at {H100_BF16_TFLOPS:.0f} TF/s; at {a.efficiency:.0%} efficiency "
        f"{proj['projected_fps_end_to_end']:.1f} FPS end to end ({proj['projected_fps_dit']:.1f} DiT alone)")
    result.update(flops_per_chunk_1p3b=fl["flops_per_chunk"], flops_tflops=T, flops_rel_err=fl["rel_err"],
                  flops_match_published=fl["match_1pct"], flops_sdpa_counted_by=fl["sdpa_counted_by"],
                  h100_projection=proj)

    # 2. timed sessions, interleaved
    torch._dynamo.reset()
    model, vae, ctx, H, W = build(a.scale, device, dtype, a.seed)
    log(f"timed sessions: {a.repeats} repeats + 1 warm-up, {a.chunks} chunks each, legs interleaved")
    with torch.inference_mode():
        legs, stats, graphs_warm = run_legs(a, model, vae, ctx, H, W, device)
    for n, s in stats.items():
        d = s["dit_ms"]
        log(f"  {n:8s}: per chunk DiT {d['median']:.1f} ms (IQR {d['p25']:.1f}-{d['p75']:.1f}),"
            f" VAE {s['vae_ms']['median']:.1f} ms, end to end {s['e2e_ms']['median']:.1f} ms"
            f" -> {s['fps_dit']:.1f} FPS DiT,"
            f" {s['fps_e2e']:.1f} FPS end to end (per repeat {s['fps_e2e_per_repeat']}); first chunk "
            f"{s['first_chunk_ms']['median']:.0f} ms (median of {s['first_chunk_ms']['n']})")
    result["legs"] = stats

    # 3. the long session (compiled when compiling), RSS, recompiles
    leg = "compiled" if "compiled" in legs else "eager"
    rss0 = rss_mb()
    with torch.inference_mode():
        out, rss, mem = long_run(a, model, legs[leg], vae, ctx, H, W, device)
    recompiles = unique_graphs() - graphs_warm if graphs_warm is not None else None
    full = out["full_from"]
    chunk_ms = [round(v, 2) for v in out["e2e_ms"]]
    settle = min(full + 5, len(rss) - 10)  # allocator and caches settle a few chunks after the window is full
    growth = statistics.median(rss[-10:]) - statistics.median(rss[settle: settle + 10])  # medians: RSS jitters
    first10 = statistics.median(chunk_ms[full: full + 10])
    last10 = statistics.median(chunk_ms[-10:])
    log(f"long session ({leg}, {a.long_chunks} chunks): chunk ms median {statistics.median(chunk_ms[full:]):.1f}, "
        f"first 10 full-window chunks {first10:.1f}, last 10 {last10:.1f}; RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB "
        f"(before {rss0:.0f}), growth from chunks {settle}-{settle + 9} to the last 10 (medians): {growth:+.1f} MB"
        + (f"; device memory {mem[settle]:.0f} -> {mem[-1]:.0f} MB" if mem else ""))
    if recompiles is not None:
        log(f"recompiles after warm-up: {recompiles} (torch._dynamo counters['stats']['unique_graphs']: "
            f"{graphs_warm} graphs after the warm-up session, backend {a.compile_backend})")
    else:
        log("recompiles: no compiled leg (--legs=eager)")
    result.update(chunk_ms=chunk_ms, rss_mb=rss, device_mem_mb=mem or None, long_leg=leg, window_full_from_chunk=full,
                  rss_growth_mb=round(growth, 1), chunk_ms_first10=first10, chunk_ms_last10=last10,
                  recompiles=recompiles, graphs_after_warmup=graphs_warm, peak_rss_mb=round(peak_rss_mb(), 1))

    # 4. diffusers
    if a.diffusers:
        ratio, info = diffusers_ratio(a, device, dtype)
    else:
        ratio, info = None, dict(reason="--diffusers=false")
    if ratio is None:
        log(f"ratio vs diffusers: null ({info['reason']})")
    else:
        log(f"ours / diffusers WanTransformer3DModel, one forward ({info['config']}): median ratio {ratio:.3f} "
            f"(spread {info['ratio_spread']}; ours {info['ours_ms']['median']:.1f} ms, diffusers "
            f"{info['diffusers_ms']['median']:.1f} ms); max output difference {info['max_rel_err']:.2g} of max |out|")
    result.update(ratio_vs_diffusers=ratio, diffusers=info)

    # 5. training memory
    if a.memory and not a.quick:
        result.update(memory_report(a))
    print(json.dumps(result, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return result


if __name__ == "__main__":
    cli(lambda: main(sys.argv[1:]))
