"""Tests for reward.py: MotionReward, and VideoAlign's reward model (parity with transformers' Qwen2-VL on a tiny
random config, LoRA merge and checkpoint loading, preprocessing, chat format, template refusal, z-score)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import weights
from qwen2vl import (CLIP_MEAN, CLIP_STD, QWEN_PRESETS, VideoAlignModel, patchify, preprocess_video,
                     sample_frame_indices, smart_resize)
from reward import REWARD_NORM, REWARD_TOKENS, MotionReward, QwenChat, VideoAlignReward
from weights import VIDEOALIGN_WHERE, CheckpointError, main, merge_lora


def ours_from_hf(sd, cfg, src):
    """A transformers Qwen2-VL state dict through weights.py's Qwen2-VL renames, checked strictly against ours."""
    ckpt = weights.Tensors.of(sd, src).rename(weights.QWEN_NEWER, weights.QWEN_PREFIXES).drop(r"^lm_head\.")
    with torch.device("meta"):
        weights.check(ckpt, VideoAlignModel(cfg), "a VideoAlignModel")
    return ckpt.materialise()

TINY = QWEN_PRESETS["tiny"]  # video_token_id 45, reward tokens 46-48, vocab 49
VS, VE, VID = 43, 44, 45  # <|vision_start|>, <|vision_end|>, <|video_pad|> in the tiny vocab
LLM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomise(model, seed=0):
    """Unit-gain random weights; norm scales around 1 and random biases, so a skipped norm or bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1 + 0.5 * r)
            elif p.dim() >= 2 and "embed_tokens" not in name:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_(r if "embed_tokens" in name else 0.1 * r)
    return model


def tiny_inputs(seed=0):
    """Two videos of grid (2, 4, 6) -> 12 merged tokens each, and two sequences holding them and 3 reward tokens."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[2, 4, 6], [2, 4, 6]])
    pv = torch.randn(96, 3 * 2 * 14 * 14, generator=g)
    rows = []
    for b in range(2):
        text = torch.randint(0, 39, (30,), generator=g).tolist()
        rows.append(text[: 5 + b] + [VS] + [VID] * 12 + [VE] + text[5 + b : 12] + [46] + text[12:18] + [47]
                    + text[18 : 24 - b] + [48] + text[24 - b :])
    L = max(map(len, rows))
    return torch.tensor([r + [0] * (L - len(r)) for r in rows]), pv, grid


# ----------------------------------------------------------------------------- MotionReward


def test_motion_reward_static_scores_below_moving():
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(1, 3, 1, 16, 16, generator=g) * 2 - 1
    static = frame.expand(-1, -1, 6, -1, -1)
    moving = torch.rand(1, 3, 6, 16, 16, generator=g) * 2 - 1
    r = MotionReward()(torch.cat([static, moving]))
    assert r.shape == (2,) and r.dtype == torch.float32 and r[0] < r[1]


def test_motion_reward_is_z_scored_against_running_statistics():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(4, 3, 5, 8, 8, generator=g) * s for s in (0.5, 1.5, 1.0))
    rw = MotionReward(momentum=0.9, min_std=0.0)
    sa, sb, sc = rw.raw(a), rw.raw(b), rw.raw(c)
    ra = rw(a)
    assert torch.allclose(ra, (sa - sa.mean()) / sa.var(unbiased=False).sqrt(), atol=1e-5)  # first call: its own stats
    rb = rw(b)
    both = torch.cat([sa, sb])  # 8 < 1/(1 - 0.9) samples: the stats are exactly those of everything seen
    assert math.isclose(rw.mean, both.mean().item(), rel_tol=1e-5)
    assert math.isclose(rw.var, both.var(unbiased=False).item(), rel_tol=1e-5)
    assert torch.allclose(rb, (sb - both.mean()) / both.var(unbiased=False).sqrt(), atol=1e-5)
    rw.count = 1000  # past the window: an EMA with the momentum, the variance of the two-part mixture
    m, v = rw.mean, rw.var
    rc = rw(c)
    m2 = 0.9 * m + 0.1 * sc.mean().item()
    v2 = 0.9 * v + 0.1 * sc.var(unbiased=False).item() + 0.09 * (m - sc.mean().item()) ** 2
    assert math.isclose(rw.mean, m2, rel_tol=1e-6) and math.isclose(rw.var, v2, rel_tol=1e-6)
    assert torch.allclose(rc, (sc - m2) / math.sqrt(v2), atol=1e-5)


