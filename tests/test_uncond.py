"""reneg.uncond: the host-independent negative replacement."""

from __future__ import annotations

import os

import pytest
import torch

from a1111_stubs import DictWithShape  # A1111's SDXL conditioning dict
from reneg.embedding import NegEmbedding, load_embedding
from reneg.uncond import MARK_VALUE, blend, content_length, has_marker, match_tokens, replace_uncond, split_marker

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "reneg-official")


def emb(d=768, rows=77, seed=0):
    return torch.randn(1, rows, d, generator=torch.Generator().manual_seed(seed))


def host(b=1, n=77, d=768, dtype=torch.float32, seed=1):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def marked(x):
    return torch.cat([torch.full_like(x[:, :1], -MARK_VALUE), x], dim=1)


# --------------------------------------------------------------------------- match_tokens / blend


def test_match_tokens_repeats_along_tokens():
    e = emb()
    out = match_tokens(e, 154)
    assert out.shape == (1, 154, 768)
    assert torch.equal(out, torch.cat([e, e], dim=1))
    assert out.data_ptr() != e.data_ptr()
    assert torch.equal(match_tokens(e, 77), e) and match_tokens(e, 77).data_ptr() != e.data_ptr()
    assert match_tokens(torch.randn(3, 77, 64), 231).shape == (3, 231, 64)
    assert match_tokens(NegEmbedding(e, "sd1"), 77).shape == (1, 77, 768)


@pytest.mark.parametrize("length", [0, 76, 100, 155, -77])
def test_match_tokens_rejects_non_multiples(length):
    with pytest.raises(ValueError, match="multiple of 77"):
        match_tokens(emb(), length)


def test_repeated_negative_gives_the_same_cross_attention():
    q = torch.randn(1, 8, 64, 40, dtype=torch.float64)
    e = torch.randn(1, 8, 77, 40, dtype=torch.float64)
    once = torch.nn.functional.scaled_dot_product_attention(q, e, e)
    k = match_tokens(e.flatten(0, 1), 154).view(1, 8, 154, 40)
    twice = torch.nn.functional.scaled_dot_product_attention(q, k, k)
    assert torch.allclose(once, twice, atol=1e-12)


def test_blend_numerics_and_dtype():
    base, e = host(4), emb()
    assert torch.equal(blend(base, e, 0.0), base)
    assert torch.equal(blend(base, e, 1.0), e.expand(4, -1, -1))
    assert torch.allclose(blend(base, e, 0.5), (base + e) / 2, atol=1e-6)
    assert torch.allclose(blend(base, e, 0.25), 0.75 * base + 0.25 * e, atol=1e-6)
    half = blend(base.half(), e, 0.5)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), ((base.half().float() + e) / 2), atol=2e-3)
    with pytest.raises(ValueError):
        blend(base, emb(rows=154), 0.5)


# --------------------------------------------------------------------------- replace_uncond


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("n", [77, 154])
def test_replace_tensor_batches_and_lengths(b, n):
    h, e = host(b, n), emb()
    before = h.clone()
    out, msg = replace_uncond(h, e, 1.0)
    assert msg is None
    assert out.shape == (b, n, 768)
    assert torch.equal(out, match_tokens(e, n).expand(b, -1, -1))
    assert torch.equal(h, before)
    out.add_(1)  # the result owns its memory: the embedding is unchanged
    assert torch.equal(e, emb())


def test_strength_zero_half_one():
    h, e = host(2, 154), emb()
    assert replace_uncond(h, e, 0.0) == (None, None)
    half, _ = replace_uncond(h, e, 0.5)
    assert torch.allclose(half, 0.5 * h + 0.5 * match_tokens(e, 154), atol=1e-6)
    full, _ = replace_uncond(h, e, 1.0)
    assert torch.equal(full, match_tokens(e, 154).expand(2, -1, -1))


