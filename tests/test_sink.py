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
    """Steps before the exit run without grad, the exit step has grad, and the numbers equal a no-grad rollout
    (through the sampling cache) with the same noise, whatever the cache's gradient setting."""
    B, h, w = 1, 2, 4
    m = copy.deepcopy(model).train()
    outs = {}
    for exit_step, grad in ((None, None), (3, "none"), (3, "through")):
        cache = SinkCache(m, B, h, w, grad=grad)
        outs[grad] = list(rollout(m, cache, 4, context=ctx(B), exit_step=exit_step,
                                  generator=torch.Generator().manual_seed(0)))
    assert all(x.requires_grad for x in outs["none"]) and not any(x.requires_grad for x in outs[None])
    for grad in ("none", "through"):
        for a, b in zip(outs[grad], outs[None]):
            assert (a.detach() - b).abs().max() < 1e-5
    loss = sum(x.square().mean() for x in outs["none"])
    loss.backward()
    assert m.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    # an earlier exit yields that step's x0 prediction: different numbers, still with grad
    cache = SinkCache(m, B, h, w, grad="none")
    early = next(rollout(m, cache, 1, context=ctx(B), exit_step=1, generator=torch.Generator().manual_seed(0)))
    assert early.requires_grad and (early.detach() - outs[None][0]).abs().max() > 1e-3
    # the sampling cache writes in place: training through it is refused, not silently wrong
    with pytest.raises(RuntimeError, match="grad='none' or 'through'"):
        next(rollout(m, SinkCache(m, B, h, w), 1, context=ctx(B), exit_step=0))


# -- gradients of training rollouts: a window that evicts and folds after every chunk's exit step -----------------

N_CHUNKS = 5


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double().train()


def probe_loss(net, grad, exit_step, model64):
    """A fixed random projection of a 5-chunk training rollout. Window 6 = sink 3 + ring 3: from chunk 2 on, every
    chunk overwrites the previous chunk's ring slots and folds them into the sink (alpha 0.7), after that chunk's
    exit step ran; so a checkpointed recomputation that read the live cache would see other K/V."""
    cache = SinkCache(model64, 1, 2, 4, window_frames=6, sink_frames=3, alpha=0.7, grad=grad)
    noise = torch.randn(1, 16, 3 * N_CHUNKS, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.cat(list(rollout(net, cache, N_CHUNKS, context=ctx(1).double(), exit_step=exit_step, noise=noise,
                               generator=torch.Generator().manual_seed(2))), dim=2)
    return (x * torch.arange(x.numel(), dtype=x.dtype).view_as(x).sin()).sum()


def grads(model64, grad, exit_step, ckpt):
    model64.grad_ckpt = ckpt
    model64.zero_grad()
    try:
        probe_loss(model64, grad, exit_step, model64).backward()
    finally:
        model64.grad_ckpt = False
    return {k: p.grad.clone() for k, p in model64.named_parameters()}


@pytest.mark.parametrize("grad", ["none", "through"])
def test_checkpointed_rollout_gradients_equal_eager(model64, grad):
    """Gradient checkpointing of the streaming forwards changes no gradient: every block recomputed in backward reads
    the Window its forward read, although the slots have been overwritten and the sink folded since."""
    eager, ckpt = grads(model64, grad, 2, False), grads(model64, grad, 2, True)
    assert max(eager[k].abs().max() for k in eager) > 1
    for k in eager:
        assert torch.equal(eager[k], ckpt[k]), k


class Replay(torch.nn.Module):
    """The rollout as a function of the parameters where only forwards run with grad depend on them: those use
    theta + h d; a forward without grad replays the base run's input and output (its cache writes still happen,
    from the base input). Its derivative in h is what autograd must return for d . grad (no cache code involved)."""

    def __init__(self, net, d=None, h=0.0, record=None):
        super().__init__()
        self.net, self.d, self.h, self.record, self.i = net, d, h, record, 0

    def forward(self, x, t, context, cache):
        if self.d is None:  # the base run: record what every forward without grad saw and returned
            out = self.net(x, t, context, cache=cache)
            if not torch.is_grad_enabled():
                self.record.append((x, out))
            return out
        if torch.is_grad_enabled():
            ps = {k: p + self.h * self.d[k] for k, p in self.net.named_parameters()}
            return torch.func.functional_call(self.net, ps, (x, t, context), dict(cache=cache))
        x0, out0 = self.record[self.i]
        self.i += 1
        self.net(x0, t, context, cache=cache)
        return out0


@pytest.mark.parametrize("exit_step", [0, 2])
def test_cache_grad_against_finite_differences(model64, exit_step):
    """Both cache-gradient settings against central differences (Richardson-extrapolated; the model's fp32 time path
    and residual stream limit them to ~1e-5) of the rollout with only its grad-enabled forwards perturbed. 'none'
    runs the t = 0 cache pass without grad on a detached x0, so the cache is a constant; 'through' runs it with grad,
    so the difference quotient also moves every later chunk's context, sink folds included."""
    gen = torch.Generator().manual_seed(5)
    d = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in model64.named_parameters()}
    got = {}
    for grad in ("none", "through"):
        g = grads(model64, grad, exit_step, True)
        auto = sum((g[k] * d[k]).sum().item() for k in g)
        record = []

        def quotient(h):
            plus = probe_loss(Replay(model64, d, h, record), grad, exit_step, model64).item()
            minus = probe_loss(Replay(model64, d, -h, record), grad, exit_step, model64).item()
            return (plus - minus) / (2 * h)

        # grad mode stays on (the rollout turns it on for exactly the forwards that differentiate), nothing requires it
        model64.requires_grad_(False)
        try:
            probe_loss(Replay(model64, record=record), grad, exit_step, model64)
            fd = (4 * quotient(2e-3) - quotient(4e-3)) / 3
        finally:
            model64.requires_grad_(True)
        assert auto == pytest.approx(fd, rel=1e-4), grad
        got[grad] = auto
    # the two settings are different gradients (by more than the check's resolution)
    assert abs(got["none"] - got["through"]) > 1e-2 * abs(got["through"])


def test_student_timesteps():
    ts = FlowMatch(5.0).timesteps()
    assert ts == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)


def test_training_cache_is_freed_after_backward(model64):
    """Nothing of a training rollout outlives its backward: the cache's entries (held by checkpointed blocks' Windows
    until then) are freed once the outputs are dropped, with no reference cycle left to the garbage collector."""
    import gc
    import weakref

    model64.grad_ckpt = True
    try:
        cache = SinkCache(model64, 1, 2, 4, window_frames=6, sink_frames=3, alpha=0.7, grad="through")
        x = torch.cat(list(rollout(model64, cache, 3, context=ctx(1).double(), exit_step=1)), dim=2)
        entry = weakref.ref(cache.kv[0][0][0])  # the sink's keys as chunk 2 read them (folded once)
        del cache
        assert entry() is not None  # the graph needs it
        x.square().sum().backward()
        gc.disable()  # freed by reference counting alone
        del x
        assert entry() is None
    finally:
        gc.enable()
        model64.grad_ckpt = False
