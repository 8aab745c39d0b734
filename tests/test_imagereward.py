"""ImageReward without the ``image-reward`` package: a tiny random model saved as the package saves
``ImageReward.pt``, loaded through ``--reward imagereward=PATH``, checked three ways:

- against the scores the real package (image-reward 1.5 with transformers 4.30.2, timm 0.6.13,
  fairscale 0.4.13, in an environment of its own) gave for this very model and input
  (``PACKAGE_SCORES``: the model's weights are drawn from a seeded generator in the package's
  state-dict order, so this test rebuilds the same model);
- against a faithful reading of the package's forward pass (``ImageReward.score_gard`` over
  ``models/BLIP/vit.py`` and ``models/BLIP/med.py``), written below as plain functions over the
  state dict, in float64;
- the full-size published key layout (ViT-L/16 at 224 px, BERT-base with cross-attention,
  vocabulary 30,524) fits with no missing or unexpected key, built on the meta device.
"""

from __future__ import annotations

import json
import math
import string

import pytest
import torch
import torch.nn.functional as F

from reneg.rewards import RewardSpecError, load_reward, parse_spec
from reneg.rewards import imagereward as ir

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "cat",
    "dog",
    "red",
    "blue",
    "photo",
    "painting",
    "portrait",
    "castle",
    "sky",
    "at",
    "sunset",
    "highly",
    "detailed",
    "art",
    "by",
    "and",
    "woman",
    "man",
    "city",
    "night",
]
VOCAB = list(
    dict.fromkeys(
        ["[PAD]"]
        + [f"[unused{i}]" for i in range(4)]
        + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + list(string.punctuation)
        + list(string.ascii_lowercase)
        + list("0123456789")
        + ["##" + c for c in string.ascii_lowercase + "0123456789"]
        + WORDS
        + ["##s", "##ing", "##ed"]
    )
)
PROMPTS = [
    "a red cat on the sky",
    "A Photo of a Dog, highly detailed!",
    "portrait of a woman by Greg Rutkowski, 8k",
    "castles at sunset and " + "night city " * 20,
    "Café crème brûlée",
]
TINY = {
    "vision": {"width": 64, "layers": 2, "heads": 4, "patch_size": 16},
    "text": {
        "vocab_size": len(VOCAB) + 2,
        "hidden_size": 768,
        "num_hidden_layers": 2,
        "num_attention_heads": 12,
        "intermediate_size": 256,
        "max_position_embeddings": 64,
    },
}
# image-reward 1.5's score_gard(ids, mask, noise) for the tiny model below, run by hand
PACKAGE_SCORES = [
    -0.13106703758239746,
    -0.08699612319469452,
    -0.09407781064510345,
    -0.2028180956840515,
    -0.08954087644815445,
]


def tiny_state_dict(cfg: dict) -> dict:
    """Seeded random weights in the package's state-dict order, plus its ``position_ids`` buffer."""
    g = torch.Generator().manual_seed(1)
    sd = {"blip.text_encoder.embeddings.position_ids": torch.arange(cfg["text"]["max_position_embeddings"])[None]}
    for k, shape in ir.key_table(cfg).items():
        sd[k] = torch.randn(shape, generator=g) * 0.05 + (1.0 if k.endswith("weight") and len(shape) == 1 else 0.0)
    return sd


def make_tiny_imagereward(d):
    """``ImageReward.pt`` as the package saves it, its config beside it, and a ``tokenizer/`` folder."""
    d.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_state_dict(ir.merge_config(TINY)), d / "ImageReward.pt")
    (d / "imagereward_config.json").write_text(json.dumps(TINY))
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    return make_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


def noise_pixels():
    return torch.randn((len(PROMPTS), 3, 224, 224), generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------- a reading of the package's forward


def _ln(x, sd, k, eps):
    return F.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps)


def _lin(x, sd, k):
    return x @ sd[k + ".weight"].T + sd[k + ".bias"]