def test_motion_reward_std_floor():
    """A batch of identical videos has variance 0: the floor gives finite scores (0, not 0/0), and a later batch
    is scored in units of at least min_std."""
    g = torch.Generator().manual_seed(3)
    v = torch.rand(1, 3, 5, 8, 8, generator=g)
    rw = MotionReward(min_std=0.1)
    z = rw(torch.cat([v, v]))
    assert rw.var == 0.0 and torch.equal(z, torch.zeros(2))
    w = torch.cat([v, v * 1.01])
    s = rw.raw(w)
    z = rw(w)
    assert rw.var**0.5 < 0.1  # still below the floor, so the floor sets the scale
    assert torch.allclose(z, (s - rw.mean) / 0.1, atol=1e-6)


def test_motion_reward_state_dict_round_trip_is_exact():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.rand(3, 3, 4, 8, 8, generator=g) for _ in range(2))
    r1 = MotionReward()
    r1(a)
    r2 = MotionReward()
    r2.load_state_dict(json.loads(json.dumps(r1.state_dict())))  # plain floats: survives any checkpoint format
    assert torch.equal(r1(b), r2(b))


# ----------------------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def hf_tiny():
    """transformers' Qwen2VLForConditionalGeneration with the tiny sizes, random weights, eager attention."""
    transformers = pytest.importorskip("transformers")
    c = TINY
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.mlp, num_hidden_layers=c.layers,
                         num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, rms_norm_eps=c.eps,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, "mrope_section": [2, 2, 2]},
                         bos_token_id=None, eos_token_id=None, pad_token_id=None),
        vision_config=dict(depth=c.vis_depth, embed_dim=c.vis_dim, hidden_size=c.dim, num_heads=c.vis_heads,
                           mlp_ratio=c.vis_mlp // c.vis_dim, patch_size=c.patch_size,
                           temporal_patch_size=c.temporal_patch, spatial_merge_size=c.merge),
        image_token_id=42, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return randomise(transformers.Qwen2VLForConditionalGeneration(cfg).eval())


def test_parity_with_transformers_qwen2vl(hf_tiny):
    """Our tower, final hidden states and reward head against transformers' Qwen2-VL with its M-RoPE forced to 1-D
    positions (all three rows = arange(L)); its state dict (transformers 5 layout) goes through our rename table."""
    sd = dict(hf_tiny.state_dict())
    sd["rm_head.weight"] = torch.randn(1, TINY.dim, generator=torch.Generator().manual_seed(5))
    sd = ours_from_hf(sd, TINY, "hf")
    ours = VideoAlignModel(TINY).eval()
    ours.load_state_dict(sd, strict=True)
    ids, pv, grid = tiny_inputs()
    B, L = ids.shape
    with torch.no_grad():
        ref_vis = hf_tiny.model.visual(pv, grid_thw=grid).pooler_output
        pos = torch.arange(L).view(1, 1, L).expand(3, B, L)
        ref_h = hf_tiny.model(input_ids=ids, pixel_values_videos=pv, video_grid_thw=grid, position_ids=pos).last_hidden_state
        vis, h, r = ours.visual(pv, grid), ours.hidden_states(ids, pv, grid), ours(ids, pv, grid)
    at = torch.stack([torch.nonzero(torch.isin(row, torch.tensor([46, 47, 48]))).flatten() for row in ids])  # (B, 3)
    ref_r = (ref_h[torch.arange(B)[:, None], at] @ sd["rm_head.weight"].T)[..., 0]
    errs = rel(vis, ref_vis), rel(h, ref_h), rel(r, ref_r)
    print(f"parity relative errors: vision {errs[0]:.2e}, hidden {errs[1]:.2e}, reward {errs[2]:.2e}")
    assert vis.shape == (24, TINY.dim) and h.shape == (B, L, TINY.dim) and r.shape == (B, 3)
    assert max(errs) <= 1e-4, errs
    # the 1-D positions matter: transformers' own multimodal 3-D RoPE gives different states
    with torch.no_grad():
        mrope = hf_tiny.model(input_ids=ids, pixel_values_videos=pv, video_grid_thw=grid,
                              mm_token_type_ids=(ids == VID).int() * 2).last_hidden_state
    assert rel(h, mrope) > 1e-2


# ----------------------------------------------------------------------------- LoRA merge and checkpoint loading

