"""ReNeg NAG and the tune node under NAG, in the ComfyUI pack loaded by path under the stubs of ``comfy.*``
(tests/comfy_stubs.py, whose model follows ComfyUI's attn2 patch protocol): the patched MODEL samples
what our diffusers NAG samples, strength 0 is no negative, a negative of another family is refused by name,
and the tune node learns through NAG."""

from __future__ import annotations

import pytest
import torch

import comfy_stubs
import test_comfy_nodes
from test_comfy_nodes import ROOT, _conds, _tune_args, node


@pytest.fixture
def host(tmp_path):
    h = comfy_stubs.Host(str(tmp_path / "models"))
    try:
        h.pack = h.load_pack(str(ROOT))
        yield h
    finally:
        h.close()


@pytest.fixture
def hps(host, tiny_hps_ckpt):
    return test_comfy_nodes.reward.__wrapped__(host, tiny_hps_ckpt)


@pytest.fixture(scope="module")
def models(tiny_pipeline_dir):
    return comfy_stubs.tiny_comfy_models(tiny_pipeline_dir)


def _sample(model, pos, seed=0):
    """What a KSampler at cfg 1 makes: the ReNeg sampler over ComfyUI's apply_model with the MODEL's options."""
    from reneg.backends.comfy_backend import ComfyDenoiser
    from reneg.cond import Cond
    from reneg.sampling import initial_latent, sample, uniform_schedule

    ms = model.model.model_sampling
    sig = uniform_schedule(ms.sigmas, 4)
    x = initial_latent(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), sig[0])
    c = Cond(pos[0][0])
    with torch.no_grad():
        out, _ = sample(ComfyDenoiser(model), x, sig, c, c, 1.0)
    return out


def test_nag_node_patches_like_the_core_and_strength_zero_is_no_negative(host, models):
    from reneg.backends.comfy_backend import ComfyDenoiser
    from reneg.cond import Cond
    from reneg.nag import NAG, Guidance
    from reneg.sampling import initial_latent, sample, uniform_schedule

    model, _, clip = models
    pos, _ = _conds(clip)
    with torch.inference_mode():
        neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, dark"))
    nag_node = node(host, "ReNegNAG")
    patched = nag_node.patch(model, neg, 5.0, 2.5, 0.25, 1.0)[0]
    off = nag_node.patch(model, neg, 5.0, 2.5, 0.25, 0.0)[0]
    assert patched is not model and not model.model_options["transformer_options"].get("patches")
    plain, guided, none = _sample(model, pos), _sample(patched, pos), _sample(off, pos)
    assert torch.equal(none, plain)  # strength 0: the model unchanged
    assert (guided - plain).abs().max() > 1e-3  # the negative acts
    # the node's patched model samples what the core's NAG guidance samples on the same model
    ms = model.model.model_sampling
    sig = uniform_schedule(ms.sigmas, 4)
    x = initial_latent(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), sig[0])
    with torch.no_grad():
        core, _ = sample(ComfyDenoiser(model), x, sig, Cond(pos[0][0]), Cond(neg[0][0]), Guidance(1.0, NAG()))
    assert torch.allclose(core, guided, atol=1e-4)


def test_nag_node_refuses_another_familys_negative_by_name(host, models):
    model, _, _ = models
    wrong = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(Exception, match="sd1.*hidden size 768.*tiny|hidden size 768"):
        node(host, "ReNegNAG").patch(model, wrong, 5.0, 2.5, 0.25, 1.0)
    with pytest.raises(Exception, match="nag_alpha"):
        node(host, "ReNegNAG").patch(model, _conds(models[2])[1], 5.0, 2.5, 1.5, 1.0)


def test_tune_node_learns_through_nag(host, models, hps):
    model, _, clip = models
    pos, neg = _conds(clip)
    with torch.inference_mode():
        out = node(host, "ReNegPerSampleTune").tune(**_tune_args(models, pos, neg, hps, guidance="nag", cfg=1.0))
    tuned, r0, r1 = out["result"]
    assert r1 >= r0 and tuned[0][1]["reneg"]["guidance"] == "nag"
    assert not torch.equal(tuned[0][0], neg[0][0][:, :77])  # the search moved the negative
    assert not model.model_options["transformer_options"].get("patches")  # the host's model is left as it was


def test_nag_on_a_model_that_ignores_attn2_patches_is_refused_by_name(host, tiny_pixart_dir):
    """ComfyUI's DiTs (PixArt here) do not apply attn2 patches: the NAG node and the tune node under NAG
    stop with the model's name instead of sampling as if there were no negative."""
    model, _, clip = comfy_stubs.tiny_comfy_pixart_models(tiny_pixart_dir)
    with torch.inference_mode():  # as ComfyUI runs every node
        neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    from reneg.nag import NAG, patch_comfy_model

    with pytest.raises(ValueError, match="pixart.*does not read ComfyUI's cross-attention patches") as refused:
        patch_comfy_model(model, torch.zeros(1, 120, 4096), NAG())
    # the message names the path that does exist for the DiTs ComfyUI-NAG covers: our negative as its nag_negative
    assert "nag_negative input of ComfyUI-NAG's KSamplerWithNAG" in str(refused.value)
    with pytest.raises(Exception, match="pixart.*does not read ComfyUI's cross-attention patches"):
        node(host, "ReNegNAG").patch(model, neg, 5.0, 2.5, 0.25, 1.0)
