"""Tests of vae.py: numerical parity with Diffusers' AutoencoderKLWan, exact streaming, flat cache memory, loading."""

import pytest
import torch

import weights
from vae import VAE_PRESETS, VAEConfig, WanVAE
from weights import CheckpointError


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# tiny but non-trivial: unequal multipliers (shortcut convs, the decoder's channel halving), z_dim != 16,
# num_res_blocks = 1 (decoder index arithmetic differs from the full model's 4b + r)
TINY = dict(base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise_gammas(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # all ones at init: a missing or misplaced norm would not show
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(Diffusers reference, our VAE loaded from the reference's save_pretrained folder)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    mean, std = torch.randn(TINY["z_dim"]).tolist(), (0.5 + torch.rand(TINY["z_dim"])).tolist()
    ref = AutoencoderKLWan(**TINY, temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)
    randomise_gammas(ref, 1)
    root = tmp_path_factory.mktemp("diffusers")
    ref.save_pretrained(root / "vae")
    ours = WanVAE.from_pretrained(root)  # a Diffusers root folder: finds vae/, renames the keys, reads config.json
    return ref.eval(), ours, root


def latent_stats(cfg):
    return torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)


# ----------------------------------------------------------------------------- structure / rename


def test_full_size_rename_table_matches_diffusers():
    """The real Wan2.1 VAE: 194 tensors; Diffusers' keys renamed by our table are exactly our keys, same shapes,
    and our table inverts Diffusers' own Wan -> Diffusers conversion key by key."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in WanVAE(VAE_PRESETS["wan2.1"]).state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in AutoencoderKLWan().state_dict().items()}
    assert len(ours) == 194
    ckpt = weights.Tensors("diffusers")
    for k, shape in ref.items():
        ckpt.add(k, shape, read=None)
    ckpt.rename(weights.vae_diffusers(num_res_blocks=2))
    assert ckpt.shapes() == ours
    renamed = {ckpt.stored(k): k for k in ckpt.entries}  # Diffusers name -> ours
    for k in ours:  # Diffusers' converter maps our (= Wan's original) name to the Diffusers name we map back
        (theirs,) = convert_wan_vae_to_diffusers({k: torch.empty(0)})
        assert renamed[theirs] == k


# ----------------------------------------------------------------------------- parity with Diffusers


def test_config_read_from_diffusers_json(pair):
    ref, ours, _ = pair
    assert ours.cfg.base_dim == 16 and ours.cfg.z_dim == 8 and ours.cfg.dim_mult == [1, 2, 2, 2]
    assert ours.cfg.num_res_blocks == 1 and ours.cfg.temporal_downsample == [False, True, True]
    assert ours.cfg.latents_mean == pytest.approx(ref.config.latents_mean)
    assert ours.cfg.latents_std == pytest.approx(ref.config.latents_std)


def test_decode_matches_diffusers(pair):
    ref, ours, _ = pair
    torch.manual_seed(2)
    z = torch.randn(2, 8, 3, 4, 4)  # normalised latents, 3 frames: both temporal upsamples and the first-frame rule
    mean, std = latent_stats(ours.cfg)
    with torch.no_grad():
        want = ref.decode(z * std + mean).sample  # Diffusers takes un-normalised latents, clamps to [-1, 1]
        got = ours.decode(z)
    assert got.shape == want.shape == (2, 3, 9, 32, 32)
    assert (want.abs() < 1).float().mean() > 0.5  # mostly unclamped, so the comparison has teeth
    err = rel_err(got, want)
    print(f"decode rel err vs diffusers: {err:.2e}")
    assert err <= 1e-4


def test_encode_matches_diffusers(pair):
    ref, ours, _ = pair
    torch.manual_seed(3)
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1  # 9 frames: first alone, then 2 groups of 4 -> 3 latent frames
    mean, std = latent_stats(ours.cfg)
    with torch.no_grad():
        want = (ref.encode(x).latent_dist.mean - mean) / std  # Diffusers returns un-normalised mu
        got = ours.encode(x)
    assert got.shape == want.shape == (2, 8, 3, 4, 4)
    err = rel_err(got, want)
    print(f"encode rel err vs diffusers: {err:.2e}")
    assert err <= 1e-4


def test_diffusers_single_file_and_vae_folder(pair):
    _, ours, root = pair
    sd = ours.state_dict()
    for p in (root / "vae", root / "vae" / "diffusion_pytorch_model.safetensors"):
        other = WanVAE.from_pretrained(p).state_dict()
        assert other.keys() == sd.keys() and all(torch.equal(other[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(4)
    vae = WanVAE(VAEConfig(**TINY, latents_mean=torch.randn(8).tolist(), latents_std=(1 + torch.rand(8)).tolist()))
    randomise_gammas(vae, 5)
    return vae.eval()


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_stream_decode_equals_full_decode(tiny_vae, chunk):
    """Chunks through one stream decoder == decode of the whole video, both with the reference frame-by-frame
    passes inside each chunk and with each chunk run as one multi-frame pass (first-frame rule inside a chunk)."""
    torch.manual_seed(6)
    z = torch.randn(1, 8, 7, 4, 4)
    sizes = [c.shape[2] for c in z.split(chunk, dim=2)]
    with torch.inference_mode():
        full = tiny_vae.decode(z)
        assert full.shape == (1, 3, 1 + 4 * 6, 32, 32)
        for per_pass in (1, chunk):
            dec = tiny_vae.stream_decoder(frames_per_pass=per_pass)
            parts = [dec(c) for c in z.split(chunk, dim=2)]
            assert [p.shape[2] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * f for f in sizes[1:]]
            err = rel_err(torch.cat(parts, dim=2), full)
            print(f"chunk {chunk}, {per_pass} frame(s) per pass: stream vs full rel err {err:.2e}")
            assert err <= 1e-5


def test_frames_per_pass_and_independent_streams(tiny_vae):
    """Decoding several latent frames per decoder pass gives the frame-by-frame result, and two interleaved
    streams do not disturb each other (each owns its cache)."""
    torch.manual_seed(7)
    za, zb = torch.randn(1, 8, 6, 2, 2), torch.randn(1, 8, 6, 2, 2)
    with torch.inference_mode():
        ref_a, ref_b = tiny_vae.decode(za), tiny_vae.decode(zb)
        for n in (2, 6):
            assert rel_err(tiny_vae.decode(za, frames_per_pass=n), ref_a) <= 1e-5
        da, db = tiny_vae.stream_decoder(), tiny_vae.stream_decoder(frames_per_pass=3)
        out_a, out_b = [], []
        for ca, cb in zip(za.split(3, dim=2), zb.split(3, dim=2)):
            out_a.append(da(ca))
            out_b.append(db(cb))
    assert rel_err(torch.cat(out_a, 2), ref_a) <= 1e-5 and rel_err(torch.cat(out_b, 2), ref_b) <= 1e-5
    assert rel_err(ref_a, ref_b) > 0.1  # the two videos really differ


def test_stream_cache_memory_is_flat():
    torch.manual_seed(8)
    vae = WanVAE(VAE_PRESETS["tiny"]).eval()
    dec = vae.stream_decoder()

    def cache_bytes():  # bytes of every storage the cache keeps alive (a view into a whole chunk would count it all)
        tensors = list(dec.cache.frames.values())
        for t in tensors:  # each entry is its own compact tensor of at most 2 frames
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.shape[2] <= 2
        return len(tensors), sum(t.untyped_storage().nbytes() for t in tensors)

    with torch.inference_mode():
        for i in range(50):
            out = dec(torch.randn(1, 16, 1, 2, 2))
            assert out.shape == (1, 3, 1 if i == 0 else 4, 16, 16)
            if i == 2:
                after3 = cache_bytes()
    after50 = cache_bytes()
    print(f"cache: {after3[0]} tensors, {after3[1]} bytes after 3 chunks; {after50[1]} after 50")
    assert after3[1] > 0 and after50 == after3


# ----------------------------------------------------------------------------- .pth layout and errors


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    """A tiny VAE saved as Wan's Wan2.1_VAE.pth (our names = Wan's names); unusual temporal flags to test inference."""
    torch.manual_seed(9)
    cfg = VAEConfig(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=2, temporal_downsample=[True, False, True])
    vae = WanVAE(cfg)
    randomise_gammas(vae, 10)
    folder = tmp_path_factory.mktemp("wan")
    torch.save(vae.state_dict(), folder / "Wan2.1_VAE.pth")
    return vae.eval(), folder


def test_load_pth(pth):
    vae, folder = pth
    loaded = WanVAE.from_pretrained(folder)  # a Wan root folder: finds Wan2.1_VAE.pth, infers the config
    assert loaded.cfg == vae.cfg
    sd, got = vae.state_dict(), loaded.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    z = torch.randn(1, 16, 2, 2, 2)
    with torch.inference_mode():
        assert torch.equal(loaded.decode(z), vae.decode(z))
        half = WanVAE.from_pretrained(folder / "Wan2.1_VAE.pth", dtype=torch.bfloat16, device="cpu")
        assert all(p.dtype == torch.bfloat16 for p in half.parameters())
        err = rel_err(half.decode(z.bfloat16()).float(), vae.decode(z))
    print(f"bf16 vs fp32 decode rel err {err:.2e}")
    assert err < 0.05


def _edited(sd, case):
    sd = dict(sd)
    if case == "missing":
        del sd["decoder.middle.1.proj.bias"]
        return sd, "decoder.middle.1.proj.bias"
    if case == "unexpected":
        sd["decoder.extra.weight"] = torch.zeros(3)
        return sd, "decoder.extra.weight"
    sd["decoder.head.2.bias"] = torch.zeros(4)  # mis-shaped: the model has 3 output channels
    return sd, "decoder.head.2.bias"


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped"])
def test_load_errors_name_file_and_key(pth, tmp_path, case):
    vae, _ = pth
    sd, key = _edited(vae.state_dict(), case)
    path = tmp_path / f"edited_{case}.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        WanVAE.from_pretrained(path)
    msg = str(e.value)
    print(msg)
    assert str(path) in msg and key in msg


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        WanVAE.from_pretrained(bad)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth"):
        WanVAE.from_pretrained(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WanVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        WanVAE.from_pretrained(tmp_path / "empty")


def test_convert_pth_to_safetensors(pth, tmp_path):
    """`python weights.py convert vae` on Wan2.1_VAE.pth: the safetensors loads back as the same model."""
    import subprocess
    import sys

    vae, folder = pth
    dst = tmp_path / "vae.safetensors"
    subprocess.run([sys.executable, "weights.py", "convert", "vae", str(folder), str(dst)], check=True,
                   capture_output=True)
    got = WanVAE.from_pretrained(dst)
    assert got.cfg == vae.cfg
    sd = vae.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in got.state_dict().items()) and got.state_dict().keys() == sd.keys()


# ----------------------------------------------------------------------------- the toy VAE (no temporal compression)


TOY_SMALL = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1)  # the toy preset's layout, narrower


def test_frame_by_frame_codes_each_frame_as_diffusers_codes_an_image(tmp_path):
    """The toy preset's layout (two spatial downsamples, no temporal one) with frame_by_frame: encoding or decoding a
    video equals Diffusers' AutoencoderKLWan of the same weights run on each frame alone (a 1-frame video), every
    frame is one latent frame, and a stream decoder fed 2-frame chunks gives the whole-video decode."""
    from dataclasses import replace

    from diffusers import AutoencoderKLWan

    torch.manual_seed(8)
    mean, std = torch.randn(4).tolist(), (0.5 + torch.rand(4)).tolist()
    ref = AutoencoderKLWan(**TOY_SMALL, temperal_downsample=[False, False], latents_mean=mean, latents_std=std)
    randomise_gammas(ref, 9)
    ref.save_pretrained(tmp_path / "vae")
    ours = WanVAE.from_pretrained(tmp_path / "vae")  # renamed from Diffusers' names, config from its config.json
    ours.cfg = replace(ours.cfg, frame_by_frame=True)
    assert (ours.cfg.temporal_stride, ours.cfg.spatial_stride) == (1, 4)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    m, s = latent_stats(ours.cfg)
    with torch.no_grad():
        z = ours.encode(x)
        want_z = torch.cat([ref.encode(x[:, :, t:t + 1]).latent_dist.mean for t in range(5)], dim=2)
        assert z.shape == (2, 4, 5, 4, 4) and rel_err(z, (want_z - m) / s) <= 1e-4
        want = torch.cat([ref.decode(z[:, :, t:t + 1] * s + m).sample for t in range(5)], dim=2)
        assert want.shape == (2, 3, 5, 16, 16) and rel_err(ours.decode(z), want) <= 1e-4
        causal = replace(ours.cfg, frame_by_frame=False)  # the same weights as a causal video VAE differ
        ours.cfg = causal
        assert rel_err(ours.decode(z), want) > 1e-2
        ours.cfg = replace(causal, frame_by_frame=True)
        dec = ours.stream_decoder()
        parts = [dec(c) for c in z.split(2, dim=2)]
    assert [p.shape[2] for p in parts] == [2, 2, 1]
    assert rel_err(torch.cat(parts, dim=2), want) <= 1e-4
    with pytest.raises(ValueError, match="frame_by_frame"):
        VAEConfig(**TOY_SMALL, temporal_downsample=[False, True], frame_by_frame=True)  # temporal downsampling


def test_train_toy_vae_writes_unit_variance_latents(tmp_path):
    """A short vae.train_toy_vae run: the file loads with its config (the toy preset's layout, and the latent
    statistics it measured), its encode is the training path's mu normalised by them, and on fresh clips of the same
    world the normalised latents have about zero mean and unit std per channel."""
    from data import toyworld
    from vae import CausalCache, train_toy_vae

    trained = train_toy_vae(tmp_path / "vae.safetensors", steps=3, log=lambda *a: None)
    vae = WanVAE.from_pretrained(tmp_path / "vae.safetensors")
    toy = VAE_PRESETS["toy"]
    assert (vae.cfg.base_dim, vae.cfg.z_dim, vae.cfg.dim_mult, vae.cfg.temporal_downsample, vae.cfg.frame_by_frame) == \
        (toy.base_dim, toy.z_dim, toy.dim_mult, toy.temporal_downsample, True)
    assert vae.cfg.latents_std == trained.cfg.latents_std and min(vae.cfg.latents_std) > 0
    x = torch.stack([toyworld.clip(i, 4, 16, seed=2000)[0] for i in range(64)])  # the training world's clips
    with torch.no_grad():
        z = vae.encode(x)
        mu = vae.conv1(vae.encoder(x[:, :, 2:3], CausalCache()))[:, :16]  # the training loss's path: one frame
    m, s = latent_stats(vae.cfg)
    assert rel_err(z[:, :, 2:3], (mu - m) / s) <= 1e-4
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 0.3
    assert (z.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 0.3


def test_shipped_toy_vae_reconstructs_the_world():
    """data/toy/vae.safetensors (python vae.py train): held-out world clips of the evaluation's world come back with
    their objects intact (eval.fidelity, the metric the toy's networks are scored with) and their pixels close;
    a clip and its decode through 3-frame chunks agree."""
    import os

    import eval as E
    from data import toyworld

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "toy", "vae.safetensors")
    vae = WanVAE.from_pretrained(path)
    assert os.path.getsize(path) < 12 * 2**20
    clips = [toyworld.clip(i, 12, 16, seed=1) for i in range(24)]
    x = torch.stack([c[0] for c in clips])
    with torch.no_grad():
        z = vae.encode(x)
        y = vae.decode(z)
        dec = vae.stream_decoder()
        streamed = torch.cat([dec(c) for c in z.split(3, dim=2)], dim=2)
    fid = sum(E.fidelity(y[i], c[1]) for i, c in enumerate(clips)) / len(clips)
    mse = (y - x).pow(2).mean().item()
    print(f"shipped toy VAE on 24 held-out clips: fidelity {fid:.3f}, mse {mse:.5f}")
    assert fid >= 0.95 and mse < 0.01
    assert rel_err(streamed, y) <= 1e-5
