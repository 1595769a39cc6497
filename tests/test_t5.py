"""Tests for t5.py: parity with transformers' UMT5EncoderModel, bucket table, tokenizer, context, checkpoint loading."""

import json
import warnings

import pytest
import torch

from t5 import EOS_ID, T5Config, T5Encoder, TextEncoder, Tokenizer, clean_prompt, relative_bucket
from weights import WAN_T5_FILE, CheckpointError

TINY = T5Config(vocab=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, text_len=64)


def hf_umt5(max_distance=20):
    """Tiny random HF UMT5 encoder; norms and bias tables re-randomised so a skipped norm or a wrong bucket shows.
    max_distance=20 (not 128) so a length-40 input reaches the clamped last bucket, and because max_distance
    cannot be inferred from tensor shapes, it checks that config.json is read."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                     relative_attention_num_buckets=32, relative_attention_max_distance=max_distance,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def randomised(cfg, seed=0):
    torch.manual_seed(seed)
    model = T5Encoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embedding" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_((1 + 0.5 * torch.randn_like(p)) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def batch_with_padding(vocab, L=40, lengths=(40, 23), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


# ----------------------------------------------------------------------------- parity with transformers


def test_parity_with_hf_umt5(tmp_path):
    hf = hf_umt5()
    hf.save_pretrained(tmp_path / "text_encoder")
    ours = T5Encoder.from_pretrained(tmp_path / "text_encoder")  # HF names -> ours via HF_TO_OURS
    assert ours.cfg.max_distance == 20 and ours.cfg.num_heads == 4 and ours.cfg.dim_attn == 32
    ids, mask = batch_with_padding(100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    real = mask.bool()
    err = (out - ref)[real].abs().max().item()
    assert err <= 1e-5, err
    assert ref[real].abs().max() > 0.1  # the comparison is not trivially between zeros
    # the padding mask matters: without it the shorter prompt's real rows change
    with torch.no_grad():
        unmasked = ours(ids, torch.ones_like(mask))
    assert (unmasked[1, :23] - ref[1, :23]).abs().max() > 1e-3


def test_hf_sharded_and_embedding_key_variants(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_umt5()
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ref = T5Encoder.from_pretrained(tmp_path / "one").state_dict()
    # a Diffusers root folder holding text_encoder/ resolves too
    (tmp_path / "root").mkdir()
    (tmp_path / "one").rename(tmp_path / "root" / "text_encoder")
    for path in (tmp_path / "sharded", tmp_path / "root"):
        got = T5Encoder.from_pretrained(path).state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # embedding stored as encoder.embed_tokens.weight only, or under both tied names
    sd = load_file(tmp_path / "root" / "text_encoder" / "model.safetensors")
    emb = sd.pop("shared.weight", None)
    emb = sd.pop("encoder.embed_tokens.weight", emb)
    for extra in ({"encoder.embed_tokens.weight": emb}, {"encoder.embed_tokens.weight": emb, "shared.weight": emb}):
        d = tmp_path / f"variant{len(extra)}"
        d.mkdir()
        (d / "config.json").write_text((tmp_path / "root" / "text_encoder" / "config.json").read_text())
        save_file({**sd, **{k: v.clone() for k, v in extra.items()}}, d / "model.safetensors")
        got = T5Encoder.from_pretrained(d).state_dict()
        assert torch.equal(got["token_embedding.weight"], ref["token_embedding.weight"])


def test_config_json_checked_against_shapes(tmp_path):
    hf_umt5().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_ff"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        T5Encoder.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "model.safetensors" in msg and "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in msg
    assert "(64, 32)" in msg and "(48, 32)" in msg


# ----------------------------------------------------------------------------- relative buckets

# By hand from bucket = 16*(rel > 0) + g(|rel|), g(n) = n (n < 8) else min(15, 8 + floor(log(n/8)/log(16)*8)):
# g(8)=8+0, g(12)=8+floor(1.17)=9, g(20)=8+floor(2.64)=10, g(30)=8+floor(3.81)=11, g(100)=8+floor(7.29)=15,
# g(127)=8+floor(7.98)=15, g(128)=min(15,16)=15, g(500)=15.
BUCKETS = [(0, 0), (1, 17), (-1, 1), (7, 23), (-7, 7), (8, 24), (-8, 8), (12, 25), (-12, 9), (20, 26), (-20, 10),
           (30, 27), (-30, 11), (100, 31), (-100, 15), (127, 31), (-127, 15), (128, 31), (-128, 15), (500, 31),
           (-500, 15)]


def test_relative_bucket_hand_table():
    rel = torch.tensor([r for r, _ in BUCKETS])
    assert relative_bucket(rel).tolist() == [b for _, b in BUCKETS]


def test_relative_bucket_matches_hf():
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    rel = torch.arange(-600, 601)
    for max_distance in (128, 20):
        att = UMT5Attention(UMT5Config(relative_attention_max_distance=max_distance, d_model=8, d_kv=2, num_heads=4),
                            has_relative_attention_bias=True)
        assert torch.equal(relative_bucket(rel, 32, max_distance), att._relative_position_bucket(rel))


# ----------------------------------------------------------------------------- tokenizer

VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5, "&": 6, "色": 7, "调": 8, "艳": 9, "丽": 10,
         "runs": 11, "on": 12, "grass": 13}


@pytest.fixture
def tokenizer_json(tmp_path):
    """WordLevel tokenizer (CJK split per character). The file also carries an EOS template, padding to 5 and
    truncation to 3, which Tokenizer must ignore."""
    from tokenizers import Regex, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[\u4e00-\u9fff]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=5)
    tok.enable_truncation(max_length=3)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b\n\t  c  ") == "a & b c"
    assert clean_prompt("&lt;b&gt;") == "<b>"


def test_tokenizer_eos_pad_mask_cjk(tokenizer_json):
    tok = Tokenizer(tokenizer_json, text_len=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is truncated
        ids, mask = tok(["a cat  &amp;amp; dog", "色调艳丽", "a cat runs on grass 色 调"])  # last: exactly 7 + EOS
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[3, 4, 6, 5, 1, 0, 0, 0],
                            [7, 8, 9, 10, 1, 0, 0, 0],
                            [3, 4, 11, 12, 13, 7, 8, 1]]
    assert mask.tolist() == [[1] * 5 + [0] * 3, [1] * 5 + [0] * 3, [1] * 8]


def test_tokenizer_truncation_keeps_eos_and_warns(tokenizer_json):
    tok = Tokenizer(tokenizer_json, text_len=6)
    with pytest.warns(UserWarning, match=r"8 tokens.*truncated"):
        ids, mask = tok(["a cat runs on grass a dog dog", "dog"])
    assert ids.tolist() == [[3, 4, 11, 12, 13, EOS_ID], [5, EOS_ID, 0, 0, 0, 0]]
    assert mask.tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------- context


def test_context_zero_past_length_and_equal_to_encoder(tokenizer_json):
    cfg = T5Config(**{**TINY.__dict__, "num_layers": 2})
    enc = randomised(cfg)
    te = TextEncoder(Tokenizer(tokenizer_json, text_len=12), enc)
    prompts = ["a cat runs on grass", "色调", "dog"]
    ctx = te(prompts)
    assert ctx.shape == (3, 12, cfg.dim)
    for i, n in enumerate([6, 3, 2]):  # tokens + EOS
        assert torch.all(ctx[i, n:] == 0)
        ids, _ = te.tokenizer([prompts[i]])
        with torch.no_grad():
            alone = enc(ids[:, :n])  # the prompt cut to its real length, no padding at all
        assert (ctx[i, :n] - alone[0]).abs().max() <= 1e-5
        assert alone.abs().min() > 0  # real rows are not zero, so the check above is not vacuous


def test_bf16_close_to_fp32():
    enc = randomised(TINY)
    ids, mask = batch_with_padding(256, L=20, lengths=(20, 9))
    with torch.no_grad():
        ref = enc(ids, mask)
        out = enc.to(torch.bfloat16)(ids, mask)
    assert out.dtype == torch.bfloat16
    real = mask.bool()
    rel = ((out.float() - ref)[real].norm() / ref[real].norm()).item()
    assert rel < 3e-2, rel


# ----------------------------------------------------------------------------- Wan .pth layout and errors


def test_wan_pth_roundtrip_and_text_encoder_folder(tmp_path, tokenizer_json):
    enc = randomised(TINY)
    sd = {k: v.to(torch.bfloat16) for k, v in enc.state_dict().items()}  # Wan ships bf16
    root = tmp_path / "Wan2.1-T2V-1.3B"
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    torch.save(sd, root / WAN_T5_FILE)
    (root / "google" / "umt5-xxl" / "tokenizer.json").write_text(tokenizer_json.read_text())
    for path in (root / WAN_T5_FILE, root):
        got = T5Encoder.from_pretrained(path, dtype=torch.float32)
        c = got.cfg
        assert (c.vocab, c.dim, c.dim_attn, c.dim_ffn, c.num_heads, c.num_layers, c.num_buckets) == (256, 32, 32, 64, 4, 2, 32)
        gsd = got.state_dict()
        assert all(gsd[k].dtype == torch.float32 and torch.equal(gsd[k], sd[k].float()) for k in sd)
    te = TextEncoder.from_pretrained(root)
    assert te.encoder.token_embedding.weight.dtype == torch.bfloat16  # dtype=None keeps the stored dtype
    ctx = te(["a cat"])
    assert ctx.shape == (1, 512, 32) and torch.all(ctx[0, 3:] == 0) and ctx[0, :3].abs().min() > 0


def _broken(tmp_path, edit):
    sd = dict(T5Encoder(TINY).state_dict())
    edit(sd)
    path = tmp_path / "broken_t5.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        T5Encoder.from_pretrained(path)
    return str(e.value)


def test_error_missing_key(tmp_path):
    msg = _broken(tmp_path, lambda sd: sd.pop("blocks.1.ffn.fc2.weight"))
    assert "broken_t5.pth" in msg and "1 missing: blocks.1.ffn.fc2.weight" in msg


def test_error_unexpected_key(tmp_path):
    msg = _broken(tmp_path, lambda sd: sd.__setitem__("blocks.0.extra.weight", torch.zeros(3)))
    assert "broken_t5.pth" in msg and "1 unexpected: blocks.0.extra.weight" in msg


def test_error_wrong_shape(tmp_path):
    msg = _broken(tmp_path, lambda sd: sd.__setitem__("norm.weight", torch.ones(31)))
    assert "broken_t5.pth" in msg and "norm.weight: (31,) != expected (32,)" in msg


def test_error_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes_t5.pth"
    bad.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="notes_t5.pth"):
        T5Encoder.from_pretrained(bad)
    torch.save([torch.zeros(2)], tmp_path / "list_t5.pth")  # a real torch file, but not a state dict
    with pytest.raises(ValueError, match="list_t5.pth"):
        T5Encoder.from_pretrained(tmp_path / "list_t5.pth")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        T5Encoder.from_pretrained(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        T5Encoder.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="Wan-AI/Wan2.1-T2V-1.3B"):
        TextEncoder.from_pretrained(tmp_path / "empty")


def test_convert_keeps_what_the_shapes_cannot_tell(tmp_path):
    """`python weights.py convert t5` on a Diffusers text_encoder/ folder: the safetensors it writes loads back with
    the same config (max_distance 20 is not in any tensor shape) and the same outputs."""
    import subprocess
    import sys

    hf_umt5().save_pretrained(tmp_path / "text_encoder")
    dst = tmp_path / "t5.safetensors"
    subprocess.run([sys.executable, "weights.py", "convert", "t5", str(tmp_path / "text_encoder"), str(dst)],
                   check=True, capture_output=True)
    ref, got = T5Encoder.from_pretrained(tmp_path / "text_encoder"), T5Encoder.from_pretrained(dst)
    assert got.cfg == ref.cfg and got.cfg.max_distance == 20
    ids, mask = batch_with_padding(100)
    with torch.no_grad():
        assert torch.equal(got(ids, mask), ref(ids, mask))
