"""sink.py: the EMA-Sink cache against one-shot chunk-causal forwards, closed-form EMA, memory, compile, prompts."""

import copy

import pytest
import torch

from dmd import FlowMatch
from model import PRESETS, WanModel
from sink import SinkCache, rollout

C = 3  # frames per chunk


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = WanModel(PRESETS["tiny"]).eval()
    with torch.no_grad():  # move away from the zero-ish init so every path matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def ctx(B=2, seed=0):
    return torch.randn(B, 10, 32, generator=torch.Generator().manual_seed(seed))


def stream(model, cache, x, t):
    """Teacher forcing: chunk i of x at timestep t[:, i], one call per chunk, outputs concatenated."""
    outs = []
    with torch.no_grad():
        for i in range(x.shape[2] // C):
            cache.advance()
            outs.append(model(x[:, :, i * C : (i + 1) * C], t[:, i], cache=cache))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("mode,chunks,window,sink", [
    ("full", 5, None, 0),  # dense causal context
    ("ema", 3, 9, 3),  # 9 frames: nothing evicted yet
    ("static", 3, 9, 3),
    ("none", 6, 9, 0),  # a sliding window equals the one-shot mask even after eviction: RoPE is relative
])
def test_streaming_equals_chunk_causal_forward(model, mode, chunks, window, sink):
    B, h, w = 2, 4, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 16, chunks * C, h, w, generator=g)
    t = torch.rand(B, chunks, generator=g) * 1000
    c = ctx(B)
    with torch.no_grad():
        ref = model(x, t.repeat_interleave(C, dim=1), c, chunk_frames=C, window_frames=window, sink_frames=sink)
    cache = SinkCache(model, B, h, w, mode=mode, max_frames=chunks * C if mode == "full" else None)
    cache.set_prompt(model, c)
    out = stream(model, cache, x, t)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def run_and_record(model, cache, n_chunks, B, h, w, seed=2):
    """Stream clean chunks at t = 0; before each advance() record the ring slots that will be evicted."""
    g = torch.Generator().manual_seed(seed)
    evicted, sinks = [], []
    with torch.no_grad():
        for i in range(n_chunks):
            f0 = cache.frames
            rows = [cache.slot(gf - cache.R) for gf in range(f0, f0 + C) if gf - cache.R >= cache.S]
            if rows:
                idx = torch.tensor([r * cache.T + j for r in rows for j in range(cache.T)])
                evicted.append((cache.k[:, :, idx].clone().double(), cache.v[:, :, idx].clone().double()))
            cache.advance()
            model(torch.randn(B, 16, C, h, w, generator=g), torch.zeros(B), cache=cache)
            sinks.append((cache.k[:, :, : cache.S * cache.T].clone(), cache.v[:, :, : cache.S * cache.T].clone()))
    return evicted, sinks


@pytest.mark.parametrize("alpha", [0.9, 0.999])
def test_ema_arithmetic(model, alpha):
    B, h, w = 1, 2, 4
    cache = SinkCache(model, B, h, w, alpha=alpha)
    cache.set_prompt(model, ctx(B))
    evicted, sinks = run_and_record(model, cache, 8, B, h, w)
    S0k, S0v = (s.double() for s in sinks[0])  # the sink right after the first chunk
    k = len(evicted)
    assert k == 8 - 3  # chunks 3..7 each evict one chunk
    # closed form: a^k S0 + sum_j (1 - a) a^(k - j) K_j, j = 1..k
    ref_k = alpha**k * S0k + sum((1 - alpha) * alpha ** (k - j) * evicted[j - 1][0] for j in range(1, k + 1))
    ref_v = alpha**k * S0v + sum((1 - alpha) * alpha ** (k - j) * evicted[j - 1][1] for j in range(1, k + 1))
    got_k, got_v = sinks[-1]
    assert (got_k.double() - ref_k).abs().max() < 1e-5
    assert (got_v.double() - ref_v).abs().max() < 1e-5
    assert (got_k.double() - S0k).abs().max() > 1e-4  # the sink really moved


