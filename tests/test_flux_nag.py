"""Normalized Attention Guidance on Flux (reneg/backends/flux.py: FluxNAGAttnProcessor), on the small
Flux-architecture folder of tests/conftest.py loaded the way a user's Flux folder is.

The reference for the joint blocks is the NAG authors' formulation for Flux, written out here by hand in
float64 (per-token softmax attention, the rotary embedding, the L1 combine): the positive and the negative
text streams run side by side, the image stream once through the double-stream blocks (modulated by the
positive prompt's embedding), then once beside each text through the single-stream blocks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from reneg.backends.flux import FluxDenoiser
from reneg.backends.loading import load_diffusers
from reneg.cond import Cond
from reneg.nag import NAG, Guidance
from reneg.objective import grad_step_x0


@pytest.fixture(scope="module")
def dev(tiny_flux_dir):
    return load_diffusers(tiny_flux_dir)


class _Forced(NAG):
    """NAG settings the denoiser does not skip even at scale 1, so the full NAG layout runs."""

    active = True


def _inputs(backend, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 4, 4, generator=g)
    pos = Cond(torch.randn(batch, 512, 4096, generator=g), torch.randn(batch, 768, generator=g))
    neg = Cond(torch.randn(1, 512, 4096, generator=g), torch.randn(1, 768, generator=g))
    return x, torch.full((batch,), 0.7), pos, neg


@torch.no_grad()
def test_flux_nag_scale_one_equals_no_nag(dev):
    d = dev.denoiser
    x, sigma, pos, neg = _inputs(dev)
    plain = d(x, sigma, pos)
    assert torch.equal(d(x, sigma, pos.with_nag(neg, NAG(1.0))), plain)  # inactive: the plain call
    assert torch.equal(d(x, sigma, pos.with_nag(neg, NAG(5.0, alpha=0.0))), plain)
    # the whole NAG layout (text rows doubled, the negative's own stream and embedding) at scale 1
    forced = d(x, sigma, pos.with_nag(neg, _Forced(1.0)))
    assert torch.allclose(forced, plain, atol=1e-5, rtol=1e-5), (forced - plain).abs().max()
    assert torch.equal(d(x, sigma, pos), plain)  # a plain call after NAG calls is unchanged


@torch.no_grad()
def test_flux_nag_changes_the_output_per_row(dev):
    d = dev.denoiser
    x, sigma, pos, neg = _inputs(dev)
    plain = d(x, sigma, pos)
    guided = d(x, sigma, pos.with_nag(neg, NAG(5.0)))
    assert (guided - plain).abs().max() > 1e-3
    other = Cond(
        neg.crossattn.roll(1, dims=-1), neg.pooled
    )  # (Flux's text rows have no position: permuting them is no change)
    assert (d(x, sigma, pos.with_nag(other, NAG(5.0))) - guided).abs().max() > 1e-4  # the negative matters
    # each row of a batch is guided by its own prompt only: row 1 alone equals row 1 of the batch
    one = d(x[1:], sigma[1:], pos.index(slice(1, 2)).with_nag(neg, NAG(5.0)))
    assert torch.allclose(one, guided[1:], atol=1e-5)
    # processors replaced after NAG was installed (set_attn_processor by other code) are wrapped again
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    dev.transformer.set_attn_processor(FluxAttnProcessor())
    assert torch.equal(d(x, sigma, pos.with_nag(neg, NAG(5.0))), guided)


def test_flux_nag_gradient_reaches_the_negative(dev):
    d = dev.denoiser
    x, sigma, pos, _ = _inputs(dev, batch=1)
    grads = []
    try:
        for g, checkpointing in (
            (Guidance(1.0, NAG(5.0)), False),
            (Guidance(1.0, NAG(5.0)), True),
            (Guidance(3.0, NAG(5.0)), False),
        ):
            dev.set_performance(checkpointing=checkpointing)
            neg = dev.null_embedding()[0].clone().requires_grad_(True)
            x0 = grad_step_x0(d, x, sigma, pos, dev.negative_cond(neg), g)
            x0.square().mean().backward()
            assert neg.grad is not None and torch.isfinite(neg.grad).all() and neg.grad.abs().sum() > 0
            grads.append(neg.grad)
    finally:
        dev.set_performance(checkpointing=False)
    # gradient checkpointing recomputes the blocks in NAG's layout: the same gradient
    assert torch.allclose(grads[0], grads[1], atol=1e-12, rtol=1e-5)


# --------------------------------------------------------------------------- the authors' formulation by hand


def _ada(norm, x, emb, parts):
    """An AdaLayerNormZero(Single): LayerNorm without affine, then shift and scale from ``emb``."""
    e = norm.linear(F.silu(emb)).chunk(parts, dim=1)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + e[1][:, None]) + e[0][:, None], e


def _rms(norm, t):
    return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(t, cos, sin):
    """Flux's rotary embedding on ``[B, S, H, d]``: pairs (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = t.reshape(*t.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-b, a], dim=-1).flatten(3)
    return t * cos[None, :, None, :] + rot * sin[None, :, None, :]