R, ALPHA = 4, 8.0  # scale alpha / r = 2


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A fake VideoAlign checkpoint built from a tiny model: PEFT-wrapped names, LoRA A/B on every LLM Linear
    (base at .base_layer.), an lm_head, model_config.json beside checkpoint-11352/. Returns (path, base model, lora)."""
    base = randomise(VideoAlignModel(TINY).eval(), seed=1)
    g = torch.Generator().manual_seed(2)
    sd, lora = {}, {}
    for k, v in base.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if k.startswith("model.layers.") and mod.split(".", 3)[3] in LLM_LINEARS:
            sd[f"base_model.model.{mod}.base_layer.{k.rsplit('.', 1)[1]}"] = v.clone()
            if k.endswith(".weight"):
                A = torch.randn(R, v.shape[1], generator=g) / math.sqrt(v.shape[1])
                B = 0.3 * torch.randn(v.shape[0], R, generator=g)
                lora[mod] = (A, B)
                sd[f"base_model.model.{mod}.lora_A.default.weight"] = A
                sd[f"base_model.model.{mod}.lora_B.default.weight"] = B
        else:
            sd[f"base_model.model.{k}"] = v.clone()
    sd["base_model.model.lm_head.weight"] = base.state_dict()["model.embed_tokens.weight"].clone()
    root = tmp_path_factory.mktemp("VideoReward")
    (root / "checkpoint-11352").mkdir()
    torch.save(sd, root / "checkpoint-11352" / "model.pth")
    (root / "model_config.json").write_text(json.dumps({"peft_lora_config": {"lora_r": R, "lora_alpha": ALPHA}}))
    return root / "checkpoint-11352" / "model.pth", base, lora, sd


def test_lora_merge_equals_base_plus_adapter(official):
    path, base, lora, _ = official
    merged = VideoAlignModel.from_pretrained(path, config="tiny")  # alpha from model_config.json
    for mod, (A, B) in lora.items():
        W = base.get_submodule(mod).weight
        assert torch.allclose(merged.get_submodule(mod).weight, W + (ALPHA / R) * B @ A, atol=1e-6)
    # the adapter run unmerged on the base model: y = base(x) + (alpha / r) (x A^T) B^T
    hooks = [base.get_submodule(mod).register_forward_hook(
        lambda m, inp, out, A=A, B=B: out + (ALPHA / R) * (inp[0] @ A.T) @ B.T) for mod, (A, B) in lora.items()]
    ids, pv, grid = tiny_inputs(seed=3)
    with torch.no_grad():
        ref_h, ref_r = base.hidden_states(ids, pv, grid), base(ids, pv, grid)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        h, r = merged.hidden_states(ids, pv, grid), merged(ids, pv, grid)
        plain = base(ids, pv, grid)
    assert rel(h, ref_h) < 1e-5 and rel(r, ref_r) < 1e-5
    assert rel(plain, ref_r) > 1e-3  # the adapter matters
    other = VideoAlignModel.from_pretrained(path.parent.parent, config="tiny", lora_alpha=2 * ALPHA)  # root folder
    mod, (A, B) = next(iter(lora.items()))
    assert torch.allclose(other.get_submodule(mod).weight, base.get_submodule(mod).weight + (2 * ALPHA / R) * B @ A, atol=1e-6)


def test_lora_merge_of_an_embedding_and_modules_to_save():
    """Not in the released checkpoint as far as its config shows, but handled: PEFT's embedding LoRA (the looked-up
    row gains A^T[id] B^T scaled) and modules_to_save copies replacing their originals."""
    g = torch.Generator().manual_seed(7)
    W, A, B = torch.randn(10, 6, generator=g), torch.randn(3, 10, generator=g), torch.randn(6, 3, generator=g)
    sd = {"m.embed_tokens.base_layer.weight": W, "m.embed_tokens.lora_embedding_A.default": A,
          "m.embed_tokens.lora_embedding_B.default": B, "rm_head.original_module.weight": torch.zeros(1, 6),
          "rm_head.modules_to_save.default.weight": torch.ones(1, 6)}
    out = merge_lora(sd, alpha=6.0, src="x")
    ids = torch.tensor([0, 4, 9])
    peft = W[ids] + (A.T[ids] @ B.T) * (6.0 / 3)  # PEFT's Embedding forward
    assert set(out) == {"m.embed_tokens.weight", "rm_head.weight"}
    assert torch.allclose(out["m.embed_tokens.weight"][ids], peft, atol=1e-6) and torch.equal(out["rm_head.weight"], torch.ones(1, 6))


def test_convert_then_load_safetensors(official, tmp_path):
    path, *_ = official
    from_pth = VideoAlignModel.from_pretrained(path, config="tiny")
    main(["convert", "videoalign", str(path), str(tmp_path / "va.safetensors"), "--config", "tiny"])
    m = VideoAlignModel.from_pretrained(tmp_path / "va.safetensors")  # config from the metadata
    assert m.cfg == TINY and "lm_head.weight" not in m.state_dict()
    assert all(torch.equal(v, from_pth.state_dict()[k]) for k, v in m.state_dict().items())
    ids, pv, grid = tiny_inputs(seed=4)
    bf = VideoAlignModel.from_pretrained(tmp_path / "va.safetensors", dtype=torch.bfloat16)
    with torch.no_grad():
        r32, r16 = m(ids, pv, grid), bf(ids, pv, grid)
    assert bf.model.norm.weight.dtype == torch.bfloat16 and r16.dtype == torch.float32
    assert rel(r16, r32) < 0.1


def test_bad_checkpoints_give_clear_errors(official, tmp_path):
    _, _, _, sd = official

    def write(d, name):
        torch.save(d, tmp_path / name)
        return tmp_path / name

    bad = {k: v for k, v in sd.items() if k != "base_model.model.visual.blocks.1.attn.qkv.bias"}
    with pytest.raises(CheckpointError, match=r"(?s)bad1\.pth.*1 missing: visual\.blocks\.1\.attn\.qkv\.bias"):
        VideoAlignModel.from_pretrained(write(bad, "bad1.pth"), config="tiny", lora_alpha=ALPHA)
    bad = dict(sd, **{"base_model.model.rm_head.weight": torch.zeros(1, TINY.dim + 1),
                      "base_model.model.visual.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"(?s)bad2\.pth.*1 unexpected: base_model\.model\.visual\.extra\.weight "
                                              r"\[visual\.extra\.weight\].*1 mis-shaped: base_model\.model\.rm_head\.weight "
                                              r"\[rm_head\.weight\]: \(1, 49\) != expected \(1, 48\)"):
        VideoAlignModel.from_pretrained(write(bad, "bad2.pth"), config="tiny", lora_alpha=ALPHA)
    bad = {k: v for k, v in sd.items() if k != "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"}
    with pytest.raises(CheckpointError, match=r"bad3\.pth: incomplete LoRA for 'base_model\.model\.model\.layers\.0\.mlp\.up_proj'"):
        VideoAlignModel.from_pretrained(write(bad, "bad3.pth"), config="tiny", lora_alpha=ALPHA)
    with pytest.raises(CheckpointError, match=r"(?s)model\.pth.*does not match a VideoAlignModel \(preset 'qwen2-vl-2b'\).*missing"):
        VideoAlignModel.from_pretrained(official[0])  # the tiny file against the full-size default
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth: not a torch checkpoint"):
        VideoAlignModel.from_pretrained(tmp_path / "notes.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth: no such file.*Hugging Face KlingTeam/VideoReward.*"
                                                "GitHub KlingAIResearch/VideoAlign"):
        VideoAlignModel.from_pretrained(tmp_path / "nowhere.pth")
    with pytest.raises(CheckpointError, match="no model.pth here or in a checkpoint-NNNN/ folder.*KlingTeam/VideoReward"):
        VideoAlignModel.from_pretrained(tmp_path)
    assert "KlingTeam/VideoReward" in VIDEOALIGN_WHERE and "KlingAIResearch/VideoAlign" in VIDEOALIGN_WHERE


def fake_release(root, sd, model_config=None):
    """VideoAlign's folder layout: root/checkpoint-11352/model.pth and, when given, root/model_config.json."""
    (root / "checkpoint-11352").mkdir(parents=True)
    torch.save(sd, root / "checkpoint-11352" / "model.pth")
    if model_config is not None:
        (root / "model_config.json").write_text(json.dumps(model_config))
    return root / "checkpoint-11352" / "model.pth"


