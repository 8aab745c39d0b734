"""ReNeg Predicted Negative (nodes/predicted_negative.py): a predictor file from the pack's folder turns the
positive CONDITIONING into its own negative, in the form Load ReNeg Embedding gives for the family; loaded
by path under the ComfyUI stubs (tests/comfy_stubs.py), run inside ``torch.inference_mode()`` as ComfyUI's
executor runs nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfy_stubs
from reneg.embedding import NegEmbedding, save_embedding
from reneg.predictor import from_embedding, save_predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def host(tmp_path):
    h = comfy_stubs.Host(str(tmp_path / "models"))
    try:
        h.pack = h.load_pack(str(ROOT))
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def models(tiny_pipeline_dir):
    return comfy_stubs.tiny_comfy_models(tiny_pipeline_dir)


def node(host, name):
    return host.pack.NODE_CLASS_MAPPINGS[name]()


def run(fn, *args, **kwargs):
    with torch.inference_mode():
        out = fn(*args, **kwargs)
    return out["result"] if isinstance(out, dict) else out


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def folder(host) -> Path:
    f = Path(host.models_dir) / "reneg"
    f.mkdir(parents=True, exist_ok=True)
    return f


def write_pair(host, family="tiny", hidden=64, pooled=None, random_readout=False, seed=0):
    """A global embedding file and a predictor around it (zero read-out, or a random one with a feature mean:
    the file's centring travels through the node)."""
    g = torch.Generator().manual_seed(seed)
    emb = NegEmbedding(
        torch.randn(1, 77, hidden, generator=g), family, torch.randn(1, pooled, generator=g) if pooled else None
    )
    save_embedding(str(folder(host) / "global.safetensors"), emb)
    model = from_embedding(emb, "lowrank", rank=3, seed=seed)
    if random_readout:
        with torch.no_grad():
            model.up.normal_(0.0, 1.0, generator=g)
            if model.up_pooled is not None:
                model.up_pooled.normal_(0.0, 1.0, generator=g)
        model.set_feature_mean(0.5 * torch.randn(model.feature_mean.shape, generator=g))
    save_predictor(str(folder(host) / "pred.safetensors"), model, guidance="cfg")
    return emb, model


def test_zero_initialised_predictor_gives_exactly_its_global_negative(host, models):
    _, _, clip = models
    write_pair(host)
    pred, load = node(host, "ReNegPredictedNegative"), node(host, "ReNegLoadEmbedding")
    assert "pred.safetensors" in pred.INPUT_TYPES()["required"]["predictor"][0]
    base = encode(clip, "ugly, blurry")
    for prompt in ("a red circle", "a blue square on grass"):
        positive = encode(clip, prompt)
        for strength, base_negative in ((1.0, None), (0.5, base), (0.0, None)):
            (got,) = run(pred.predict, "pred.safetensors", positive, clip, strength, base_negative=base_negative)
            (want,) = run(load.load, "global.safetensors", clip, strength, base_negative=base_negative)
            assert len(got) == len(want) == 1
            assert torch.equal(got[0][0], want[0][0]), (prompt, strength)
            assert torch.equal(got[0][1]["pooled_output"], want[0][1]["pooled_output"])
            assert got[0][1]["reneg_learned_under"] == "cfg"


def test_trained_predictor_gives_each_prompt_its_own_negative(host, models, tiny_backend):
    from reneg.predictor import predicted_cond

    _, _, clip = models
    _, model = write_pair(host, random_readout=True)
    pred = node(host, "ReNegPredictedNegative")
    outs = {}
    for prompt in ("a red circle", "a blue square on grass"):
        positive = encode(clip, prompt)
        (neg,) = run(pred.predict, "pred.safetensors", positive, clip, 1.0)
        assert neg[0][0].shape == (1, 77, 64)
        with torch.no_grad():  # the core's predictor on the same conditioning gives the same rows ...
            expect, _ = model(positive[0][0].float())
            # ... and on the prompt as the trainer and `reneg eval` encode it (the same negative)
            trained = predicted_cond(model, tiny_backend.encode_prompts([prompt])).crossattn
        torch.testing.assert_close(neg[0][0], expect)
        torch.testing.assert_close(neg[0][0], trained, rtol=1e-4, atol=1e-5)
        outs[prompt] = neg[0][0]
    assert (outs["a red circle"] - outs["a blue square on grass"]).abs().max() > 1e-3
    # a long positive (two 77-row chunks) still gives one 77-row negative
    long = [[torch.cat([positive[0][0]] * 2, 1), dict(positive[0][1])]]
    (neg,) = run(pred.predict, "pred.safetensors", long, clip, 1.0)
    assert neg[0][0].shape == (1, 77, 64) and bool(torch.isfinite(neg[0][0]).all())


class _SDXLClip:
    """Just enough of an SDXL CLIP for the node: the empty prompt's [1, 77, 2048] and pooled [1, 1280]."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]


def test_sdxl_predictor_predicts_the_pooled_vector_too(host):
    _, model = write_pair(host, family="sdxl", hidden=2048, pooled=1280, random_readout=True, seed=3)
    pred = node(host, "ReNegPredictedNegative")
    g = torch.Generator().manual_seed(5)
    positive = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    (neg,) = run(pred.predict, "pred.safetensors", positive, _SDXLClip(), 1.0)
    with torch.no_grad():
        rows, pooled = model(positive[0][0], positive[0][1]["pooled_output"])
    torch.testing.assert_close(neg[0][0], rows)
    torch.testing.assert_close(neg[0][1]["pooled_output"], pooled)
    (half,) = run(pred.predict, "pred.safetensors", positive, _SDXLClip(), 0.5)
    torch.testing.assert_close(half[0][1]["pooled_output"], 0.5 * pooled)  # the empty prompt's is zero


def test_predictor_errors_are_clear(host, models):
    _, _, clip = models
    emb = NegEmbedding(torch.randn(1, 77, 768), "sd1")
    save_predictor(str(folder(host) / "sd1_pred.safetensors"), from_embedding(emb))
    pred = node(host, "ReNegPredictedNegative")
    positive = encode(clip, "a red circle")
    with pytest.raises(RuntimeError) as e:
        run(pred.predict, "sd1_pred.safetensors", positive, clip, 1.0)
    msg = str(e.value)
    assert msg.startswith("ReNeg Predicted Negative:") and "sd1 predictor" in msg and "tiny" in msg, msg
    write_pair(host)
    with pytest.raises(RuntimeError, match="not a ReNeg predictor"):
        run(pred.predict, "global.safetensors", positive, clip, 1.0)
    with pytest.raises(RuntimeError, match="positive: expected a CONDITIONING"):
        run(pred.predict, "pred.safetensors", [], clip, 1.0)
    with pytest.raises(RuntimeError, match="strength must be between 0 and 1"):
        run(pred.predict, "pred.safetensors", positive, clip, 1.5)
    # Load ReNeg Embedding handed the predictor says what it is and where it goes
    with pytest.raises(RuntimeError, match="ReNeg Predicted Negative node"):
        run(node(host, "ReNegLoadEmbedding").load, "pred.safetensors", clip, 1.0)


class _T5Clip:
    """Just enough of ComfyUI's PixArt CLIP for the node: T5 rows unpadded, no pooled vector."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1, 1, 4096), {"pooled_output": None}]]


def test_t5_predictor_gives_the_rows_its_mask_keeps_as_load_does(host):
    g = torch.Generator().manual_seed(7)
    mask = torch.zeros(1, 120, dtype=torch.long)
    mask[:, :9] = 1
    emb = NegEmbedding(torch.randn(1, 120, 4096, generator=g) * mask[..., None], "pixart", attention_mask=mask)
    save_embedding(str(folder(host) / "global.safetensors"), emb)
    model = from_embedding(emb, "xattn", rank=2)
    save_predictor(str(folder(host) / "pred.safetensors"), model)
    pred, load = node(host, "ReNegPredictedNegative"), node(host, "ReNegLoadEmbedding")
    positive = [[torch.randn(1, 14, 4096, generator=g), {"pooled_output": None}]]  # a prompt's unpadded rows
    (got,) = run(pred.predict, "pred.safetensors", positive, _T5Clip(), 1.0)
    (want,) = run(load.load, "global.safetensors", _T5Clip(), 1.0)
    assert got[0][0].shape == (1, 9, 4096) and torch.equal(got[0][0], want[0][0])
    with torch.no_grad():  # a trained read-out moves the kept rows, per prompt
        model.mix.normal_(0.0, 1.0, generator=g)
    save_predictor(str(folder(host) / "pred2.safetensors"), model)
    (a,) = run(pred.predict, "pred2.safetensors", positive, _T5Clip(), 1.0)
    other = [[torch.randn(1, 6, 4096, generator=g), {"pooled_output": None}]]
    (b,) = run(pred.predict, "pred2.safetensors", other, _T5Clip(), 1.0)
    assert a[0][0].shape == b[0][0].shape == (1, 9, 4096)
    assert (a[0][0] - b[0][0]).abs().max() > 1e-3 and not torch.equal(a[0][0], want[0][0])


def test_each_positive_entry_gets_its_own_negative(host, models):
    _, _, clip = models
    _, model = write_pair(host, random_readout=True)
    pred = node(host, "ReNegPredictedNegative")
    a, b = encode(clip, "a red circle"), encode(clip, "a blue square on grass")
    combined = [a[0], [b[0][0], dict(b[0][1], area=(8, 8, 0, 0))]]  # Conditioning Combine / an area prompt
    (neg,) = run(pred.predict, "pred.safetensors", combined, clip, 1.0)
    assert len(neg) == 2
    with torch.no_grad():
        for entry, prompt in zip(neg, (a, b)):
            torch.testing.assert_close(entry[0], model(prompt[0][0])[0])
    base = encode(clip, "ugly")
    with pytest.raises(RuntimeError, match="positive has 2 entries and base_negative 3"):
        run(pred.predict, "pred.safetensors", combined, clip, 0.5, base_negative=base * 3)
