"""
EMA-Sink: the streaming KV cache of Reward Forcing (paper §3.2, Fig. 2-3), and the chunk rollout
that training and sampling share.

The cache holds, per layer, the un-roped keys and values of `sink_frames` sink frames followed by a
ring of `window_frames - sink_frames` recent frames, in preallocated buffers written in place
(gpt-fast style). The first chunk becomes the sink. When a new chunk needs ring slots still held by
older frames, those frames leave the window and are folded into the sink (paper Eq. 4-5):

    S_K <- a S_K + (1 - a) K_evicted,   S_V <- a S_V + (1 - a) V_evicted

evicted frame i -> sink frame i mod sink_frames. Attention sees [sink; window] (Eq. 6-7) with RoPE
positions renumbered at every call (sink 0..S-1, the window's frames after it, the query chunk
last), so positions never exceed the window and a video can be as long as you like.

Modes (paper Table 3): 'ema' (default), 'static' (sink = first chunk, never updated: a = 1),
'none' (plain sliding window, no sink), 'full' (no eviction: dense causal context up to max_frames).

Positions, write indices and fill level live in small tensors updated between chunks, so the
model's per-chunk forward has no host sync, no data-dependent shape and no reallocation; it
compiles once per fill level and never again once the window is full.

Training streams through the same cache, kept differently (`grad='none'` or `'through'`): each slot holds
its frame's K/V as a tensor that is never written in place (a new chunk or an EMA fold replaces the
entry), and every call reads a frozen `Window` of them. So a gradient-checkpointed block that is
recomputed in backward sees exactly the cache its forward saw, however many slots were overwritten
and sink frames folded since, and autograd can follow the cache from chunk to chunk:
  - 'none': the cached K/V are constants. A chunk's loss reaches only its own exit-step forward.
  - 'through': the exact gradient of the rollout. The clean-context pass (t = 0) that writes a chunk's
    K/V runs with grad, and the EMA folds are differentiable (paper §3.4), so a later chunk's loss
    reaches every earlier chunk through the K/V it attended to (its t = 0 pass, that chunk's x0, its
    exit-step forward). The released Self Forcing / Reward Forcing code also lets later losses reach
    earlier chunks, differently: its exit-step forward writes K/V with grad into the cache in place and
    the t = 0 pass then overwrites the values under no_grad, so later chunks attend to the t = 0 K/V but
    their gradient is routed to the exit step's K/V (a straight-through estimate), and its 21-frame
    training cache never evicts, so no gradient passes an EMA fold.
"""

import torch

from dmd import FlowMatch

MODES = ("ema", "static", "none", "full")
GRADS = ("none", "through")  # how training's gradient treats the cache (module docstring)


def settings_error(s, frames=None, rope_len=None):
    """What is wrong with a script's streaming settings (s: its config, with chunk_frames, window_frames, sink_frames,
    sink_mode, alpha), as one line naming the setting and what it allows; None when they describe a cache. frames:
    the longest video in latent frames, rope_len: the model's RoPE positions (checked when both are given)."""
    if s.sink_mode not in MODES:
        return f"--sink_mode={s.sink_mode}: takes one of {', '.join(MODES)}"
    if s.chunk_frames < 1:
        return f"--chunk_frames={s.chunk_frames}: a chunk holds at least 1 latent frame (Reward Forcing: 3)"
    if s.sink_mode in ("ema", "static") and s.sink_frames < 1:
        return f"--sink_frames={s.sink_frames}: --sink_mode={s.sink_mode} needs a sink of at least 1 frame"
    if s.sink_frames < 0:
        return f"--sink_frames={s.sink_frames}: must be >= 0"
    if not 0.0 <= s.alpha <= 1.0:
        return f"--alpha={s.alpha}: the EMA momentum is in [0, 1] (paper: 0.999; 1 keeps the first chunk)"
    S = 0 if s.sink_mode == "none" else s.sink_frames
    if s.sink_mode != "full" and s.window_frames < S + s.chunk_frames:
        return (f"--window_frames={s.window_frames}: the window holds the sink ({S}) and the current chunk "
                f"({s.chunk_frames}), so at least {S + s.chunk_frames} (Reward Forcing: 9)")
    if frames is not None and rope_len is not None:
        if s.sink_mode == "full" and frames > rope_len:
            return (f"--sink_mode=full keeps all {frames} latent frames of --num_frames, more than the model's "
                    f"{rope_len} RoPE positions: use fewer frames or another --sink_mode")
        if s.sink_mode != "full" and s.window_frames > rope_len:
            return f"--window_frames={s.window_frames}: more than the model's {rope_len} RoPE positions"
    return None