def reward_at(ids):
    """(B, 3) positions of the tiny reward tokens 46, 47, 48 in each row."""
    return torch.stack([torch.nonzero(torch.isin(row, torch.tensor([46, 47, 48]))).flatten() for row in ids])


LORA_JSON = {"peft_lora_config": {"lora_r": R, "lora_alpha": ALPHA}}


def test_rm_head_width_1_or_3_is_read_from_the_checkpoint(official, tiny_files, tmp_path):
    """The width comes from rm_head.weight (and agrees with model_config.output_dim when stated). Width 1 (the
    release): score i = h[reward token i] . w. Width 3 (VideoAlign's training script): score i = h[reward token i] .
    w_i, the diagonal, so VQ / MQ / TA each have their own row. Both survive convert."""
    path1, _, _, sd = official
    w3 = torch.randn(3, TINY.dim, generator=torch.Generator().manual_seed(11))
    path3 = fake_release(tmp_path / "w3", dict(sd, **{"base_model.model.rm_head.weight": w3}),
                         dict(LORA_JSON, model_config={"output_dim": 3, "use_special_tokens": True}))
    m1 = VideoAlignModel.from_pretrained(path1, config="tiny")
    m3 = VideoAlignModel.from_pretrained(path3, config="tiny")  # the preset says 1; the file says 3
    assert m1.cfg.reward_dim == 1 and m3.cfg.reward_dim == 3 and m3.rm_head.weight.shape == (3, TINY.dim)
    ids, pv, grid = tiny_inputs(seed=8)
    with torch.no_grad():
        h = m3.hidden_states(ids, pv, grid)  # the same network below the head in both
        r1, r3 = m1(ids, pv, grid), m3(ids, pv, grid)
    at = h[torch.arange(2)[:, None], reward_at(ids)]  # (B, 3, D): the states at <|VQ|>, <|MQ|>, <|TA|>
    w1 = m1.rm_head.weight[0]
    assert r1.shape == r3.shape == (2, 3)
    assert torch.allclose(r1, at @ w1, atol=1e-5)
    assert torch.allclose(r3, torch.stack([at[:, i] @ w3[i] for i in range(3)], 1), atol=1e-5)
    assert not torch.allclose(r3, at @ w3[0], atol=1e-3)  # not one row read everywhere
    main(["convert", "videoalign", str(path3), str(tmp_path / "w3.safetensors"), "--config", "tiny"])
    rw = VideoAlignReward.from_pretrained(tmp_path / "w3.safetensors", *tiny_files)
    assert rw.model.cfg.reward_dim == 3
    pixels = torch.rand(2, 3, 5, 28, 56, generator=torch.Generator().manual_seed(9)) * 2 - 1
    raw = rw.score(pixels, ["a cat", "dog"])
    ids, pv, grid = rw.inputs(pixels, ["a cat", "dog"])
    with torch.no_grad():
        at = rw.model.hidden_states(ids, pv, grid)[torch.arange(2)[:, None], reward_at(ids)]
    for i, name in enumerate(("VQ", "MQ", "TA")):
        assert torch.allclose(raw[name], at[:, i] @ w3[i], atol=1e-5)