def _softmax_attention(q, k, v):
    """``[S, H, d]`` -> ``[S, H*d]``, one head at a time."""
    out = []
    for h in range(q.shape[1]):
        w = torch.softmax(q[:, h] @ k[:, h].T / math.sqrt(q.shape[-1]), dim=-1)
        out.append(w @ v[:, h])
    return torch.cat(out, dim=-1)


def _nag_by_hand(zp, zn, s, tau, alpha):
    """The paper's steps for each token ``[N, C]``."""
    out = torch.empty_like(zp)
    for i in range(zp.shape[0]):
        zg = s * zp[i] - (s - 1) * zn[i]
        r = zg.abs().sum() / zp[i].abs().sum()
        zh = zg * min(float(r), tau) / float(r)
        out[i] = alpha * zh + (1 - alpha) * zp[i]
    return out


def _qkv(attn, x, heads, added=False):
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
    q, k, v = (getattr(attn, n)(x).unflatten(-1, (heads, -1)) for n in names)
    nq, nk = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    return _rms(nq, q), _rms(nk, k), v


def _double_by_hand(blk, img, txt, temb, rope, nag, b):
    attn, heads = blk.attn, blk.attn.heads
    cos, sin = rope
    xn, (_, _, gate, shift_m, scale_m, gate_m) = _ada(blk.norm1, img, temb[:b], 6)  # the positive's embedding
    cn, (_, _, cgate, cshift_m, cscale_m, cgate_m) = _ada(blk.norm1_context, txt, temb, 6)
    iq, ik, iv = _qkv(attn, xn, heads)
    tq, tk, tv = _qkv(attn, cn, heads, added=True)
    rows, z_img, z_txt = txt.shape[1], [], []
    for half in range(2):
        for r in range(b):
            t = half * b + r
            q = _rope(torch.cat([tq[t : t + 1], iq[r : r + 1]], 1), cos, sin)[0]
            k = _rope(torch.cat([tk[t : t + 1], ik[r : r + 1]], 1), cos, sin)[0]
            o = _softmax_attention(q, k, torch.cat([tv[t], iv[r]]))
            z_txt.append(o[:rows])
            z_img.append(o[rows:])
    z = torch.stack([_nag_by_hand(z_img[r], z_img[b + r], nag.scale, nag.tau, nag.alpha) for r in range(b)])
    h = img + gate[:, None] * attn.to_out[0](z)
    h = h + gate_m[:, None] * blk.ff(
        F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale_m[:, None]) + shift_m[:, None]
    )
    c = txt + cgate[:, None] * attn.to_add_out(torch.stack(z_txt))
    cn2 = F.layer_norm(c, c.shape[-1:], eps=1e-6) * (1 + cscale_m[:, None]) + cshift_m[:, None]
    return c + cgate_m[:, None] * blk.ff_context(cn2), h


def _single_by_hand(blk, img, txt, temb, rope, nag, b):
    attn, heads = blk.attn, blk.attn.heads
    rows = txt.shape[1]
    x = torch.cat([txt, img], dim=1)
    xn, (_, _, gate) = _ada(blk.norm, x, temb, 3)
    mlp = F.gelu(blk.proj_mlp(xn), approximate="tanh")
    q, k, v = _qkv(attn, xn, heads)
    q, k = _rope(q, *rope), _rope(k, *rope)
    o = torch.stack([_softmax_attention(q[r], k[r], v[r]) for r in range(2 * b)])
    z = torch.stack([_nag_by_hand(o[r, rows:], o[b + r, rows:], nag.scale, nag.tau, nag.alpha) for r in range(b)])
    o = torch.cat([o[:, :rows], torch.cat([z, z])], dim=1)
    out = x + gate[:, None] * blk.proj_out(torch.cat([o, mlp], dim=2))
    return out[:, :rows], out[:, rows:]