def test_static_sink_never_changes_and_none_has_no_sink(model):
    B, h, w = 1, 2, 4
    cache = SinkCache(model, B, h, w, mode="static")
    cache.set_prompt(model, ctx(B))
    _, sinks = run_and_record(model, cache, 6, B, h, w)
    assert all(torch.equal(s[0], sinks[0][0]) for s in sinks)
    none = SinkCache(model, B, h, w, mode="none")
    assert none.S == 0 and none.k.shape[2] == 9 * none.T


def test_bf16_cache_keeps_the_ema(model):
    """With a = 0.999 a bf16 lerp rounds the update away; the fp32 sink state must not."""
    B, h, w = 1, 2, 4
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    cache = SinkCache(m16, B, h, w, alpha=0.999)
    assert cache.k.dtype == torch.bfloat16 and cache.sink32.dtype == torch.float32
    cache.set_prompt(m16, ctx(B))
    evicted, sinks = run_and_record(m16, cache, 8, B, h, w)
    S0 = sinks[0][0].double()
    k = len(evicted)
    ref = 0.999**k * S0 + sum(0.001 * 0.999 ** (k - j) * evicted[j - 1][0] for j in range(1, k + 1))
    got = cache.sink32[0].double()
    assert (got - ref).abs().max() < 1e-5
    assert (got - S0).abs().max() > 1e-3  # a bf16-only EMA would have stayed at S0 in most entries
    assert torch.equal(cache.k[:, :, : cache.S * cache.T], cache.sink32[0].to(torch.bfloat16))


def test_window_dependence(model):
    """'none': a chunk ignores frames older than the window; 'ema': it does not (through the sink)."""
    B, h, w = 1, 2, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 16, 7 * C, h, w, generator=g)
    t = torch.full((B, 7), 400.0)
    x2 = x.clone()
    x2[:, :, C : 2 * C] += 2.0  # chunk 1: outside a 9-frame window by chunk 4 (none), evicted into the sink (ema)
    for mode, depends in [("none", False), ("ema", True), ("static", False)]:
        outs = []
        for xx in (x, x2):
            cache = SinkCache(model, B, h, w, mode=mode, alpha=0.5)
            cache.set_prompt(model, ctx(B))
            outs.append(stream(model, cache, xx, t))
        diff = (outs[0][:, :, -C:] - outs[1][:, :, -C:]).abs().max().item()
        assert (diff > 1e-4) == depends, (mode, diff)