# the streaming settings a student is trained with; one trained elsewhere (no record) is Reward Forcing's release
STREAM_SETTINGS = ("chunk_frames", "window_frames", "sink_frames", "sink_mode", "alpha")
RELEASED = {"chunk_frames": 3}


def settings_mismatch(trained, s):
    """Notes, one line each, where the streaming settings s differ from those the student was trained with (trained:
    its checkpoint's record of train.py's settings, or None). A student sees only the chunking it learned; a
    different cache is a legitimate ablation (paper Table 3), but the user should know."""
    rec, where = (trained, "its checkpoint records") if trained else (RELEASED, "Reward Forcing's released student uses")
    return [f"--{k}={getattr(s, k)} differs from the {rec[k]} {where}: expect artefacts if the student never saw it"
            for k in STREAM_SETTINGS if k in rec and rec[k] != getattr(s, k)]


class SinkCache:
    def __init__(self, model, batch, height, width, *, chunk_frames=3, window_frames=9, sink_frames=3, mode="ema",
                 alpha=0.999, max_frames=None, device=None, dtype=None, grad=None):
        """model: a WanModel (sizes, device and dtype are read from it); height, width: latent size.
        window_frames counts the sink and the current chunk (the paper's 9 = 3 sink + 3 previous + 3 current).
        grad: None for sampling (preallocated buffers written in place); 'none' or 'through' for training rollouts
        with gradient (per-frame tensors, never written in place; see the module docstring)."""
        cfg = model.cfg
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if grad not in (None, *GRADS):
            raise ValueError(f"grad must be None or one of {GRADS}, got {grad!r}")
        if cfg.patch_size[0] != 1:
            raise ValueError(f"streaming needs a temporal patch of 1, got patch_size={cfg.patch_size}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        p = next(model.parameters())
        device = p.device if device is None else device
        dtype = model.blocks[0].self_attn.k.weight.dtype if dtype is None else dtype
        C = chunk_frames
        S = 0 if mode == "none" else sink_frames
        if mode == "full":
            if max_frames is None:
                raise ValueError("mode='full' keeps every frame: give max_frames (the longest video, in latent frames)")
            R = max_frames - S
        else:
            R = window_frames - S
        if R < C:
            raise ValueError(f"the window ({S} sink + {R} ring frames) must hold a chunk of {C} frames beyond the sink")
        if S + R > cfg.rope_max_len:
            raise ValueError(f"{S + R} cached frames exceed the model's RoPE table ({cfg.rope_max_len} positions)")
        self.mode, self.alpha, self.C, self.S, self.R = mode, float(alpha), C, S, R
        self.T = (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])  # tokens per latent frame
        self.latent_shape = (batch, cfg.in_dim, C, height, width)
        L, H, Dh, T = cfg.num_layers, cfg.num_heads, cfg.head_dim, self.T
        kw = dict(device=device, dtype=dtype)
        self.device, self.dtype, self.grad = device, dtype, grad
        self.k = self.v = self.sink32 = self.kv = self.sink = None
        if grad is None:  # sampling: one preallocated buffer per layer, written in place
            self.k = torch.zeros(L, batch, (S + R) * T, H, Dh, **kw)  # un-roped keys: [sink | ring]
            self.v = torch.zeros(L, batch, (S + R) * T, H, Dh, **kw)
            # a low-precision cache cannot hold the EMA: with a = 0.999 the update (1 - a)(K - S) is below
            # half a bf16 ulp of S and would round away, so the sink's running state is kept in fp32
            if mode == "ema" and dtype != torch.float32:
                self.sink32 = torch.zeros(2, L, batch, S * T, H, Dh, device=device, dtype=torch.float32)
        else:  # training: per layer and slot, the (k, v) of one frame, (B, T, H, Dh) each; replaced, never written
            self.kv = [[None] * (S + R) for _ in range(L)]
            self.sink = [[None] * S for _ in range(L)]  # the sink frames' EMA state in fp32 (None: as in kv)
        self.ctx_k = torch.zeros(L, batch, cfg.text_len, H, Dh, **kw)  # the prompt's cross-attention K/V
        self.ctx_v = torch.zeros(L, batch, cfg.text_len, H, Dh, **kw)
        # the clean latents of the ring frames, for re-encoding them under a new prompt (recache)
        self.lat = torch.zeros(batch, cfg.in_dim, R, height, width, device=device, dtype=torch.float32)
        # per-call state read by the model: tensors updated in place, plus one host int
        self.write_idx = torch.zeros(C * T, dtype=torch.long, device=device)  # token rows of the current chunk
        self.q_fpos = torch.zeros(C, dtype=torch.long, device=device)  # RoPE frame positions of the chunk
        self.k_fpos = torch.zeros(S + R, dtype=torch.long, device=device)  # RoPE frame position of each slot
        self.k_fpos[:S] = torch.arange(S)  # the sink always sits at positions 0..S-1
        self.n_frames = 0  # slots [0, n_frames) are filled: attention reads a prefix of the buffers
        self.frames = 0  # frames written so far (the current chunk included once advance() ran)
        self._wrote_sink = False  # did the last chunk write sink rows (then sink32 must be refreshed)
        self._ar_c = torch.arange(C, device=device)
        self._ar_r = torch.arange(R, device=device)
        self._ar_t = torch.arange(T, device=device)

    @classmethod
    def from_settings(cls, model, s, batch, height, width, num_frames=None, dtype=None, grad=None):
        """The cache a script's settings describe, the one way train.py, sample.py and eval.py build it.
        s: any object with chunk_frames, window_frames, sink_frames, sink_mode, alpha (their config);
        height, width: latent size; num_frames: latent frames of the longest video (sizes the 'full' mode)."""
        return cls(model, batch, height, width, chunk_frames=s.chunk_frames, window_frames=s.window_frames,
                   sink_frames=s.sink_frames, mode=s.sink_mode, alpha=s.alpha,
                   max_frames=num_frames if s.sink_mode == "full" else None, dtype=dtype, grad=grad)

    # -- bookkeeping between chunks (eager, a handful of tiny kernels, no host sync) -----------------

    def slot(self, g):
        """Buffer slot of stream frame g (host int)."""
        return g if g < self.S else self.S + (g - self.S) % self.R

    def advance(self):
        """Make room for the next chunk: evict (and fold) the frames whose slots it takes, then set the
        write rows and the RoPE positions for it. Call once per chunk, before its first forward."""
        S, R, C, T = self.S, self.R, self.C, self.T
        f0, f1 = self.frames, self.frames + C
        if self.mode == "full" and f1 > S + R:
            raise RuntimeError(f"mode='full' was sized for max_frames={S + R} latent frames; chunk needs {f1}")
        if self.sink32 is not None and self._wrote_sink:  # the previous chunk wrote (part of) the sink
            self.sink32[0].copy_(self.k[:, :, : S * T])
            self.sink32[1].copy_(self.v[:, :, : S * T])
        self._wrote_sink = f0 < S
        self.write_slots = [self.slot(g) for g in range(f0, f1)]  # host ints, for the training store
        if self.mode != "full":
            for g in range(max(f0, S), f1):
                old = g - R  # the frame that held this ring slot
                if old >= S and self.mode == "ema":
                    self._fold(self.slot(old), (old - S) % S)
        self.frames, self.n_frames = f1, min(f1, S) + min(max(f1 - S, 0), R)
        # write rows: slot(g) for the chunk's frames g = f0 .. f1 - 1, computed on the device
        g = f0 + self._ar_c
        slots = torch.where(g < S, g, S + torch.remainder(g - S, R))
        self.write_idx.copy_((slots[:, None] * T + self._ar_t).flatten())
        # positions: sink frames 0..S-1, then the window's frames in time order, the chunk last
        oldest = max(S, f1 - R)  # the oldest stream frame still in the ring
        held = (f1 - 1) - torch.remainder((f1 - 1 - S) - self._ar_r, R)  # stream frame held by each ring slot
        self.k_fpos[S:].copy_((S + held - oldest).clamp_(min=0))
        self.q_fpos.copy_(torch.where(g < S, g, S + g - oldest))

    def _fold(self, src_slot, dst):
        """EMA of one evicted frame (ring slot src_slot) into sink frame dst, every layer at once (paper Eq. 4-5:
        S_K <- a S_K + (1 - a) K_evicted, and S_V alike)."""
        T, a = self.T, self.alpha
        if self.kv is not None:  # training: new tensors, so autograd can follow the fold ('through')
            for kv, sink in zip(self.kv, self.sink):
                ek, ev = kv[src_slot]
                sk, sv = sink[dst] if sink[dst] is not None else kv[dst]
                sink[dst] = (torch.lerp(sk.float(), ek.float(), 1 - a), torch.lerp(sv.float(), ev.float(), 1 - a))
                kv[dst] = (sink[dst][0].to(ek.dtype), sink[dst][1].to(ev.dtype))
            return
        src = slice(src_slot * T, (src_slot + 1) * T)
        dst_rows = slice(dst * T, (dst + 1) * T)
        if self.sink32 is None:
            self.k[:, :, dst_rows].lerp_(self.k[:, :, src], 1 - a)
            self.v[:, :, dst_rows].lerp_(self.v[:, :, src], 1 - a)
        else:
            self.sink32[0, :, :, dst_rows].lerp_(self.k[:, :, src].float(), 1 - a)
            self.sink32[1, :, :, dst_rows].lerp_(self.v[:, :, src].float(), 1 - a)
            self.k[:, :, dst_rows].copy_(self.sink32[0, :, :, dst_rows])
            self.v[:, :, dst_rows].copy_(self.sink32[1, :, :, dst_rows])

    def keep_latents(self, x0):
        """Remember a chunk's clean latents (B, C_in, C, h, w) in its ring slots, for recache()."""
        for i, g in enumerate(range(self.frames - self.C, self.frames)):
            if g >= self.S:
                self.lat[:, :, self.slot(g) - self.S].copy_(x0[:, :, i])

    # -- called by the model inside forward ---------------------------------------------------------

    def window(self, layer):
        """What layer `layer` of the next forward reads and writes: the cache itself when sampling (update() writes
        the buffers in place), a frozen Window of the current entries when training."""
        if self.kv is None:
            return self
        slots = self.write_slots  # entries the chunk replaces are not read: None, so nothing stale is held
        return Window(tuple(None if s in slots else e for s, e in enumerate(self.kv[layer][: self.n_frames])),
                      slots, self.T, self.dtype)

    def commit(self, layer, k, v):
        """Training, after layer `layer` ran: its new K/V (B, C*T, H, Dh), as the block returned them, become the
        entries of the chunk's slots (detached for grad='none')."""
        if self.grad == "none":
            k, v = k.detach(), v.detach()
        T = self.T
        for i, s in enumerate(self.write_slots):
            self.kv[layer][s] = (k[:, i * T : (i + 1) * T], v[:, i * T : (i + 1) * T])
            if s < self.S:
                self.sink[layer][s] = None  # a sink frame written anew: its EMA state starts from it

    def update(self, layer, k, v):
        """Sampling: write the current chunk's un-roped K/V (B, C*T, H, Dh) into its rows of this layer and return
        the keys and values attention reads: (B, n_frames*T, H, Dh), [sink | window], chunk included (paper
        Eq. 6-7: K_global = [S_K; K_window], V alike). Views of the buffers: no copy."""
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError("a forward with grad through a sampling cache: build the cache with grad='none' or "
                               "'through' (training's rollout), whose entries autograd can keep")
        n = self.n_frames * self.T
        self.k[layer].index_copy_(1, self.write_idx, k.to(self.k.dtype))  # autocast's norms may hand back fp32
        self.v[layer].index_copy_(1, self.write_idx, v.to(self.v.dtype))
        return self.k[layer, :, :n], self.v[layer, :, :n]

    # -- prompts ------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_prompt(self, model, context, recache=False):
        """Cross-attention K/V of a prompt, computed once and reused by every chunk. Switching the prompt
        mid-stream (paper Fig. 7) replaces them; recache=True also re-encodes the window's ring frames
        under the new prompt at t = 0, oldest first (LongLive's recache). The sink keeps its state: an
        EMA of evicted frames has no latents to re-encode."""
        k, v = model.cross_kv(context.to(self.ctx_k.device))
        self.ctx_k.copy_(k)
        self.ctx_v.copy_(v)
        if recache and self.frames > self.S:
            S, C = self.S, self.C
            ring = list(range(max(S, self.frames - self.R), self.frames))  # ring frames, oldest first
            if len(ring) % C:
                raise ValueError(f"recache replays whole chunks: {len(ring)} ring frames are not a multiple of "
                                 f"chunk_frames={C} (use sink and window sizes that are multiples of the chunk)")
            lat = torch.stack([self.lat[:, :, self.slot(g) - S] for g in ring], dim=2)
            self.frames = S  # replay the ring as if it were empty: no eviction, same positions
            t0 = torch.zeros(lat.shape[0], device=lat.device)
            for i in range(0, len(ring), C):
                self.advance()
                x0 = lat[:, :, i : i + C].to(next(model.parameters()).dtype)
                model(x0, t0, cache=self)
                self.keep_latents(x0.float())

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def buffers(self):
        return [t for t in (self.k, self.v, self.ctx_k, self.ctx_v, self.sink32, self.lat, self.write_idx,
                            self.q_fpos, self.k_fpos) if t is not None]