def test_rm_head_width_mismatch_and_unreadable_widths_are_refused(official, tmp_path):
    """One line naming the file(s) and both values: model_config.output_dim against the tensor's width; a width
    VideoAlign's forward cannot read (2); a model trained without the reward tokens."""
    _, _, _, sd = official
    w3 = dict(sd, **{"base_model.model.rm_head.weight": torch.zeros(3, TINY.dim)})
    path = fake_release(tmp_path / "disagree", w3, dict(LORA_JSON, model_config={"output_dim": 1}))
    with pytest.raises(CheckpointError, match=r"disagree/model_config\.json: model_config\.output_dim = 1 but "
                                              r"\S*disagree/checkpoint-11352/model\.pth has an rm_head of width 3 "
                                              r"\(rm_head\.weight \(3, 48\)\)") as err:
        VideoAlignModel.from_pretrained(path, config="tiny")
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match=r"^convert: \S*model_config\.json: model_config\.output_dim = 1 but .* width 3"):
        main(["convert", "videoalign", str(path), str(tmp_path / "x.safetensors"), "--config", "tiny"])
    assert not (tmp_path / "x.safetensors").exists()
    w2 = dict(sd, **{"base_model.model.rm_head.weight": torch.zeros(2, TINY.dim)})
    path = fake_release(tmp_path / "two", w2, LORA_JSON)
    with pytest.raises(CheckpointError, match=r"two/checkpoint-11352/model\.pth: rm_head\.weight \(2, 48\) has width 2; "
                                              r"VideoAlign reads width 1 .* or 3"):
        VideoAlignModel.from_pretrained(path, config="tiny")
    path = fake_release(tmp_path / "last", sd, dict(LORA_JSON, model_config={"use_special_tokens": False}))
    with pytest.raises(CheckpointError, match=r"last/model_config\.json: model_config\.use_special_tokens = false"):
        VideoAlignModel.from_pretrained(path, config="tiny")


