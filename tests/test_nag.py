"""Normalized Attention Guidance (reneg/nag.py): the combine against the published formulation computed by
hand, the diffusers processor and ComfyUI's patch protocol against a hand computation on a tiny model,
the edge cases (scale 1, alpha 0, strength 0), gradients to the negative, and the sampler's guidance modes."""

from __future__ import annotations

import math

import pytest
import torch

from reneg.cond import Cond
from reneg.nag import (
    NAG,
    Guidance,
    NagContext,
    NAGAttnProcessor,
    comfy_patches,
    install,
    make_guidance,
    nag_combine,
)
from reneg.objective import grad_step_x0
from reneg.sampling import cfg_denoise, sample


def _hand_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v, head by head, written out."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.zeros(b, n, inner, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = (q[..., sl].double() @ k[..., sl].double().transpose(1, 2)) / math.sqrt(d)
        out[..., sl] = w.softmax(-1) @ v[..., sl].double()
    return out


def _hand_nag(zp, zn, s, tau, alpha):
    """The paper's steps one token at a time: extrapolate, L1 ratio, clip where r > tau, blend."""
    out = torch.empty_like(zp, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in zp.shape[:-1]]).reshape(-1, zp.dim() - 1):
        p, m = zp[tuple(idx)].double(), zn[tuple(idx)].double()
        g = p * s - m * (s - 1)
        r = g.abs().sum() / p.abs().sum()
        hat = g * tau / r if r > tau else g
        out[tuple(idx)] = alpha * hat + (1 - alpha) * p
    return out


def _hand_nag_vec(zp, zn, s, tau, alpha):
    """The same steps over all tokens at once (float64), with the clip written as a branch."""
    p, m = zp.double(), zn.double()
    g = p * s - m * (s - 1)
    r = g.abs().sum(-1, keepdim=True) / p.abs().sum(-1, keepdim=True)
    hat = torch.where(r > tau, g * tau / r, g)
    return alpha * hat + (1 - alpha) * p


def test_combine_equals_the_published_formulation_on_a_tiny_attention():
    g = torch.Generator().manual_seed(0)
    q, kp, vp = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    kn, vn = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    zp, zn = _hand_attention(q, kp, vp, 2), _hand_attention(q, kn, vn, 2)
    for s, tau, alpha in ((5.0, 2.5, 0.25), (3.0, 4.0, 0.5), (11.0, 3.5, 1.0)):
        ours = nag_combine(zp.float(), zn.float(), s, tau, alpha)
        assert torch.allclose(ours.double(), _hand_nag(zp, zn, s, tau, alpha), atol=1e-5)
    # some tokens were clipped and some were not at tau 4: both branches of the formula ran
    zg = zp * 3 - zn * 2
    r = zg.abs().sum(-1) / zp.abs().sum(-1)
    assert (r > 4.0).any() and (r <= 4.0).any()


def test_scale_one_and_alpha_zero_leave_the_positive_output():
    zp, zn = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    assert torch.equal(nag_combine(zp, zn, 1.0, 2.5, 0.25), zp)
    assert torch.equal(nag_combine(zp, zn, 5.0, 2.5, 0.0), zp)
    assert not NAG(1.0).active and not NAG(5.0, alpha=0.0).active and NAG().active
    assert not NAG(5.0).weaker(0.0).active and NAG(5.0).weaker(0.5).scale == 3.0


def test_settings_are_checked():
    for bad in (dict(scale=-1.0), dict(tau=0.5), dict(alpha=1.5), dict(scale=float("nan"))):
        with pytest.raises(ValueError):
            NAG(**bad)
    with pytest.raises(ValueError, match="--guidance"):
        make_guidance("nagg", 7.5)
    assert make_guidance("nag", 7.5).mode == "nag" and make_guidance("nag", 7.5).cfg == 1.0
    assert make_guidance("cfg+nag", 7.5).mode == "cfg+nag" and make_guidance("cfg", 3.0) == Guidance(3.0)


class _HandNAG:
    """A cross-attention processor written from the paper: explicit per-head softmax, the per-token NAG."""

    def __init__(self, negative, s, tau, alpha):
        self.negative, self.s, self.tau, self.alpha = negative, s, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        from diffusers.models.attention_processor import AttnProcessor

        if encoder_hidden_states is None:
            return AttnProcessor()(attn, hidden_states, None, attention_mask)
        q = attn.to_q(hidden_states)
        neg = self.negative.expand(hidden_states.shape[0], -1, -1)
        zp = _hand_attention(q, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), attn.heads)
        zn = _hand_attention(q, attn.to_k(neg), attn.to_v(neg), attn.heads)
        z = _hand_nag_vec(zp, zn, self.s, self.tau, self.alpha).float()
        return attn.to_out[1](attn.to_out[0](z))


def _tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    from reneg.demo_fallback import tiny_unet_blocks

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=4, cross_attention_dim=16, **tiny_unet_blocks()).eval()