class Window:
    """One layer's cache as one training forward sees it: the entries of slots [0, n_frames), frozen (a tuple of
    tensors nobody writes), the slots the chunk writes, and, once update() ran, the chunk's new K/V, which the block
    returns for SinkCache.commit(). A gradient-checkpointed block keeps the Window as an argument and replays update()
    on it in backward, so its recomputation attends to what the forward attended to."""

    def __init__(self, entries, slots, T, dtype):
        self.entries, self.slots, self.T, self.dtype = entries, slots, T, dtype
        self.new = None

    def update(self, layer, k, v):
        """k, v (B, C*T, H, Dh) un-roped, with grad -> the keys and values attention reads, (B, n_frames*T, H, Dh)
        in slot order like the sampling buffers: the entries, with the chunk's frames at its slots."""
        k, v = k.to(self.dtype), v.to(self.dtype)
        self.new = (k, v)  # a recomputation in backward sets it again; only the forward's is committed
        T, at = self.T, {s: i for i, s in enumerate(self.slots)}
        ks = [k[:, at[s] * T : (at[s] + 1) * T] if s in at else e[0] for s, e in enumerate(self.entries)]
        vs = [v[:, at[s] * T : (at[s] + 1) * T] if s in at else e[1] for s, e in enumerate(self.entries)]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