def test_score_statistics_from_model_config_must_match_the_builtin_ones(official, tiny_files, tmp_path):
    """model_config.json's inference_config ("VQ_mean", "VQ_std", "MQ_mean", ... as VideoAlign's inference.py reads
    them): equal to REWARD_NORM (to its 4 decimals) loads and scores with it; any other value is refused with one line
    naming the file, the key and both values, by the reward and by convert, before the weights are read."""
    _, _, _, sd = official
    stats = {f"{k}_{s}": v for k, (mean, std) in REWARD_NORM.items() for s, v in (("mean", mean), ("std", std))}
    assert stats == {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811, "TA_mean": 2.8105,
                     "TA_std": 2.5121}
    main(["convert", "videoalign", str(official[0]), str(tmp_path / "va.safetensors"), "--config", "tiny"])

    def release(name, inference_config):
        """model.pth and its conversion (the tiny sizes in its metadata) under one model_config.json."""
        pth = fake_release(tmp_path / name, sd, dict(LORA_JSON, inference_config=inference_config))
        shutil.copy(tmp_path / "va.safetensors", pth.parent / "va.safetensors")
        return pth, pth.parent / "va.safetensors"

    _, same = release("same", dict(stats, MQ_mean=1.16458))
    rw = VideoAlignReward.from_pretrained(same, *tiny_files)  # 1.16458 rounds to 1.1646: the same statistics
    pixels = torch.rand(1, 3, 5, 28, 56, generator=torch.Generator().manual_seed(10)) * 2 - 1
    raw, z = rw.score(pixels, ["dog"]), rw(pixels, ["dog"])
    assert torch.allclose(z, (raw["MQ"] - 1.1646) / 1.3811)
    for key, value in (("MQ_std", 1.5), ("MQ_mean", 1.1647), ("TA_mean", "2.8105")):
        pth, conv = release(f"{key}-{value}", dict(stats, **{key: value}))
        msg = (rf"{key}-{value}/model_config\.json: inference_config {key} = {value!r} but the reward normalises "
               rf"with {key} = {stats[key]} \(reward\.REWARD_NORM\)")
        with pytest.raises(CheckpointError, match=msg) as err:
            VideoAlignReward.from_pretrained(conv, *tiny_files)
        assert "\n" not in str(err.value)
        with pytest.raises(SystemExit, match="^convert: .*" + msg):
            main(["convert", "videoalign", str(pth), str(pth.parent / "out.safetensors"), "--config", "tiny"])
        assert not (pth.parent / "out.safetensors").exists()
    # refused before the weights are read: the same json beside a file that is not a checkpoint at all
    path = pth.parent / "model.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="inference_config TA_mean = '2.8105'"):
        VideoAlignReward.from_pretrained(path, *tiny_files)
    # raw scores only (no norm given): the statistics are not the network's business
    path = fake_release(tmp_path / "raw", sd, dict(LORA_JSON, inference_config=dict(stats, MQ_std=1.5)))
    assert VideoAlignModel.from_pretrained(path, config="tiny").cfg == TINY


def test_lora_merge_is_fp32_then_cast_once(official, tmp_path):
    """A bf16 pickle (base, A and B in bf16, as VideoAlign saved it): loaded at fp32 the merged weight is exactly
    W + s (B A) computed in fp32, not its bf16 rounding; loaded at bf16 (or as stored) it is that sum rounded once."""
    _, _, lora, sd = official
    sd16 = {k: v.bfloat16() for k, v in sd.items()}
    path = fake_release(tmp_path / "bf16", sd16, LORA_JSON)
    m32 = VideoAlignModel.from_pretrained(path, config="tiny", dtype=torch.float32)
    m16 = VideoAlignModel.from_pretrained(path, config="tiny", dtype=torch.bfloat16)
    kept = VideoAlignModel.from_pretrained(path, config="tiny")  # as stored: bf16
    main(["convert", "videoalign", str(path), str(tmp_path / "va32.safetensors"), "--config", "tiny", "--dtype", "float32"])
    conv = VideoAlignModel.from_pretrained(tmp_path / "va32.safetensors")
    rounded = 0
    for mod in lora:
        W, A, B = (sd16[f"base_model.model.{mod}.{n}.weight"] for n in ("base_layer", "lora_A.default", "lora_B.default"))
        exact = W.float() + (ALPHA / R) * (B.float() @ A.float())
        assert m32.get_submodule(mod).weight.dtype == torch.float32
        assert torch.equal(m32.get_submodule(mod).weight, exact)
        assert torch.equal(conv.get_submodule(mod).weight, exact)
        assert torch.equal(m16.get_submodule(mod).weight, exact.bfloat16())
        assert torch.equal(kept.get_submodule(mod).weight, exact.bfloat16())
        rounded += (exact.bfloat16().float() != exact).float().mean().item()
    assert rounded / len(lora) > 0.9  # the bf16 rounding changes almost every entry: the test tells the two apart
    visual = "visual.blocks.0.attn.qkv.weight"  # not LoRA'd: upcast as is
    assert torch.equal(m32.get_parameter(visual), sd16[f"base_model.model.{visual}"].float())


