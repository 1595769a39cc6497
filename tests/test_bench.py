"""bench.py --quick in the suite: its last line is the JSON the protocol promises, the 1.3B FLOPs (meta device)
agree with the published counts within 1%, the stream does not recompile or grow, and the time ratio against
diffusers is reported (output parity with diffusers is tests/test_model.py's)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parent.parent

# The published FLOP counts, TFLOPs, of Wan2.1-T2V-1.3B at 832x480 with 3-frame chunks and a 9-frame window: per DiT
# forward 11.70 linear + 1.346 per attended frame + 0.44 cross-attention; 5 forwards per chunk; the Wan VAE per pixel
# frame 3.39
PUBLISHED = dict(linear_per_forward=11.70, self_attn_per_frame=1.346, cross_per_forward=0.44, per_forward=24.3,
                 per_chunk=121.0, per_output_frame=10.1, vae_per_frame=3.39)


@pytest.fixture(scope="module")
def quick():
    # one thread: on a shared 2-core machine two spinning OpenMP threads can slow this run down several times
    out = subprocess.run([sys.executable, "bench.py", "--quick=true", "--threads=1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_quick_last_line_is_json_with_the_promised_keys(quick):
    lines, r = quick
    for key in ("chunk_ms", "rss_mb", "flops_per_chunk_1p3b", "ratio_vs_diffusers", "recompiles"):
        assert key in r, key
    assert len(r["chunk_ms"]) == len(r["rss_mb"]) >= 60
    assert all(isinstance(v, (int, float)) and v > 0 for v in r["chunk_ms"] + r["rss_mb"])
    assert "aot_eager" in "\n".join(lines[:-1])  # quick mode says which compile backend it used
    for leg in ("eager", "compiled"):
        s = r["legs"][leg]
        assert s["dit_ms"]["n"] >= 2 and s["fps_e2e"] > 0 and s["first_chunk_ms"]["median"] > 0


def test_flops_match_the_published_counts_within_1pct(quick):
    _, r = quick
    assert abs(r["flops_per_chunk_1p3b"] / (PUBLISHED["per_chunk"] * 1e12) - 1) <= 0.01
    for k, ref in PUBLISHED.items():
        assert abs(r["flops_tflops"][k] / ref - 1) <= 0.01, (k, r["flops_tflops"][k], ref)
    assert r["flops_match_published"]
    # the projection follows from the counted FLOPs: 989 TF/s (H100 dense bf16) / (10.1 DiT + 3.39 VAE TF per frame)
    # = 73 FPS
    assert abs(r["h100_projection"]["ceiling_fps_end_to_end"] - 73) < 1


def test_stream_is_flat_and_does_not_recompile(quick):
    _, r = quick
    assert r["recompiles"] == 0
    assert r["rss_growth_mb"] < 32  # tiny model: RSS noise is a few MB; a per-chunk leak over 56 chunks shows


def test_ratio_vs_diffusers(quick):
    pytest.importorskip("diffusers")
    _, r = quick
    assert r["ratio_vs_diffusers"] > 0 and r["diffusers"]["ours_ms"]["n"] == 4, r["diffusers"]
    assert isinstance(r["diffusers"]["max_rel_err"], float)  # reported for information, without a verdict
    assert "outputs_agree" not in r["diffusers"] and "tolerance" not in r["diffusers"]


def test_legs_and_scale_are_checked():
    with pytest.raises(SystemExit, match="--legs takes both, eager or compiled"):
        bench.main(["--legs=on"])
    with pytest.raises(SystemExit, match="--scale must be one of"):
        bench.main(["--scale=huge"])


# -- training memory (bench.py section 5), counted on the meta device ---------------------------------------------


@pytest.mark.parametrize("grad,inputs_per_layer", [("none", 2), ("through", 3)])
def test_saved_bytes_per_layer_is_block_inputs_and_cached_kv(grad, inputs_per_layer):
    """With checkpointing, each layer adds exactly what recomputation needs. A 2-chunk rollout, per layer: the fp32
    block input of each chunk's exit-step forward (2), with 'through' also chunk 0's t = 0 pass (3; chunk 1's is freed
    with the cache, nothing reads it), plus chunk 0's cached K and V in bf16, which chunk 1's Window holds.
    So the counter sees checkpoint arguments and Window entries, counts each storage once, skips parameters and
    drops what dies with the cache."""
    from model import WanConfig

    B, C, h, w, D = 1, 3, 4, 4, 64
    T = (h // 2) * (w // 2)
    got = [bench.rollout_saved_bytes(WanConfig(dim=D, ffn_dim=128, num_heads=4, num_layers=n, freq_dim=32,
                                               text_dim=32, text_len=16), h, w, 2 * C, grad, True) for n in (2, 4)]
    block_input, kv = B * C * T * D * 4, 2 * B * C * T * D * 2
    assert (got[1] - got[0]) / 2 == inputs_per_layer * block_input + kv


def test_1p3b_rollout_fits_the_memory_target():
    """The paper-scale student step: one 21-frame rollout at 832x480 keeps <= 24 GiB for backward with gradient
    checkpointing, either cache-gradient setting (without checkpointing: ~145 GiB; `python bench.py --memory_only`)."""
    from model import PRESETS

    cfg = PRESETS["wan2.1-t2v-1.3b"]
    none, through = (bench.rollout_saved_bytes(cfg, 60, 104, 21, g, True) for g in ("none", "through"))
    assert none < through <= 24 * bench.GiB
    assert none > 21 * 1560 * 1536 * 4 * 30  # more than the block inputs alone (21 frames x 1560 tokens, fp32, 30 layers)


def test_fsdp_table_shards_what_fsdp_shards():
    saved = {"rollout_through_ckpt": 30 * bench.GiB, "rollout_none_ckpt": 20 * bench.GiB, "critic_step_ckpt": bench.GiB}
    rows8, total8 = bench.fsdp_memory(saved, world=8)
    rows4 = dict(bench.fsdp_memory(saved, world=4)[0])
    assert total8["through"] == pytest.approx(sum(b for _, b in rows8))
    assert total8["through"] - total8["none"] == pytest.approx(10 * bench.GiB)  # both rollouts outweigh the critic
    for name, b in rows8:
        same = name.replace("/ 8", "/ 4")
        assert rows4[same] == pytest.approx(2 * b if "/ 8" in name else b), name
    with torch.device("meta"):
        n = sum(p.numel() for p in bench.WanModel(bench.PRESETS["wan2.1-t2v-1.3b"]).parameters())
    assert dict(rows8)["student: weights, gradients, AdamW moments (fp32 / 8)"] == 16 * n / 8  # 4 fp32 copies
