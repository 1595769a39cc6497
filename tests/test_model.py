"""model.py (+ its layouts in weights.py): parity with diffusers' WanTransformer3DModel, checkpoint layouts,
chunk-causal mode, key tables."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import weights
from model import PRESETS, WanConfig, WanModel, apply_rope, rope_tables
from weights import CheckpointError, save_safetensors

diffusers = pytest.importorskip("diffusers")

TEXT_DIM, IN = 32, 4


def tiny_diffusers(seed=0):
    torch.manual_seed(seed)
    d = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=IN, out_channels=IN,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()
    with torch.no_grad():  # make norms and modulation non-trivial so a missing one would show
        for n, p in d.named_parameters():
            if "norm" in n or "scale_shift" in n:
                p.add_(0.3 * torch.randn_like(p))
    return d


def inputs(B=2, nF=3, H=6, W=8, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, IN, nF, H, W, generator=g)
    ctx = torch.randn(B, L, TEXT_DIM, generator=g)
    return x, ctx


def ref_out(d, x, t, ctx):
    """diffusers takes the context already zero-padded to 512 rows and timesteps per token."""
    B, _, nF, H, W = x.shape
    ctx512 = F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1]))
    if t.dim() == 2:
        t = t.repeat_interleave((H // 2) * (W // 2), dim=1)
    with torch.no_grad():
        return d(x, t, ctx512).sample


def assert_close(out, ref, rel=1e-4):
    err = (out - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max abs error {err:.3g} vs max |ref| {ref.abs().max().item():.3g}"


@pytest.fixture(scope="module")
def diff_dir(tmp_path_factory):
    d = tiny_diffusers()
    path = tmp_path_factory.mktemp("diffusers")
    d.save_pretrained(path)
    return d, path


def check_parity(d, m):
    x, ctx = inputs()
    t = torch.tensor([300.0, 871.0])  # a batch of 2 with different t
    with torch.no_grad():
        assert_close(m(x, t, ctx), ref_out(d, x, t, ctx))
        tf = torch.tensor([[20.0, 500.0, 999.0], [625.0, 0.0, 937.5]])  # per-frame timesteps
        assert_close(m(x, tf, ctx), ref_out(d, x, tf, ctx))


def test_parity_diffusers_layout(diff_dir):
    d, path = diff_dir
    m = WanModel.from_pretrained(path)
    assert m.cfg.num_heads == 4 and m.cfg.dim == 64 and m.cfg.text_len == 512
    check_parity(d, m)


def test_parity_after_convert_to_original_layout(diff_dir, tmp_path):
    d, path = diff_dir
    dst = tmp_path / "wan.safetensors"
    subprocess.run([sys.executable, "weights.py", "convert", "dit", str(path), str(dst)], check=True, capture_output=True)
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
    assert "blocks.0.self_attn.q.weight" in keys and "head.modulation" in keys and "blocks.1.norm3.bias" in keys
    assert not any(k.startswith(("condition_embedder", "proj_out", "scale_shift")) for k in keys)
    assert json.loads(meta["config"])["num_heads"] == 4
    check_parity(d, WanModel.from_pretrained(dst))


def test_generator_checkpoints(diff_dir, tmp_path):
    """Self Forcing / Reward Forcing: 'model.' prefix, dicts under generator / generator_ema."""
    d, path = diff_dir
    sd = WanModel.from_pretrained(path).state_dict()
    ema = {f"model.{k}": v + 1.0 for k, v in sd.items()}
    gen = {f"model.{k}": v for k, v in sd.items()}
    torch.save({"generator": gen, "generator_ema": ema}, tmp_path / "sf.pt")
    torch.save(gen, tmp_path / "rewardforcing.pt")  # flat pickle with the model. prefix
    torch.save({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "comfy.pt")
    m_ema = WanModel.from_pretrained(tmp_path / "sf.pt", num_heads=4)  # generator_ema preferred
    m_gen = WanModel.from_pretrained(tmp_path / "sf.pt", key="generator", num_heads=4)
    assert torch.equal(m_ema.blocks[1].ffn[2].weight, sd["blocks.1.ffn.2.weight"] + 1.0)
    assert torch.equal(m_gen.blocks[1].ffn[2].weight, sd["blocks.1.ffn.2.weight"])
    check_parity(d, WanModel.from_pretrained(tmp_path / "rewardforcing.pt", num_heads=4))
    check_parity(d, WanModel.from_pretrained(tmp_path / "comfy.pt", num_heads=4))
    # without a config the heads default to Wan's 128 channels: 64 // 128 = 0 -> a clear error, not a crash
    with pytest.raises(CheckpointError, match="rewardforcing.pt: cannot split dim 64 into 0 heads.*num_heads="):
        WanModel.from_pretrained(tmp_path / "rewardforcing.pt")


def test_bf16_load_keeps_time_path_fp32(diff_dir):
    d, path = diff_dir
    m = WanModel.from_pretrained(path, dtype=torch.bfloat16)
    assert m.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert m.blocks[0].modulation.dtype == torch.float32 and m.head.modulation.dtype == torch.float32
    assert m.time_embedding[0].weight.dtype == torch.float32 and m.time_projection[1].weight.dtype == torch.float32
    x, ctx = inputs()
    t = torch.tensor([300.0, 871.0])
    with torch.no_grad():
        out = m(x, t, ctx)
    assert out.dtype == torch.float32
    assert_close(out, ref_out(d, x, t, ctx), rel=0.05)


def test_per_frame_t_equals_per_sample_t():
    m = WanModel(PRESETS["tiny"]).eval()
    x = torch.randn(2, 16, 3, 4, 4)
    ctx = torch.randn(2, 5, 32)
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        a = m(x, t, ctx)
        b = m(x, t[:, None].expand(2, 3).contiguous(), ctx)
        c = m(x, torch.tensor([[250.0, 250.0, 100.0], [750.0] * 3]), ctx)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a[0], c[0], atol=1e-3)  # and the per-frame path really is per frame


def test_rope_matches_float64_complex():
    D, L = 128, 1024
    cos, sin = rope_tables(D, L)
    x = torch.randn(1, L, 2, D)
    out = apply_rope(x, cos, sin)
    # independent reference: complex rotation in float64, frequencies per axis split 44/42/42
    pos = torch.arange(L, dtype=torch.float64)
    freqs = torch.cat([1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in (44, 42, 42)])
    rot = torch.polar(torch.ones(L, D // 2, dtype=torch.float64), pos[:, None] * freqs)
    xc = torch.view_as_complex(x.double().reshape(1, L, 2, D // 2, 2))
    ref = torch.view_as_real(xc * rot[None, :, None]).reshape(1, L, 2, D)
    assert (out.double() - ref).abs().max().item() < 1e-6 * max(1.0, ref.abs().max().item())
    assert (cos.double() - torch.cos(pos[:, None] * freqs)).abs().max() < 1e-6


def test_chunk_causal_mask():
    torch.manual_seed(0)
    m = WanModel(PRESETS["tiny"]).eval()
    C = 3
    x = torch.randn(1, 16, 15, 4, 4)
    ctx = torch.randn(1, 5, 32)
    t = torch.tensor([500.0])
    for W, S in [(None, 0), (9, 3), (6, 0)]:
        with torch.no_grad():
            base = m(x, t, ctx, chunk_frames=C, window_frames=W, sink_frames=S)
            later = x.clone()
            later[:, :, 9:] += 1.0  # change chunks 3 and 4
            y = m(later, t, ctx, chunk_frames=C, window_frames=W, sink_frames=S)
            assert torch.equal(y[:, :, :9], base[:, :, :9]), "a chunk saw a later chunk"
            assert (y[:, :, 9:] - base[:, :, 9:]).abs().max() > 1e-3
            earlier = x.clone()
            earlier[:, :, 3:6] += 1.0  # change chunk 1
            y = m(earlier, t, ctx, chunk_frames=C, window_frames=W, sink_frames=S)
            assert (y[:, :, 6:9] - base[:, :, 6:9]).abs().max() > 1e-3, "chunk 2 ignored chunk 1"
            assert torch.equal(y[:, :, :3], base[:, :, :3])
            first = x.clone()
            first[:, :, :3] += 1.0  # change chunk 0: the sink, or outside a sink-less window
            y = m(first, t, ctx, chunk_frames=C, window_frames=W, sink_frames=S)
            moved = (y[:, :, 12:] - base[:, :, 12:]).abs().max().item()
            if W is not None and S == 0:
                assert moved == 0.0, "a sliding window without sink saw a frame outside it"
            else:
                assert moved > 1e-3, "the last chunk did not see the first (sink) chunk"
    # with no mask the same call is bidirectional: chunk 0 depends on later frames
    with torch.no_grad():
        assert (m(later, t, ctx)[:, :, :3] - m(x, t, ctx)[:, :, :3]).abs().max() > 1e-3


# Wan2.1-T2V-1.3B's checkpoint (825 tensors) and diffusers' WanTransformer3DModel: original name, diffusers name,
# 1.3B shape (N = block index)
TABLE = [
    ("patch_embedding.weight", "patch_embedding.weight", (1536, 16, 1, 2, 2)),
    ("patch_embedding.bias", "patch_embedding.bias", (1536,)),
    ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight", (1536, 4096)),
    ("text_embedding.2.weight", "condition_embedder.text_embedder.linear_2.weight", (1536, 1536)),
    ("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight", (1536, 256)),
    ("time_embedding.2.weight", "condition_embedder.time_embedder.linear_2.weight", (1536, 1536)),
    ("time_projection.1.weight", "condition_embedder.time_proj.weight", (9216, 1536)),
    ("blocks.N.self_attn.q.weight", "blocks.N.attn1.to_q.weight", (1536, 1536)),
    ("blocks.N.self_attn.k.bias", "blocks.N.attn1.to_k.bias", (1536,)),
    ("blocks.N.self_attn.v.weight", "blocks.N.attn1.to_v.weight", (1536, 1536)),
    ("blocks.N.self_attn.o.weight", "blocks.N.attn1.to_out.0.weight", (1536, 1536)),
    ("blocks.N.self_attn.norm_q.weight", "blocks.N.attn1.norm_q.weight", (1536,)),
    ("blocks.N.self_attn.norm_k.weight", "blocks.N.attn1.norm_k.weight", (1536,)),
    ("blocks.N.cross_attn.q.weight", "blocks.N.attn2.to_q.weight", (1536, 1536)),
    ("blocks.N.cross_attn.o.bias", "blocks.N.attn2.to_out.0.bias", (1536,)),
    ("blocks.N.cross_attn.norm_k.weight", "blocks.N.attn2.norm_k.weight", (1536,)),
    ("blocks.N.norm3.weight", "blocks.N.norm2.weight", (1536,)),
    ("blocks.N.norm3.bias", "blocks.N.norm2.bias", (1536,)),
    ("blocks.N.ffn.0.weight", "blocks.N.ffn.net.0.proj.weight", (8960, 1536)),
    ("blocks.N.ffn.2.weight", "blocks.N.ffn.net.2.weight", (1536, 8960)),
    ("blocks.N.modulation", "blocks.N.scale_shift_table", (1, 6, 1536)),
    ("head.head.weight", "proj_out.weight", (64, 1536)),
    ("head.modulation", "scale_shift_table", (1, 2, 1536)),
]


@pytest.mark.parametrize("name,layers,dim,ffn", [("wan2.1-t2v-1.3b", 30, 1536, 8960), ("wan2.1-t2v-14b", 40, 5120, 13824)])
def test_full_size_key_tables(name, layers, dim, ffn):
    with torch.device("meta"):
        sd = {k: tuple(v.shape) for k, v in WanModel(PRESETS[name]).state_dict().items()}
    assert len(sd) == 27 * layers + 15  # 825 tensors for the 1.3B checkpoint
    scale = {1536: dim, 8960: ffn, 9216: 6 * dim}
    for orig, _, shape in TABLE:
        shape = tuple(scale.get(s, s) for s in shape)
        for n in (0, layers - 1):
            assert sd[orig.replace("N", str(n))] == shape, orig
    assert f"blocks.{layers}.ffn.0.weight" not in sd
    # diffusers' own model of the same size maps key for key onto ours through the rename table
    cfg = PRESETS[name]
    with torch.device("meta"):
        d = diffusers.WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=128, ffn_dim=ffn,
                                            num_layers=layers, text_dim=4096, freq_dim=256)
    dsd = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    for orig, diff, _ in TABLE:
        assert diff.replace("N", "0") in dsd, diff
    ckpt = weights.Tensors("diffusers")
    for k, shape in dsd.items():
        ckpt.add(k, shape, read=None)
    assert ckpt.rename(weights.DIT_DIFFUSERS).shapes() == sd


@pytest.fixture()
def tiny_sd():
    torch.manual_seed(0)
    return WanModel(PRESETS["tiny"]).state_dict()


def write(sd, path, cfg=PRESETS["tiny"]):
    save_safetensors(sd, str(path), cfg)
    return path


def test_bad_checkpoints(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    sd.pop("blocks.1.cross_attn.k.weight")
    with pytest.raises(CheckpointError, match=r"(?s)bad1\.safetensors.*missing.*blocks\.1\.cross_attn\.k\.weight"):
        WanModel.from_pretrained(write(sd, tmp_path / "bad1.safetensors"))
    sd = dict(tiny_sd, **{"blocks.0.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"(?s)bad2\.safetensors.*unexpected.*blocks\.0\.extra\.weight"):
        WanModel.from_pretrained(write(sd, tmp_path / "bad2.safetensors"))
    sd = dict(tiny_sd, **{"blocks.0.ffn.2.bias": torch.zeros(65)})
    with pytest.raises(CheckpointError, match=r"(?s)bad3\.safetensors.*mis-shaped.*blocks\.0\.ffn\.2\.bias: \(65,\)"):
        WanModel.from_pretrained(write(sd, tmp_path / "bad3.safetensors"))
    (tmp_path / "notes.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.safetensors: not a readable safetensors"):
        WanModel.from_pretrained(tmp_path / "notes.safetensors")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: not a torch checkpoint"):
        WanModel.from_pretrained(tmp_path / "notes.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt: no such file"):
        WanModel.from_pretrained(tmp_path / "nowhere.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no .safetensors weights"):
        WanModel.from_pretrained(tmp_path / "empty")
    torch.save({"step": torch.tensor(3)}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="opt.pt: missing key 'patch_embedding.weight'"):
        WanModel.from_pretrained(tmp_path / "opt.pt")


def test_config_json_checked_against_tensors(tiny_sd, tmp_path):
    d = tmp_path / "wan"
    d.mkdir()
    save_safetensors(tiny_sd, str(d / "diffusion_pytorch_model.safetensors"))
    cfg = {"dim": 64, "ffn_dim": 128, "num_heads": 4, "num_layers": 3, "text_len": 16}  # 3 layers is wrong
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config says num_layers=3 but the tensors give num_layers=2"):
        WanModel.from_pretrained(d)
    cfg["num_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    m = WanModel.from_pretrained(d)
    assert m.cfg == WanConfig(**{**vars(PRESETS["tiny"])})
    assert all(torch.equal(m.state_dict()[k], v) for k, v in tiny_sd.items())
    assert m.rope_cos.device.type == "cpu" and math.isclose(m.rope_cos[1, 0].item(), math.cos(1.0), abs_tol=1e-7)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = WanModel(PRESETS["tiny"])
    x, ctx = torch.randn(2, 16, 6, 4, 4), torch.randn(2, 5, 32)
    t = torch.tensor([[100.0] * 3 + [700.0] * 3, [900.0] * 6])
    grads = []
    for ckpt in (False, True):
        m.grad_ckpt = ckpt
        m.zero_grad()
        m(x, t, ctx, chunk_frames=3, window_frames=9, sink_frames=3).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
    assert grads[0]["blocks.0.self_attn.q.weight"].abs().sum() > 0


def test_training_folders_pick_one_file(tiny_sd, tmp_path):
    stage = tmp_path / "redmd"
    ck = stage / "step_000004"
    ck.mkdir(parents=True)
    bumped = {k: v + 1 for k, v in tiny_sd.items()}
    save_safetensors(tiny_sd, str(ck / "generator.safetensors"), PRESETS["tiny"])
    save_safetensors(bumped, str(ck / "generator_ema.safetensors"), PRESETS["tiny"])
    save_safetensors({k: v * 2 for k, v in tiny_sd.items()}, str(ck / "critic.safetensors"), PRESETS["tiny"])
    (stage / "latest").write_text("step_000004")
    w = "blocks.0.ffn.0.weight"
    assert torch.equal(WanModel.from_pretrained(stage).state_dict()[w], bumped[w])  # latest -> generator_ema
    assert torch.equal(WanModel.from_pretrained(ck, key="generator").state_dict()[w], tiny_sd[w])
    assert torch.equal(WanModel.from_pretrained(ck, key="critic").state_dict()[w], 2 * tiny_sd[w])
    other = tmp_path / "two"
    other.mkdir()
    save_safetensors(tiny_sd, str(other / "a.safetensors"))
    save_safetensors(tiny_sd, str(other / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"two: holds \['a.safetensors', 'b.safetensors'\]; pass key="):
        WanModel.from_pretrained(other)


def test_init_weights_is_wans():
    torch.manual_seed(0)
    m = WanModel(PRESETS["tiny"]).init_weights()
    assert torch.equal(m.head.head.weight, torch.zeros_like(m.head.head.weight))
    assert torch.equal(m.blocks[0].ffn[0].bias, torch.zeros_like(m.blocks[0].ffn[0].bias))
    w = m.blocks[0].self_attn.q.weight  # xavier uniform: |w| <= sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (2 * 64)) ** 0.5 and w.std() > 0.5 * (2 / (2 * 64)) ** 0.5
    assert abs(m.text_embedding[0].weight.std().item() - 0.02) < 0.002
    with torch.no_grad():
        assert m(torch.randn(1, 16, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 4, 32)).abs().max() == 0