def test_diffusers_unet_with_the_processor_equals_a_hand_computation():
    unet = _tiny_unet()
    g = torch.Generator().manual_seed(1)
    x, ctx, neg = (
        torch.randn(2, 4, 4, 4, generator=g),
        torch.randn(2, 7, 16, generator=g),
        torch.randn(1, 7, 16, generator=g),
    )
    t = torch.tensor([500.0, 500.0])
    nag = NAG(5.0, 2.5, 0.25)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        install(unet)
        assert all(isinstance(p, NAGAttnProcessor) for p in unet.attn_processors.values())
        same = unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        ctxk = {"nag": NagContext(neg, None, nag)}
        ours = unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs=ctxk, return_dict=False)[0]
        off = {"nag": NagContext(neg, None, NAG(1.0))}
        ours_off = unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs=off, return_dict=False)[0]
        unet.set_attn_processor(
            {k: _HandNAG(neg, 5.0, 2.5, 0.25) if "attn2" in k else p for k, p in unet.attn_processors.items()}
        )
        hand = unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.equal(same, plain)  # installed, no NAG context: exactly as before
    assert torch.allclose(ours, hand, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the negative changed the output
    assert torch.allclose(ours_off, plain, atol=1e-5)  # scale 1: no negative effect


def test_comfy_patch_protocol_equals_the_diffusers_processor():
    """ComfyUI's BasicTransformerBlock attn2 path (patch, then to_q/k/v, replacement, to_out), run on
    a diffusers cross-attention with our patches, gives what the diffusers processor gives."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    attn.set_processor(AttnProcessor2_0())
    g = torch.Generator().manual_seed(2)
    n, ctx, neg = (
        torch.randn(2, 9, 32, generator=g),
        torch.randn(2, 7, 16, generator=g),
        torch.randn(1, 5, 16, generator=g),
    )
    nag = NAG(4.0, 2.0, 0.5)
    patch, replace = comfy_patches(neg, nag)
    with torch.no_grad():
        ref = NAGAttnProcessor(AttnProcessor2_0())(attn, n, ctx, nag=NagContext(neg, None, nag))
        opts = {"n_heads": 4, "dim_head": 8, "cond_or_uncond": [0]}
        n2, c2, v2 = patch(n, ctx, None, opts)
        comfy = attn.to_out[1](attn.to_out[0](replace(attn.to_q(n2), attn.to_k(c2), attn.to_v(v2), opts)))
        # an unconditional chunk (cond_or_uncond 1) attends to its own context alone
        opts_mixed = {"n_heads": 4, "dim_head": 8, "cond_or_uncond": [1, 0]}
        mixed = attn.to_out[0](replace(attn.to_q(n2), attn.to_k(c2), attn.to_v(v2), opts_mixed))
        plain = AttnProcessor2_0()(attn, n, ctx)
    assert torch.allclose(comfy, ref, atol=1e-5)
    assert torch.allclose(attn.to_out[1](mixed)[1], ref[1], atol=1e-5)
    assert torch.allclose(attn.to_out[1](mixed)[0], plain[0], atol=1e-5)


def test_every_block_mapping_survives_comfy_copies():
    import copy

    from reneg.nag import comfy_transformer_options

    to = comfy_transformer_options({"patches": {"attn2_patch": ["other"]}}, torch.zeros(1, 3, 4), NAG())
    assert to["patches"]["attn2_patch"][0] == "other" and len(to["patches"]["attn2_patch"]) == 2
    for m in (
        to["patches_replace"]["attn2"],
        to["patches_replace"]["attn2"].copy(),
        copy.deepcopy(to)["patches_replace"]["attn2"],
    ):
        assert ("input", 4, 0) in m and ("middle", 0) in m and callable(m[("output", 3, 1)])
    with pytest.raises(ValueError, match="already has an attention replacement"):
        comfy_transformer_options({"patches_replace": {"attn2": {("input", 1): object()}}}, torch.zeros(1, 3, 4), NAG())


def test_sampler_modes_on_the_tiny_model(tiny_backend):
    d = tiny_backend.denoiser
    cond = tiny_backend.encode_prompts(["a red cube", "a cat"])
    neg = tiny_backend.negative_cond(tiny_backend.encode_prompts(["blurry"]).crossattn)
    sig = tiny_backend.schedule(4)
    x = torch.randn(2, *tiny_backend.latent_shape(1, 32, 32)[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, _ = sample(d, x, sig, cond, neg, 1.0)
        off, _ = sample(d, x, sig, cond, neg, Guidance(1.0, NAG(1.0)))
        nag, _ = sample(d, x, sig, cond, neg, Guidance(1.0, NAG()))
        cfg, _ = sample(d, x, sig, cond, neg, 5.0)
        both, _ = sample(d, x, sig, cond, neg, Guidance(5.0, NAG()))
        # batched CFG+NAG rows one at a time equal the batch
        one = cfg_denoise(d, x[:1], torch.tensor([float(sig[1])]), cond.index(slice(0, 1)), neg, Guidance(5.0, NAG()))
        two = cfg_denoise(d, x, torch.tensor([float(sig[1])] * 2), cond, neg, Guidance(5.0, NAG()))
    assert torch.allclose(off, plain, atol=1e-5)
    assert (nag - plain).abs().max() > 1e-3 and (both - cfg).abs().max() > 1e-3
    assert torch.allclose(one, two[:1], atol=1e-5)


def test_gradients_reach_the_negative_through_the_attention(tiny_backend):
    d = tiny_backend.denoiser
    cond = tiny_backend.encode_prompts(["a red cube"])
    x = torch.randn(*tiny_backend.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0])
    for g in (Guidance(1.0, NAG()), Guidance(4.0, NAG())):
        neg = tiny_backend.null_embedding()[0].requires_grad_(True)
        x0 = grad_step_x0(d, x, sigma, cond, tiny_backend.negative_cond(neg), g)
        x0.square().mean().backward()
        assert neg.grad is not None and torch.isfinite(neg.grad).all() and neg.grad.abs().sum() > 0
    # NAG off: the prediction does not depend on the negative
    neg = tiny_backend.null_embedding()[0].requires_grad_(True)
    x0 = grad_step_x0(d, x, sigma, cond, tiny_backend.negative_cond(neg), Guidance(1.0, NAG(1.0)))
    if x0.requires_grad:
        x0.sum().backward()
        assert neg.grad is None or float(neg.grad.abs().max()) < 1e-6


def test_cond_carries_the_negative_through_expand_index_detach_cat():
    c = Cond(torch.randn(1, 4, 3)).with_nag(Cond(torch.randn(1, 2, 3)), NAG())
    e = c.expand(3)
    assert e.nag.crossattn.shape == (3, 2, 3) and e.nag_settings == NAG()
    assert e.index(slice(0, 2)).nag.batch == 2 and e.detach().nag is not None
    both = Cond.cat([e, e])
    assert both.nag.batch == 6 and both.batch == 6
    with pytest.raises(ValueError, match="NAG"):
        Cond.cat([e, e.without_nag()])


def test_denoiser_without_nag_is_refused_by_name():
    def plain(x, sigma, cond):
        return x

    with pytest.raises(ValueError, match="does not apply Normalized Attention Guidance"):
        cfg_denoise(
            plain,
            torch.zeros(1, 4, 2, 2),
            torch.ones(1),
            Cond(torch.zeros(1, 3, 4)),
            Cond(torch.zeros(1, 3, 4)),
            Guidance(1.0, NAG()),
        )


def _nag_call(backend, x, sigma, cond, neg, nag):
    return backend.denoiser(x, sigma, cond.with_nag(neg, nag) if nag is not None else cond)


@pytest.mark.parametrize("kind", ["pixart", "animatediff", "text-to-video"])
def test_every_diffusers_denoiser_applies_nag(kind, tmp_path, tiny_backend, request):
    """The denoisers with their own call (PixArt's transformer with T5 masks, AnimateDiff's per-frame cond, the
    text-to-video UNet3D) pass the negative to the attention: NAG changes the output, scale 1 leaves it, a batch
    of two prompts works; for PixArt the negative's padding rows (mask 0) do not count."""
    if kind == "pixart":
        from reneg.backends.loading import load_diffusers

        backend = load_diffusers(request.getfixturevalue("tiny_pixart_dir"))
        x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    elif kind == "animatediff":
        from diffusers import MotionAdapter

        from reneg.backends.video import load_animatediff

        torch.manual_seed(0)
        MotionAdapter(
            block_out_channels=(32, 64),
            motion_layers_per_block=1,
            motion_num_attention_heads=2,
            motion_norm_num_groups=8,
            motion_max_seq_length=8,
            use_motion_mid_block=False,
        ).save_pretrained(str(tmp_path / "adapter"))
        backend = load_animatediff(tiny_backend, str(tmp_path / "adapter"), frames=2)
        x = torch.randn(2, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    else:
        from reneg.backends.video import load_text_to_video
        from reneg.tiny import build_tiny_text_to_video

        backend = load_text_to_video(build_tiny_text_to_video(str(tmp_path / "t2v"), seed=0), frames=2)
        x = torch.randn(2, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, neg = backend.encode_prompts(["a red circle", "a blue square"]), backend.encode_prompts(["blurry, ugly"])
    sigma = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        plain = _nag_call(backend, x, sigma, cond, neg, None)
        guided = _nag_call(backend, x, sigma, cond, neg, NAG(5.0, 2.5, 0.5))
        off = _nag_call(backend, x, sigma, cond, neg, NAG(1.0))
        if neg.mask is not None:
            pad = neg.mask[0] == 0
            assert pad.any()
            junk = neg.crossattn.clone()
            junk[:, pad] = torch.randn(int(pad.sum()), junk.shape[-1], generator=torch.Generator().manual_seed(3))
            masked = _nag_call(backend, x, sigma, cond, Cond(junk, neg.pooled, neg.extra, neg.mask), NAG(5.0, 2.5, 0.5))
            assert torch.allclose(masked, guided, atol=1e-5)
    assert (guided - plain).abs().max() > 1e-4
    assert torch.allclose(off, plain, atol=1e-5)