@torch.no_grad()
@pytest.mark.parametrize("nag", [NAG(5.0, 2.5, 0.25), NAG(3.0, 1.2, 0.8)])
def test_flux_nag_joint_blocks_equal_the_authors_formulation_by_hand(dev, nag):
    """Every block of a NAG call, fed the inputs it received, against the formulation written out by hand."""
    transformer = copy.deepcopy(dev.transformer).double()
    d = FluxDenoiser(transformer)
    b = 2
    x, sigma, pos, neg = _inputs(dev, batch=b, seed=3)
    seen = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            seen[name] = (kwargs, output)

        return hook

    blocks = [("double", transformer.transformer_blocks[0]), ("single", transformer.single_transformer_blocks[0])]
    handles = [blk.register_forward_hook(keep(n), with_kwargs=True) for n, blk in blocks]
    try:
        d(x.double(), sigma.double(), pos.with_nag(neg, nag))
    finally:
        for h in handles:
            h.remove()
    for name, blk in blocks:
        kw, (txt_out, img_out) = seen[name]
        img, txt, temb, rope = (kw[k] for k in ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"))
        assert txt.shape[0] == 2 * b and temb.shape[0] == 2 * b and img.shape[0] == (b if name == "double" else 2 * b)
        assert not torch.equal(temb[:b], temb[b:])  # the negative's own pooled vector modulates its stream
        by_hand = _double_by_hand if name == "double" else _single_by_hand
        ref_txt, ref_img = by_hand(blk, img, txt, temb, rope, nag, b)
        if name == "double":  # the image stream then goes on beside each text
            ref_img = ref_img.repeat(2, 1, 1)
        for got, ref in ((txt_out, ref_txt), (img_out, ref_img)):
            assert got.shape == ref.shape
            # (diffusers' rotary embedding rounds the queries and keys to float32: differences of ~1e-9 remain)
            assert torch.allclose(got, ref, atol=1e-7, rtol=1e-6), (name, (got - ref).abs().max())


def test_flux_train_tune_and_eval_under_nag_through_the_cli(tmp_path, tiny_flux_dir, dev, tiny_hps_ckpt, capsys):
    """``reneg train/tune/eval --guidance nag`` on a Flux folder: the negative is learned through NAG and says so."""
    import json

    from reneg.cli import main
    from reneg.embedding import load_embedding

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square")))
    out = tmp_path / "run"
    args = ["train", "--model", tiny_flux_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "3"]
    args += ["--grad-range", "0", "1", "--resolution", "32", "--guidance", "nag", "--prompts", str(prompts)]
    args += ["--heldout-count", "1", "--out", str(out), "--steps", "2", "--batch-size", "1", "--lr", "0.05"]
    args += ["--eval-every", "2", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "flux-dev"
    emb = load_embedding(out / "embedding.safetensors", expected_family="flux-dev")
    assert emb.metadata["guidance"] == "nag" and emb.metadata["nag_scale"] == "5"
    assert emb.tensor.shape == (1, 512, 4096) and not torch.allclose(emb.tensor, dev.null_embedding()[0])

    common = ["--model", tiny_flux_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "3"]
    common += ["--resolution", "32", "--guidance", "nag", "--nag-scale", "4"]
    tuned = tmp_path / "tuned.safetensors"
    tune = ["tune", *common, "--prompt", "a red circle", "--seed", "1", "--max-steps", "2", "--patience", "2"]
    tune += ["--grad-range", "0", "1", "--lr", "0.05", "--embedding", str(out / "embedding.safetensors")]
    assert main([*tune, "--out", str(tuned)]) == 0, capsys.readouterr().err
    assert load_embedding(tuned, expected_family="flux-dev").metadata["guidance"] == "nag"
    ev = tmp_path / "eval"
    negs = [
        "--negative",
        "null",
        "--negative",
        "handcrafted:blurry",
        "--negative",
        f"learned={out / 'embedding.safetensors'}",
    ]
    rc = main(["eval", *common, "--prompts", str(prompts), "--limit", "1", *negs, "--batch", "1", "--out", str(ev)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((ev / "summary.json").read_text())
    assert s["images"] == {"null": 1, "handcrafted": 1, "learned": 1}
    assert s["settings"]["guidance_mode"] == "nag" and s["settings"]["nag_scale"] == 4
    # the report says which guidance the file was learned under, beside the guidance its images were made with
    learned = next(n for n in s["negatives"] if n["name"] == "learned")
    assert learned["description"].endswith("embedding.safetensors (learned under nag)"), learned
    assert "learned under nag" in (ev / "report.html").read_text()