def reference_score(sd, cfg, ids, mask, pixels):
    """``ImageReward.score_gard``: visual_encoder(image) -> text_encoder(ids, mask, image, mode multimodal)
    -> last_hidden_state[:, 0] -> MLP -> (r - mean) / std; every step as the package writes it."""
    v, t = cfg["vision"], cfg["text"]
    pre = "blip.visual_encoder."
    # vit.py VisionTransformer.forward (timm PatchEmbed, cls token, pos_embed, pre-norm blocks, norm)
    x = F.conv2d(pixels, sd[pre + "patch_embed.proj.weight"], sd[pre + "patch_embed.proj.bias"], stride=v["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[pre + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[pre + "pos_embed"][:, : x.shape[1] + 1]
    for i in range(v["layers"]):
        b = f"{pre}blocks.{i}."
        h = _ln(x, sd, b + "norm1", 1e-6)
        B, N, C = h.shape
        qkv = _lin(h, sd, b + "attn.qkv").reshape(B, N, 3, v["heads"], C // v["heads"]).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (C // v["heads"]) ** -0.5).softmax(-1)
        x = x + _lin((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    image = _ln(x, sd, pre + "norm", 1e-6)
    # med.py BertModel.forward, encoder mode, multimodal: extended mask (1 - m) * -10000
    pre = "blip.text_encoder."
    eps, heads = t["layer_norm_eps"], t["num_attention_heads"]
    x = (
        sd[pre + "embeddings.word_embeddings.weight"][ids]
        + sd[pre + "embeddings.position_embeddings.weight"][torch.arange(ids.shape[1])][None]
    )
    x = _ln(x, sd, pre + "embeddings.LayerNorm", eps)
    ext = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
    enc = torch.zeros(image.shape[:2], dtype=x.dtype)[:, None, None, :]  # invert_attention_mask(ones)

    def attention(hs, ctx, m, k):
        def tr(z):
            return z.view(z.shape[0], -1, heads, z.shape[-1] // heads).permute(0, 2, 1, 3)

        q = tr(_lin(hs, sd, k + ".self.query"))
        kk, vv = tr(_lin(ctx, sd, k + ".self.key")), tr(_lin(ctx, sd, k + ".self.value"))
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + m
        c = (torch.nn.Softmax(dim=-1)(s) @ vv).permute(0, 2, 1, 3).reshape(hs.shape)
        return _ln(_lin(c, sd, k + ".output.dense") + hs, sd, k + ".output.LayerNorm", eps)

    for i in range(t["num_hidden_layers"]):
        b = f"{pre}encoder.layer.{i}."
        x = attention(x, x, ext, b + "attention")
        x = attention(x, image, enc, b + "crossattention")
        ff = _lin(F.gelu(_lin(x, sd, b + "intermediate.dense")), sd, b + "output.dense")
        x = _ln(ff + x, sd, b + "output.LayerNorm", eps)
    r = x[:, 0]
    for j in (0, 2, 4, 6, 7):  # MLP: Linear/Dropout pairs, no activation
        r = _lin(r, sd, f"mlp.layers.{j}")
    return ((r - cfg["score_mean"]) / cfg["score_std"]).squeeze(-1)


# --------------------------------------------------------------------------- tests


def test_score_equals_the_package_output(tiny_ir):
    r = load_reward(f"imagereward={tiny_ir / 'ImageReward.pt'}")  # config and tokenizer/ found beside it
    ids, mask = r.tokens(PROMPTS, "cpu")
    assert ids.shape == (5, 35) and int(mask[3].sum()) == 35 and int(mask[0].sum()) < 35  # padded, truncated
    with torch.no_grad():
        got = r.model(ids, mask, noise_pixels())
    torch.testing.assert_close(got, torch.tensor(PACKAGE_SCORES), rtol=0, atol=2e-6)


def test_forward_equals_a_reading_of_the_package_forward(tiny_ir):
    r = load_reward(f"imagereward={tiny_ir / 'ImageReward.pt'},tokenizer={tiny_ir / 'tokenizer' / 'vocab.txt'}")
    images = torch.rand(len(PROMPTS), 3, 96, 80, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ids, mask = r.tokens(PROMPTS, "cpu")
    from reneg.rewards.preprocess import clip_preprocess

    r64 = r.double()
    sd = {k: v.double() for k, v in r64.model.state_dict().items()}
    with torch.no_grad():
        ref = reference_score(sd, r64.model.cfg, ids, mask, clip_preprocess(images.double(), 224))
        got = r64(images.double(), PROMPTS)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert got.std() > 1e-4  # the prompts and images make a difference


def test_reward_is_differentiable_in_the_image(tiny_ir):
    r = load_reward(f"imagereward={tiny_ir / 'ImageReward.pt'}")
    images = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1).requires_grad_(True)
    s = r(images, PROMPTS[:2])
    s.sum().backward()
    assert s.shape == (2,) and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())
    assert r.enable_gradient_checkpointing()
    images.grad = None
    s2 = r(images, PROMPTS[:2])
    s2.sum().backward()
    torch.testing.assert_close(s2, s)
    assert images.grad.abs().sum() > 0


def published_layout() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the published ImageReward.pt, written out from the package's modules:
    ViT-L/16 (24 blocks, width 1024, 224 px), BERT-base (12 layers, 768) with cross-attention to
    1024-wide image tokens, vocabulary 30,524, projections to 256, the 768-1024-128-64-16-1 MLP."""
    out = {
        "blip.visual_encoder.cls_token": (1, 1, 1024),
        "blip.visual_encoder.pos_embed": (1, 197, 1024),
        "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
        "blip.visual_encoder.patch_embed.proj.bias": (1024,),
        "blip.visual_encoder.norm.weight": (1024,),
        "blip.visual_encoder.norm.bias": (1024,),
    }
    for i in range(24):
        b = f"blip.visual_encoder.blocks.{i}."
        for k, s in [("norm1", (1024,)), ("norm2", (1024,))]:
            out[b + k + ".weight"], out[b + k + ".bias"] = s, s
        for k, o, n in [
            ("attn.qkv", 3072, 1024),
            ("attn.proj", 1024, 1024),
            ("mlp.fc1", 4096, 1024),
            ("mlp.fc2", 1024, 4096),
        ]:
            out[b + k + ".weight"], out[b + k + ".bias"] = (o, n), (o,)
    e = "blip.text_encoder.embeddings."
    out.update(
        {
            e + "word_embeddings.weight": (30524, 768),
            e + "position_embeddings.weight": (512, 768),
            e + "LayerNorm.weight": (768,),
            e + "LayerNorm.bias": (768,),
        }
    )
    for i in range(12):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv in [("attention", 768), ("crossattention", 1024)]:
            for k, n in [("query", 768), ("key", kv), ("value", kv)]:
                out[f"{b}{att}.self.{k}.weight"], out[f"{b}{att}.self.{k}.bias"] = (768, n), (768,)
            out[f"{b}{att}.output.dense.weight"], out[f"{b}{att}.output.dense.bias"] = (768, 768), (768,)
            out[f"{b}{att}.output.LayerNorm.weight"], out[f"{b}{att}.output.LayerNorm.bias"] = (768,), (768,)
        out[b + "intermediate.dense.weight"], out[b + "intermediate.dense.bias"] = (3072, 768), (3072,)
        out[b + "output.dense.weight"], out[b + "output.dense.bias"] = (768, 3072), (768,)
        out[b + "output.LayerNorm.weight"], out[b + "output.LayerNorm.bias"] = (768,), (768,)
    out.update(
        {
            "blip.vision_proj.weight": (256, 1024),
            "blip.vision_proj.bias": (256,),
            "blip.text_proj.weight": (256, 768),
            "blip.text_proj.bias": (256,),
        }
    )
    for j, (o, n) in zip((0, 2, 4, 6, 7), [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        out[f"mlp.layers.{j}.weight"], out[f"mlp.layers.{j}.bias"] = (o, n), (o,)
    return out


def test_full_size_published_layout_loads_without_a_missing_or_unexpected_key():
    layout = published_layout()
    assert ir.key_table() == layout and len(layout) == 624
    with torch.device("meta"):  # a full-size random state dict, no memory allocated
        sd = {k: torch.empty(s) for k, s in layout.items()}
        sd["blip.text_encoder.embeddings.position_ids"] = torch.empty(1, 512, dtype=torch.long)
    sd = {k: v for k, v in sd.items() if k not in ir.IGNORED_KEYS}  # as read_state_dict drops it
    model = ir.build_from_state_dict(sd, ir.merge_config(None), "ImageReward.pt")
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in layout.values())


def test_keys_that_do_not_fit_are_named(tiny_ir, tmp_path):
    sd = torch.load(tiny_ir / "ImageReward.pt", weights_only=True)
    sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight")
    sd["blip.itm_head.weight"] = torch.zeros(2, 768)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (tmp_path / "imagereward_config.json").write_text(json.dumps(TINY))
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError,
        match=r"1 missing keys \(blip\.text_encoder\.encoder\.layer\.1\.crossattention"
        r"\.self\.key\.weight\), 1 unexpected \(blip\.itm_head\.weight\)",
    ):
        load_reward(f"imagereward={tmp_path / 'bad.pt'}")


def test_tokenizer_files_are_required_and_checked(tiny_ir, tmp_path, monkeypatch):
    monkeypatch.setattr(ir, "HF_CACHE_NAMES", ())  # whatever this machine's Hugging Face cache holds
    ckpt = tmp_path / "ImageReward.pt"
    ckpt.write_bytes((tiny_ir / "ImageReward.pt").read_bytes())
    (tmp_path / "imagereward_config.json").write_text(json.dumps(TINY))
    with pytest.raises(ValueError, match=r"needs the bert-base-uncased tokenizer files .*tokenizer"):
        load_reward(f"imagereward={ckpt}")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB[:-3]) + "\n")  # beside it, but another vocabulary
    with pytest.raises(ValueError, match=r"the tokenizer has \d+ ids .* needs bert-base-uncased's vocab.txt"):
        load_reward(f"imagereward={ckpt}")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    assert load_reward(f"imagereward={ckpt}").name == "imagereward"
    with pytest.raises(RewardSpecError, match="tokenizer .* does not exist"):
        parse_spec(f"imagereward={ckpt},tokenizer={tmp_path / 'nope'}")
    with pytest.raises(RewardSpecError, match="takes no option clip"):
        parse_spec(f"imagereward={ckpt},clip={tmp_path}")


def test_config_errors_name_the_file(tiny_ir, tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"vision": {"depth": 3}}))
    with pytest.raises(ValueError, match=r"c\.json: unknown vision key\(s\) depth"):
        load_reward(f"imagereward={tiny_ir / 'ImageReward.pt'},config={bad}")


def test_looking_for_the_tokenizer_never_reaches_the_network(tiny_ir, tmp_path, monkeypatch):
    """Without tokenizer files beside the checkpoint, the local Hugging Face cache is read with
    local_files_only; nothing is downloaded and no connection is tried, whatever the environment says."""
    import socket

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    attempts = []

    def blocked(*args, **kwargs):
        attempts.append(args)
        raise OSError(101, "network disabled by the test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    ckpt = tmp_path / "ImageReward.pt"
    ckpt.write_bytes((tiny_ir / "ImageReward.pt").read_bytes())
    (tmp_path / "imagereward_config.json").write_text(json.dumps(TINY))
    with pytest.raises(ValueError, match="tokenizer"):
        load_reward(f"imagereward={ckpt}")
    assert attempts == []


def test_the_tokenizer_is_found_in_the_hugging_face_cache_folders(tiny_ir, tmp_path, monkeypatch):
    snap = tmp_path / "hf" / "hub" / "models--bert-base-uncased" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abc")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ckpt = tmp_path / "m" / "ImageReward.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((tiny_ir / "ImageReward.pt").read_bytes())
    (ckpt.parent / "imagereward_config.json").write_text(json.dumps(TINY))
    r = load_reward(f"imagereward={ckpt}")
    assert len(r.tokenizer) == len(VOCAB) + 2