def test_memory_is_flat_and_buffers_stay(model):
    B, h, w = 1, 2, 2
    cache = SinkCache(model, B, h, w)
    cache.set_prompt(model, ctx(B))
    ptrs = [t.data_ptr() for t in cache.buffers()]
    gen = rollout(model, cache, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, _ in enumerate(gen):
            if i == 2:
                after3 = cache.nbytes()
    assert cache.nbytes() == after3
    assert [t.data_ptr() for t in cache.buffers()] == ptrs  # written in place, never reallocated
    assert cache.k_fpos.max().item() == 8 and cache.n_frames == 9


def test_thousand_frames(model):
    B, h, w = 1, 2, 2
    cache = SinkCache(model, B, h, w)
    cache.set_prompt(model, ctx(B))
    n = 0
    with torch.no_grad():
        for x0 in rollout(model, cache, 334, generator=torch.Generator().manual_seed(0)):
            assert torch.isfinite(x0).all()
            n += x0.shape[2]
    assert n >= 1000 and cache.frames == n
    assert cache.q_fpos.tolist() == [6, 7, 8]


def test_full_mode_refuses_to_overflow(model):
    cache = SinkCache(model, 1, 2, 2, mode="full", max_frames=6)
    cache.advance()
    cache.advance()
    with pytest.raises(RuntimeError, match="max_frames=6"):
        cache.advance()


def test_compile_no_recompile_once_full(model):
    torch._dynamo.reset()
    B, h, w = 1, 2, 4
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    cache = SinkCache(model, B, h, w)
    cache.set_prompt(model, ctx(B))
    gen = rollout(compiled, cache, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(5):  # chunks 0..4: fills 3, 6, 9 frames, then the ring wraps
            next(gen)
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(20):
                x0 = next(gen)
    # the compiled stream computes what the eager one does
    ref_cache = SinkCache(model, B, h, w)
    ref_cache.set_prompt(model, ctx(B))
    with torch.no_grad():
        ref = list(rollout(model, ref_cache, 25, generator=torch.Generator().manual_seed(0)))[-1]
    assert (x0 - ref).abs().max() < 1e-4


def test_prompt_switch(model):
    B, h, w = 2, 2, 4
    cache = SinkCache(model, B, h, w)
    cache.set_prompt(model, ctx(B, seed=0))
    with torch.no_grad():
        for _ in rollout(model, cache, 4, generator=torch.Generator().manual_seed(0)):
            pass
    other = copy.deepcopy(cache)  # same self-attention cache, still holding the old prompt's K/V
    new = ctx(B, seed=1)
    cache.set_prompt(model, new)
    x = torch.randn(B, 16, C, h, w)
    t = torch.full((B,), 625.0)
    with torch.no_grad():
        cache.advance()
        other.advance()
        a = model(x, t, cache=cache)  # cross-attention from the cache
        b = model(x, t, new, cache=other)  # cross-attention computed from the new context directly
        old = copy.deepcopy(other)
        c = model(x, t, cache=old)  # the old prompt
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() > 1e-3


def test_recache_reencodes_window_under_new_prompt(model):
    """After a switch with recache, the ring K/V equal a stream that wrote those frames under the new prompt."""
    B, h, w = 1, 2, 4
    p1, p2 = ctx(B, seed=0), ctx(B, seed=1)
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(B, 16, 3 * C, h, w, generator=g)
    a = SinkCache(model, B, h, w, mode="static")
    a.set_prompt(model, p1)
    with torch.no_grad():
        for i in range(3):
            a.advance()
            model(lat[:, :, i * C : (i + 1) * C], torch.zeros(B), cache=a)
            a.keep_latents(lat[:, :, i * C : (i + 1) * C])
    a.set_prompt(model, p2, recache=True)
    b = SinkCache(model, B, h, w, mode="static")
    b.set_prompt(model, p1)
    with torch.no_grad():
        for i in range(3):
            if i == 1:
                b.set_prompt(model, p2)
            b.advance()
            model(lat[:, :, i * C : (i + 1) * C], torch.zeros(B), cache=b)
    assert a.frames == b.frames == 9 and a.n_frames == b.n_frames == 9
    assert (a.k - b.k).abs().max() < 1e-5 and (a.v - b.v).abs().max() < 1e-5
    assert torch.equal(a.q_fpos, b.q_fpos) and torch.equal(a.k_fpos, b.k_fpos)


def test_rollout_exit_step_gradient(model):
    """Steps before the exit run without grad, the exit step has grad, the cache stays detached,
    and the numbers equal a no-grad rollout with the same noise."""
    B, h, w = 1, 2, 4
    m = copy.deepcopy(model).train()
    outs = {}
    for exit_step in (None, 3):
        cache = SinkCache(m, B, h, w)
        cache.set_prompt(m, ctx(B))
        outs[exit_step] = list(rollout(m, cache, 4, exit_step=exit_step, generator=torch.Generator().manual_seed(0)))
        assert not cache.k.requires_grad and not cache.v.requires_grad
    assert all(x.requires_grad for x in outs[3]) and not any(x.requires_grad for x in outs[None])
    for a, b in zip(outs[3], outs[None]):
        assert (a.detach() - b).abs().max() < 1e-5
    loss = sum(x.square().mean() for x in outs[3])
    loss.backward()
    assert m.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    # an earlier exit yields that step's x0 prediction: different numbers, still with grad
    cache = SinkCache(m, B, h, w)
    cache.set_prompt(m, ctx(B))
    early = next(rollout(m, cache, 1, exit_step=1, generator=torch.Generator().manual_seed(0)))
    assert early.requires_grad and (early.detach() - outs[None][0]).abs().max() > 1e-3


def test_student_timesteps():
    ts = FlowMatch(5.0).timesteps()
    assert ts == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