# ----------------------------------------------------------------------------- preprocessing


def test_preprocessing_numbers_for_81_frames_480x832():
    """VideoAlign's preprocessing (qwen-vl-utils): 2 fps sampling and 480x832 -> 336x588. 81 frames at 16 fps last 5.06 s: 81 / 16 * 2 = 10.125
    frames, rounded to a multiple of the temporal patch (2) -> 10 frames, evenly spaced over 0..80."""
    assert sample_frame_indices(81, 16).tolist() == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert smart_resize(480, 832) == (336, 588)
    video = torch.rand(1, 3, 480, 832).mul(2).sub(1).expand(81, -1, -1, -1)  # [T, 3, H, W], one frame's storage
    pv, grid = preprocess_video(video, fps=16)
    assert grid.tolist() == [[5, 24, 42]]  # 10 frames / 2, 336 / 14, 588 / 14
    assert pv.shape == (5 * 24 * 42, 3 * 2 * 14 * 14) and pv.dtype == torch.float32
    assert int(grid.prod()) // 4 == 1260  # <|video_pad|> tokens in the prompt
    pv2, grid2 = preprocess_video(video.transpose(0, 1), fps=16)  # [3, T, H, W] gives the same
    assert torch.equal(pv, pv2) and torch.equal(grid, grid2)


def test_pixel_range_is_converted_before_clip_normalisation():
    """Our [-1, 1] -> [0, 1] before CLIP's mean/std: -1 maps to (0 - mean) / std, +1 to (1 - mean) / std."""
    for value, unit in ((-1.0, 0.0), (1.0, 1.0)):
        pv, grid = preprocess_video(torch.full((4, 3, 56, 84), value), fps=2, min_pixels=0)
        assert grid.tolist() == [[2, 4, 6]]
        per_channel = pv.view(pv.shape[0], 3, -1)  # each patch vector is (C, tp, p, p)
        want = (unit - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        assert torch.allclose(per_channel, want.view(1, 3, 1).expand_as(per_channel), atol=1e-6)


def test_patch_layout_matches_qwen2vl_processor():
    img = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    frames = torch.from_numpy(img).permute(2, 0, 1).float()[None].expand(2, -1, -1, -1)  # an image = 2 equal frames
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pv, grid = patchify((frames / 255 - mean) / std)
    # temporal and spatial order by hand: token of frame pair 0, block (0, 1), patch (1, 0); vector index (c, t, y, x)
    f = torch.randn(4, 3, 56, 84)
    p, _ = patchify(f)
    tok = 1 * 4 + 2  # block (0, 1) is the 2nd block (4 patches each); patch (1, 0) is its 3rd
    assert torch.equal(p[tok].view(3, 2, 14, 14), f[0:2, :, 14:28, 28:42].transpose(0, 1))
    assert torch.equal(p[24 + tok].view(3, 2, 14, 14), f[2:4, :, 14:28, 28:42].transpose(0, 1))
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        pytest.skip("transformers' PIL image processor not available")
    ref = Qwen2VLImageProcessorPil()(images=[img], return_tensors="pt", do_resize=False)
    assert ref["image_grid_thw"].tolist() == [list(grid)]
    assert torch.allclose(pv, ref["pixel_values"].float(), atol=1e-5)


# ----------------------------------------------------------------------------- chat format, template, the callable

TEMPLATE = ("\nrate the video . Visual : <|VQ_reward|>\nEND\nMotion : <|MQ_reward|>\nEND\n"
            "prompt - {text_prompt}\nText : <|TA_reward|>\nEND\n")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A word-level tokenizer.json with Qwen's special tokens at the tiny ids (40-45; the reward tokens are left for
    QwenChat to add, as for Qwen2-VL-2B-Instruct's own tokenizer), and a template file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "system", "You", "are", "a", "helpful", "assistant", ".", "user", "rate", "the", "video",
             "Visual", "Motion", "Text", ":", "END", "prompt", "-", "cat", "surfing", "wave", "dog"]
    words += [f"w{i}" for i in range(40 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                            "<|video_pad|>"])
    d = tmp_path_factory.mktemp("files")
    tok.save(str(d / "tokenizer.json"))
    (d / "template.txt").write_text(TEMPLATE, encoding="utf-8")
    return d / "tokenizer.json", d / "template.txt"