# -----------------------------------------------------------------------------
# the rollout


def rollout(model, cache, num_chunks, *, context=None, timesteps=None, noise=None, exit_step=None, generator=None):
    """Autoregressive few-step generation, chunk by chunk; yields each chunk's clean latents
    (B, C_in, chunk_frames, h, w) as soon as they exist, so a caller can stream them out (or switch
    the prompt with cache.set_prompt between chunks).

    Per chunk (paper §3.1, Self Forcing): start from noise, run the few-step schedule with FRESH noise
    between steps (x = (1 - s') x0 + s' eps'), then one more forward of the clean chunk at t = 0 that
    writes its K/V into the cache.
    context: the prompt's text states, passed to every forward (training: works with DDP / FSDP wrappers, whose
    parameters only exist inside forward); None uses the K/V cached by cache.set_prompt (sampling).
    timesteps: the student's warped schedule (default FlowMatch(5).timesteps() = 1000, 937.5, 833.3, 625).
    noise: optional (B, C_in, num_chunks * chunk_frames, h, w) initial noise; drawn per chunk otherwise.
    exit_step: training's stochastic truncation (Self Forcing). Steps before it run without grad, the exit step
    keeps grad and its x0 prediction is the chunk's output. The cache pass runs with grad only for a cache built
    with grad='through', whose later chunks' losses then reach this chunk through the K/V it writes; with
    grad='none' the cached context is constant."""
    fm = FlowMatch()
    ts = fm.timesteps() if timesteps is None else list(timesteps)
    last = len(ts) - 1 if exit_step is None else exit_step
    B, Cin, C, h, w = cache.latent_shape
    dev = cache.device
    dtype = next(model.parameters()).dtype
    through = cache.grad == "through" and torch.is_grad_enabled()

    def randn():
        return torch.randn(B, Cin, C, h, w, device=dev, generator=generator)

    for i in range(num_chunks):
        cache.advance()
        x = randn() if noise is None else noise[:, :, i * C : (i + 1) * C].to(dev)
        for j in range(last + 1):
            t = torch.full((B,), ts[j], device=dev)
            with torch.set_grad_enabled(j == exit_step and torch.is_grad_enabled()):
                v = model(x.to(dtype), t, context, cache=cache).float()
                x0 = fm.x0_from_v(x, v, ts[j])
            if j < last:
                x = fm.add_noise(x0.detach(), randn(), ts[j + 1])
        with torch.set_grad_enabled(through):  # the clean chunk at t = 0 writes the K/V later chunks attend to
            model((x0 if through else x0.detach()).to(dtype), torch.zeros(B, device=dev), context, cache=cache)
        cache.keep_latents(x0.detach())
        yield x0