def test_none_is_left_alone():  # Forge at CFG scale 1
    assert replace_uncond(None, emb(), 1.0) == (None, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_host(dtype):
    h, e = host(2, 77, dtype=dtype), emb()
    out, _ = replace_uncond(h, e, 1.0)
    assert out.dtype == dtype and out.device == h.device
    assert torch.equal(out, e.to(dtype).expand(2, -1, -1))
    out, _ = replace_uncond(h, e.half(), 0.5)
    assert out.dtype == dtype


def test_controlnet_marker_row_is_kept():
    content = host(3, 154)
    h = marked(content)
    assert has_marker(h) and not has_marker(content)
    before = h.clone()
    e = emb()
    out, msg = replace_uncond(h, e, 1.0)
    assert msg is None and out.shape == (3, 155, 768)
    assert torch.equal(out[:, 0], torch.full((3, 768), -MARK_VALUE))
    assert torch.equal(out[:, 1:], match_tokens(e, 154).expand(3, -1, -1))
    half, _ = replace_uncond(h, e, 0.5)
    assert torch.equal(half[:, 0], h[:, 0])
    assert torch.allclose(half[:, 1:], 0.5 * content + 0.5 * match_tokens(e, 154), atol=1e-6)
    assert torch.equal(h, before)
    assert content_length(h) == 154 and content_length(content) == 154
    m, c = split_marker(h)
    assert m.shape == (3, 1, 768) and c.shape == (3, 154, 768)
    fp16, _ = replace_uncond(h.half(), e, 1.0)
    assert torch.equal(fp16[:, 0], torch.full((3, 768), -MARK_VALUE, dtype=torch.float16))


@pytest.mark.parametrize("cls", [dict, DictWithShape])
def test_sdxl_dict_keeps_vector_and_class(cls):
    cross, vector = host(2, 154, 2048), torch.randn(2, 2816)
    d = cls({"crossattn": cross, "vector": vector})
    before = (cross.clone(), vector.clone())
    e = emb(2048)
    out, msg = replace_uncond(d, e, 1.0)
    assert msg is None
    assert type(out) is cls and out is not d
    assert set(out) == {"crossattn", "vector"}
    assert out["vector"] is vector
    assert torch.equal(out["crossattn"], match_tokens(e, 154).expand(2, -1, -1))
    assert d["crossattn"] is cross
    assert torch.equal(cross, before[0]) and torch.equal(vector, before[1])
    if cls is DictWithShape:
        assert out.shape == (2, 154, 2048)
    marked_d = cls({"crossattn": marked(cross), "vector": vector})
    out, _ = replace_uncond(marked_d, e, 1.0)
    assert out["crossattn"].shape == (2, 155, 2048) and torch.equal(out["crossattn"][:, 0], marked(cross)[:, 0])


def test_sdxl_pooled_vector_replaces_the_vectors_pooled_part():
    """A1111/Forge's SDXL ``vector`` is [pooled 1280 | size embeddings]; an embedding's pooled vector
    (what it was trained with) goes in front, blended like the rows; the sizes stay; nothing is mutated."""
    cross, vector = host(2, 77, 2048), torch.randn(2, 2816, dtype=torch.float16)
    d = DictWithShape({"crossattn": cross, "vector": vector})
    before = vector.clone()
    pooled = torch.randn(1, 1280)
    ne = NegEmbedding(emb(2048), "sdxl", pooled=pooled)
    out, _ = replace_uncond(d, ne, 1.0)  # a NegEmbedding brings its own pooled vector
    assert out["vector"].dtype == torch.float16 and out["vector"].shape == (2, 2816)
    assert torch.equal(out["vector"][:, :1280], pooled.half().expand(2, -1))
    assert torch.equal(out["vector"][:, 1280:], vector[:, 1280:]) and torch.equal(vector, before)
    half, _ = replace_uncond(d, emb(2048), 0.5, pooled=pooled)  # or it is given with a bare tensor
    torch.testing.assert_close(half["vector"][:, :1280], (0.5 * (vector[:, :1280].float() + pooled)).half())
    assert replace_uncond(d, emb(2048), 1.0)[0]["vector"] is vector  # no pooled vector: kept
    short = {"crossattn": cross, "vector": torch.randn(2, 1280)}  # nothing after it: not this layout
    assert replace_uncond(short, ne, 1.0)[0]["vector"] is short["vector"]
    assert replace_uncond(d, ne, 0.0)[0] is None  # strength 0 leaves the host's negative alone


@pytest.mark.parametrize("d", [1280, 1024])
def test_hidden_size_mismatch_is_a_warning(d):
    h = host(1, 77, d)
    before = h.clone()
    out, msg = replace_uncond(h, emb(768), 1.0)
    assert out is None and str(d) in msg and "768" in msg
    assert torch.equal(h, before)
    out, msg = replace_uncond({"crossattn": host(1, 77, 1280), "vector": torch.randn(1, 2560)}, emb(2048), 1.0)
    assert out is None and "refiner" in msg


def test_other_mismatches_are_warnings():
    assert replace_uncond(host(1, 100), emb(), 1.0)[0] is None
    assert "100" in replace_uncond(host(1, 100), emb(), 1.0)[1]
    assert "batch" in replace_uncond(host(4), torch.randn(2, 77, 768), 1.0)[1]
    assert replace_uncond("text", emb(), 1.0)[0] is None
    assert replace_uncond({"vector": torch.randn(1, 2816)}, emb(2048), 1.0)[0] is None
    assert replace_uncond(host(), emb(), float("nan"))[0] is None


def test_length_follows_the_positive_at_full_strength():
    h, e = host(2, 77), emb()
    out, _ = replace_uncond(h, e, 1.0, length=231)
    assert out.shape == (2, 231, 768)
    out, _ = replace_uncond(marked(h), e, 1.0, length=154)
    assert out.shape == (2, 155, 768) and out[0, 0, 0] == -MARK_VALUE
    assert replace_uncond(h, e, 0.5, length=231)[0].shape == (2, 77, 768)  # a blend keeps the host's length
    assert replace_uncond(h, e, 1.0, length=100)[0].shape == (2, 77, 768)  # not a multiple: ignored


def test_per_image_embeddings():
    h, e = host(3), torch.randn(3, 77, 768)
    out, _ = replace_uncond(h, e, 1.0)
    assert torch.equal(out, e)


@pytest.mark.skipif(not os.path.isdir(OFFICIAL), reason="shared/data/reneg-official (beside the checkout) is absent")
def test_official_sd15_embedding_into_fp16_long_prompt():
    e = load_embedding(os.path.join(OFFICIAL, "sd1.5_reneg_emb.bin"))
    assert e.family == "sd1"
    h = host(2, 154, dtype=torch.float16)
    out, msg = replace_uncond(h, e, 1.0)
    assert msg is None and out.dtype == torch.float16
    assert torch.equal(out, match_tokens(e.tensor, 154).half().expand(2, -1, -1))
    sd2 = load_embedding(os.path.join(OFFICIAL, "sd2.1_reneg_emb.bin"))
    assert replace_uncond(h, sd2, 1.0)[0] is None