def test_chat_format_built_by_hand(tiny_files):
    assert QwenChat.text("hi") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                   "<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    chat = QwenChat(tiny_files[0], TINY)
    assert [chat.tok.token_to_id(t) for t in REWARD_TOKENS] == [46, 47, 48]
    ids = chat.encode("a cat <|MQ_reward|>", 5)
    assert ids[:3] == [41, 1, 2] and ids.count(VID) == 5 and ids[ids.index(VID) - 1] == VS
    assert ids[ids.index(VID) + 5] == VE and ids[-3:] == [42, 41, 6] and 47 in ids


def test_refuses_to_score_without_the_template(tiny_files, tmp_path):
    tok, template = tiny_files
    with pytest.raises(ValueError, match="needs its prompt template file and none was given.*KlingAIResearch/VideoAlign"
                                         ".*DETAILED_PROMPT_WITH_SPECIAL_TOKEN"):
        VideoAlignReward.from_pretrained(tmp_path / "not-even-loaded.pth", tok, None)
    with pytest.raises(FileNotFoundError, match="missing.txt: no such template file"):
        VideoAlignReward.from_pretrained(tmp_path / "not-even-loaded.pth", tok, tmp_path / "missing.txt")
    (tmp_path / "plain.txt").write_text("Rate this video: {text_prompt}")
    with pytest.raises(ValueError, match=r"plain.txt: needs each of <\|VQ_reward\|>.*exactly once and in that order"):
        VideoAlignReward.from_pretrained(tmp_path / "not-even-loaded.pth", tok, tmp_path / "plain.txt")
    (tmp_path / "noslot.txt").write_text(TEMPLATE.replace("{text_prompt}", "x"))
    with pytest.raises(ValueError, match="noslot.txt: needs exactly one prompt placeholder"):
        VideoAlignReward.from_pretrained(tmp_path / "not-even-loaded.pth", tok, tmp_path / "noslot.txt")


def test_reward_callable_end_to_end(official, tiny_files, tmp_path):
    """reward(pixels in [-1, 1], prompts) -> [B] z-scored MQ = (raw MQ - 1.1646) / 1.3811; right padding of a batch
    with prompts of different lengths changes nothing."""
    main(["convert", "videoalign", str(official[0]), str(tmp_path / "va.safetensors"), "--config", "tiny"])
    rw = VideoAlignReward.from_pretrained(tmp_path / "va.safetensors", *tiny_files)
    assert rw.model.cfg == TINY
    g = torch.Generator().manual_seed(6)
    pixels = torch.rand(2, 3, 5, 28, 56, generator=g) * 2 - 1  # 4 of 5 frames sampled; 28x56 upscaled to 224x448
    prompts = ["a cat surfing a wave", "dog"]
    r = rw(pixels, prompts)
    raw = rw.score(pixels, prompts)
    z = rw.score(pixels, prompts, normalize=True)
    assert r.shape == (2,) and r.dtype == torch.float32 and not r.requires_grad
    assert REWARD_NORM["MQ"] == (1.1646, 1.3811)
    assert torch.allclose(r, (raw["MQ"] - 1.1646) / 1.3811) and torch.equal(r, z["MQ"])
    assert torch.allclose(z["VQ"], (raw["VQ"] - 3.6757) / 2.2476) and torch.allclose(z["TA"], (raw["TA"] - 2.8105) / 2.5121)
    ids, pv, grid = rw.inputs(pixels, prompts)
    assert (ids == VID).sum(1).tolist() == [int(grid[0].prod()) // 4] * 2
    assert torch.allclose(torch.stack([raw[k] for k in ("VQ", "MQ", "TA")], 1), rw.model(ids, pv, grid))
    one = torch.stack([rw(pixels[i : i + 1], prompts[i : i + 1]) for i in range(2)]).flatten()
    assert torch.allclose(r, one, atol=1e-5)


def test_full_size_names_match_transformers_qwen2vl_2b():
    """Qwen2-VL-2B's full key and shape table (transformers' module names, on the meta device, vocab resized to
    151660 as VideoAlign did) maps through our rename table onto VideoAlignModel('qwen2-vl-2b') exactly."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=151660, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        hf = transformers.Qwen2VLForConditionalGeneration(cfg)
        ours = VideoAlignModel(QWEN_PRESETS["qwen2-vl-2b"])
    sd = dict(hf.state_dict(), **{"rm_head.weight": torch.empty(1, 1536, device="meta")})
    sd = ours_from_hf(sd, QWEN_PRESETS["qwen2-vl-2b"], "qwen2-vl-2b")
    n = sum(v.numel() for v in ours.state_dict().values())
    assert len(sd) == 730 and 2.20e9 < n < 2.22e9
