"""PixArt-alpha / PixArt-sigma through the diffusers backend, on small PixArt-architecture folders
with PixArt's real conditioning sizes (T5 width 4096, 120 or 300 tokens with an attention mask,
learned-sigma output, alpha's size conditioning), loaded the way a user's PixArt folder is."""

from __future__ import annotations

import json

import pytest
import torch

from reneg.backends.loading import load_diffusers
from reneg.cli import main
from reneg.cond import Cond
from reneg.embedding import EmbeddingError, NegEmbedding, implied_attention_mask, load_embedding, save_embedding
from reneg.sampling import initial_latent, sample, to_vp
from reneg.tiny import build_tiny_pixart


@pytest.fixture(scope="module")
def alpha_dir(tiny_pixart_dir):
    return tiny_pixart_dir


@pytest.fixture(scope="module")
def alpha(alpha_dir):
    return load_diffusers(alpha_dir)


def _pipe(folder, sigma=False):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    pipe = (PixArtSigmaPipeline if sigma else PixArtAlphaPipeline).from_pretrained(folder, local_files_only=True)
    # DDIM over the folder's config; "leading" spacing steps exactly from one listed timestep to the next,
    # and clip_sample (DDIMScheduler's default) would clip latents to [-1, 1], which no PixArt sampler does
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _leading(backend):
    backend.scheduler_config = dict(backend.scheduler_config, timestep_spacing="leading")
    return backend


def _run(pipe, prompts, noise, steps, **kw):
    if "prompt_embeds" in kw:
        prompts = None
    if "negative_prompt_embeds" in kw:
        kw["negative_prompt"] = None
    return pipe(
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=steps,
        guidance_scale=4.5,
        eta=0.0,
        output_type="latent",
        height=16,
        width=16,
        use_resolution_binning=False,
        clean_caption=False,
        **kw,
    ).images


def _ours(backend, cond, uncond, noise, steps):
    sig = backend.schedule(steps)
    x, _ = sample(backend.denoiser, initial_latent(noise, sig[0]), sig, cond, uncond, 4.5)
    return to_vp(x, sig[-1])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_alpha_encoding_and_sampler_match_diffusers_pixart_pipeline(alpha_dir, alpha):
    assert type(alpha).__name__ == "PixArtBackend" and alpha.family == "pixart"
    assert alpha.denoiser.size_cond and alpha.transformer.config.out_channels == 8  # learned sigma
    pipe = _pipe(alpha_dir)
    prompts = ["a red circle", "a blue square on a green house"]
    pe, pm, npe, npm = pipe.encode_prompt(prompts, negative_prompt="", device="cpu", clean_caption=False)
    cond = alpha.encode_prompts(prompts)
    assert cond.crossattn.shape == (2, 120, 4096) and torch.equal(cond.mask, pm)
    assert torch.allclose(cond.crossattn, pe, atol=1e-5)
    null, _ = alpha.null_embedding()
    assert null.shape == (1, 120, 4096) and torch.allclose(null, npe[:1], atol=1e-5)
    # the empty prompt's mask is the one its rows imply: the end token only
    assert torch.equal(alpha.negative_cond(null).mask, npm[:1]) and int(npm[0].sum()) == 1

    _leading(alpha)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _run(pipe, prompts, noise, 12, negative_prompt="")
    assert _rel(_ours(alpha, cond, alpha.negative_cond(null), noise, 12), ref) < 1e-4

    # a negative given as rows + attention mask (negative_prompt_embeds / negative_prompt_attention_mask)
    neg_rows, neg_mask = alpha._encode_masked(["blurry, ugly, low quality"])
    ref_n = _run(
        pipe,
        prompts,
        noise,
        12,
        prompt_embeds=pe,
        prompt_attention_mask=pm,
        negative_prompt_embeds=neg_rows.expand(2, -1, -1),
        negative_prompt_attention_mask=neg_mask.expand(2, -1),
    )
    ours_n = _ours(alpha, cond, alpha.negative_cond(neg_rows, mask=neg_mask), noise, 12)
    assert _rel(ours_n, ref_n) < 1e-4
    assert _rel(ref_n, ref) > 1e-3  # the negative does reach the transformer
    # the same text negative as eval and train make it (its own tokens, padding left to the mask)
    from reneg.generate import text_negative

    t, _ = text_negative(alpha, "blurry, ugly, low quality")
    assert t.shape[1] == int(neg_mask.sum()) < 120
    assert _rel(_ours(alpha, cond, alpha.negative_cond(t), noise, 12), ref_n) < 1e-4

    # the size conditioning reaches the transformer, and the latent's size is what the pipeline passes
    c2 = Cond(
        cond.crossattn,
        mask=cond.mask,
        extra={
            "resolution": torch.tensor([[40.0, 24.0]]).expand(2, 2),
            "aspect_ratio": torch.tensor([[40 / 24]]).expand(2, 1),
        },
    )
    u2 = Cond(
        null,
        mask=npm[:1],
        extra={"resolution": torch.tensor([[40.0, 24.0]]), "aspect_ratio": torch.tensor([[40 / 24]])},
    )
    assert _rel(_ours(alpha, c2, u2, noise, 12), ref) > 1e-3


def test_official_pixart_file_in_the_negative_path(shared_data, alpha_dir, alpha):
    path = shared_data / "reneg-official" / "pixart-alpha_reneg_emb.bin"
    if not path.is_file():
        pytest.skip("the paper's PixArt-alpha embedding is not in the shared data folder")
    emb = load_embedding(path, expected_family="pixart")
    assert emb.family == "pixart" and emb.tensor.shape == (1, 120, 4096) and emb.attention_mask is None
    # stored without a mask: its 119 padding rows are one row, so it is used with the empty prompt's mask
    mask = emb.mask()
    assert mask.shape == (1, 120) and int(mask.sum()) == 1 and int(mask[0, 0]) == 1
    _, npm = alpha._encode_masked([""])
    assert torch.equal(mask, npm)

    pipe = _pipe(alpha_dir)
    _leading(alpha)
    prompts = ["a red circle"]
    cond = alpha.encode_prompts(prompts)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _run(
        pipe,
        prompts,
        noise,
        10,
        prompt_embeds=cond.crossattn,
        prompt_attention_mask=cond.mask,
        negative_prompt_embeds=emb.tensor,
        negative_prompt_attention_mask=mask,
    )
    ours = _ours(alpha, cond, alpha.negative_cond(emb.tensor.float(), mask=mask), noise, 10)
    assert _rel(ours, ref) < 1e-4
    null_img = _ours(alpha, cond, alpha.negative_cond(alpha.null_embedding()[0]), noise, 10)
    assert _rel(ours, null_img) > 1e-3  # the file changes the image


def test_official_file_converts_with_its_mask(shared_data, tmp_path):
    path = shared_data / "reneg-official" / "pixart-alpha_reneg_emb.bin"
    if not path.is_file():
        pytest.skip("the paper's PixArt-alpha embedding is not in the shared data folder")
    from reneg.embedding import convert

    out = convert(str(path), str(tmp_path / "official.safetensors"))
    assert out.family == "pixart" and torch.equal(out.tensor, load_embedding(path).tensor)
    assert out.attention_mask.tolist() == [[1] + [0] * 119]


def test_mask_round_trip_and_t5_spaces(tmp_path):
    rows = torch.randn(1, 120, 4096) * 0.05
    m = torch.zeros(1, 120, dtype=torch.long)
    m[0, :7] = 1
    p = save_embedding(str(tmp_path / "t5.safetensors"), NegEmbedding(rows, "pixart", attention_mask=m))
    back = load_embedding(p, expected_family="pixart")
    assert torch.equal(back.attention_mask, m) and torch.equal(back.mask(), m)
    # PixArt-alpha and PixArt-sigma share T5-XXL's output space: a 120-row file fits a sigma model
    assert load_embedding(p, expected_family="pixart-sigma").family == "pixart"
    with pytest.raises(EmbeddingError, match="model in use is sd1"):
        load_embedding(p, expected_family="sd1")
    sig = save_embedding(str(tmp_path / "s.safetensors"), NegEmbedding(torch.zeros(1, 300, 4096), "pixart-sigma"))
    s = load_embedding(sig)
    assert s.family == "pixart-sigma" and s.attention_mask.shape == (1, 300) and int(s.attention_mask.sum()) == 1
    # masks are checked: shape, values, and only for T5 families
    with pytest.raises(EmbeddingError, match=r"attention mask must be \[1, 120\]"):
        save_embedding(str(tmp_path / "bad.safetensors"), NegEmbedding(rows, "pixart", attention_mask=m[:, :5]))
    with pytest.raises(EmbeddingError, match="0 and 1 with at least one 1"):
        save_embedding(str(tmp_path / "bad.safetensors"), NegEmbedding(rows, "pixart", attention_mask=m * 0))
    with pytest.raises(EmbeddingError, match="reads every row"):
        save_embedding(
            str(tmp_path / "bad.safetensors"),
            NegEmbedding(torch.zeros(1, 77, 768), "sd1", attention_mask=torch.ones(1, 77)),
        )
    # a diffusers-style dict with negative_prompt_embeds and its mask
    torch.save({"negative_prompt_embeds": rows, "negative_prompt_attention_mask": m}, tmp_path / "d.pt")
    d = load_embedding(tmp_path / "d.pt")
    assert d.family == "pixart" and torch.equal(d.mask(), m)
    # the implied mask: identical padding rows -> the empty prompt's mask; anything else -> every row
    assert int(implied_attention_mask(rows).sum()) == 120


def test_pixart_folders_are_recognised_by_the_family_tables_pipelines():
    from reneg.backends.pixart import PIPELINES, pixart_family

    assert PIPELINES == {"PixArtAlphaPipeline": "pixart", "PixArtSigmaPipeline": "pixart-sigma"}
    assert pixart_family({"_class_name": "PixArtSigmaPipeline"}) == "pixart-sigma"
    assert pixart_family({"_class_name": "StableDiffusionPipeline"}) is None and pixart_family({}) is None


def test_masked_conds_batch_by_padding():
    a = Cond(torch.ones(1, 5, 8), mask=torch.ones(1, 5, dtype=torch.long))
    b = Cond(torch.ones(1, 2, 8), mask=torch.tensor([[1, 1]]))
    c = Cond.cat([a, b])
    assert c.crossattn.shape == (2, 5, 8) and c.mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert c.crossattn[1, 2:].abs().sum() == 0
    assert a.expand(3).mask.shape == (3, 5)


@pytest.mark.slow
def test_sigma_v_prediction_matches_pixart_sigma_pipeline(tmp_path):
    folder = build_tiny_pixart(str(tmp_path / "sigma"), seed=1, sigma=True, prediction_type="v_prediction")
    sg = load_diffusers(folder)
    assert sg.family == "pixart-sigma" and not sg.denoiser.size_cond and sg.prediction_type == "v_prediction"
    pipe = _pipe(folder, sigma=True)
    prompts = ["a cat", "a photo of a dog"]
    cond = sg.encode_prompts(prompts)
    null, _ = sg.null_embedding()
    assert cond.crossattn.shape == (2, 300, 4096) and null.shape == (1, 300, 4096)
    _leading(sg)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _run(pipe, prompts, noise, 10, negative_prompt="")
    assert _rel(_ours(sg, cond, sg.negative_cond(null), noise, 10), ref) < 1e-4
    # the authors' 120-row T5 negative on a 300-token model: padded with rows the mask leaves out
    rows = torch.randn(1, 120, 4096) * 0.05
    m = torch.zeros(1, 120, dtype=torch.long)
    m[0, :3] = 1
    ref2 = _run(
        pipe,
        prompts,
        noise,
        10,
        prompt_embeds=cond.crossattn,
        prompt_attention_mask=cond.mask,
        negative_prompt_embeds=torch.cat([rows, torch.zeros(1, 180, 4096)], 1).expand(2, -1, -1),
        negative_prompt_attention_mask=torch.cat([m, torch.zeros(1, 180, dtype=torch.long)], 1).expand(2, -1),
    )
    assert _rel(_ours(sg, cond, sg.negative_cond(rows, mask=m), noise, 10), ref2) < 1e-4


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")))
    return str(p)


@pytest.mark.slow
def test_pixart_train_tune_and_eval_through_the_cli(tmp_path, alpha_dir, alpha, tiny_hps_ckpt, shared_data, capsys):
    prompts = _prompts(tmp_path)
    out = tmp_path / "run"
    common = [
        "--model",
        alpha_dir,
        "--reward",
        f"hpsv2={tiny_hps_ckpt}",
        "--sampling-steps",
        "4",
        "--grad-range",
        "0",
        "1",
        "--resolution",
        "16",
    ]
    rc = main(
        [
            "train",
            *common,
            "--prompts",
            prompts,
            "--heldout-count",
            "2",
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--micro-batch",
            "2",
            "--lr",
            "0.05",
            "--eval-every",
            "3",
            "--no-progress",
            "--handcrafted",
            "blurry",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "pixart" and set(summary["heldout"]) == {"null", "handcrafted", "learned", "diversity"}
    emb = load_embedding(out / "embedding.safetensors", expected_family="pixart")
    null, _ = alpha.null_embedding()
    # 120 rows; trained with the empty prompt's mask, only the first row moves and the mask is stored
    assert emb.tensor.shape == (1, 120, 4096) and not torch.allclose(emb.tensor[:, :1], null[:, :1])
    assert torch.equal(emb.tensor[:, 1:], null[:, 1:]) and emb.attention_mask.tolist() == [[1] + [0] * 119]

    tuned = tmp_path / "tuned.safetensors"
    rc = main(
        [
            "tune",
            *common,
            "--prompt",
            "a red circle",
            "--seed",
            "1",
            "--max-steps",
            "2",
            "--patience",
            "2",
            "--lr",
            "0.05",
            "--embedding",
            str(out / "embedding.safetensors"),
            "--out",
            str(tuned),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    t = load_embedding(tuned, expected_family="pixart")
    assert t.metadata["kind"] == "per-sample" and t.attention_mask.shape == (1, 120)

    negs = [
        "--negative",
        "null",
        "--negative",
        "handcrafted:blurry, ugly",
        "--negative",
        f"learned={out / 'embedding.safetensors'}",
    ]
    names = ["null", "handcrafted", "learned"]
    official = shared_data / "reneg-official" / "pixart-alpha_reneg_emb.bin"
    if official.is_file():
        negs += ["--negative", f"official={official}"]
        names.append("official")
    ev = tmp_path / "eval"
    rc = main(
        [
            "eval",
            *common,
            "--prompts",
            prompts,
            "--limit",
            "2",
            *negs,
            "--batch",
            "2",
            "--out",
            str(ev),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    s = json.loads((ev / "summary.json").read_text())
    assert [n["name"] for n in s["negatives"]] == names
    assert s["images"] == {n: 2 for n in names}


def test_rows_alone_keep_their_mask(alpha):
    """Code that passes a negative as rows only (train --init, tune --embedding, a handcrafted start)
    keeps the mask: padding travels as zero rows, which the rows' implied mask leaves out."""
    from reneg.generate import as_embedding, text_negative

    rows, _ = text_negative(alpha, "blurry, ugly, low quality")
    n = rows.shape[1]
    emb = as_embedding(alpha, rows)
    assert emb.family == "pixart" and emb.tensor.shape == (1, 120, 4096)
    assert emb.attention_mask.tolist() == [[1] * n + [0] * (120 - n)]
    full, mask = alpha._encode_masked(["blurry, ugly, low quality"])
    stored = NegEmbedding(full, "pixart", attention_mask=mask)  # diffusers' negative_prompt_embeds + mask
    assert int(implied_attention_mask(full).sum()) == 120  # T5's padding rows are not one row here
    assert torch.equal(implied_attention_mask(stored.model_rows()), mask)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = alpha.encode_prompts(["a cat"])
    with torch.no_grad():
        for s in (0.5, 5.0):
            sig = torch.tensor([s])
            a = alpha.denoiser(x, sig, alpha.negative_cond(stored.model_rows()))
            torch.testing.assert_close(a, alpha.denoiser(x, sig, alpha.negative_cond(full, mask=mask)))
            torch.testing.assert_close(a, alpha.denoiser(x, sig, alpha.negative_cond(rows)))
    assert cond.mask.shape == (1, 120)


# --------------------------------------------------------------------------- a tokenizer as published: spiece.model


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(num: int, kind: int, payload: bytes) -> bytes:
    return _varint(num << 3 | kind) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def write_spiece_tokenizer(folder, words=("a", "red", "circle", "cat", "blurry")):
    """A T5 tokenizer folder in the layout PixArt's model card publishes: ``spiece.model`` (a
    SentencePiece unigram model, written here byte by byte in its protobuf format, so no package is
    needed to make it) and ``tokenizer_config.json``, without ``tokenizer.json``."""
    import struct

    pieces = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)]
    pieces += [("\u2581" + w, -1.0 - i, 1) for i, w in enumerate(words)]
    pieces += [(c, -20.0, 1) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    model = b"".join(
        _bytes_field(1, _bytes_field(1, p.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, _varint(t)))
        for p, s, t in pieces
    )
    trainer = _field(3, 0, _varint(1)) + _field(4, 0, _varint(len(pieces)))  # unigram, vocab size
    trainer += _field(40, 0, _varint(2)) + _field(41, 0, _varint(2**64 - 1))  # unk 2, no bos
    trainer += _field(42, 0, _varint(1)) + _field(43, 0, _varint(0))  # eos 1, pad 0
    normalizer = _bytes_field(1, b"identity") + _field(3, 0, _varint(1)) + _field(4, 0, _varint(1))
    normalizer += _field(5, 0, _varint(1))
    model += _bytes_field(2, trainer) + _bytes_field(3, normalizer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model)
    cfg = {"tokenizer_class": "T5Tokenizer", "model_max_length": 120, "extra_ids": 0}
    cfg.update(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture()
def spiece_pixart(alpha_dir, tmp_path):
    import shutil

    folder = tmp_path / "PixArt-spiece"
    shutil.copytree(alpha_dir, folder)
    shutil.rmtree(folder / "tokenizer")
    write_spiece_tokenizer(folder / "tokenizer")
    return folder


@pytest.mark.parametrize("absent", ["sentencepiece", "google.protobuf"])
def test_a_spiece_tokenizer_without_its_packages_names_the_files_and_the_packages(spiece_pixart, absent, monkeypatch):
    import sys

    from reneg.backends.diffusers_backend import ModelLoadError

    monkeypatch.setitem(sys.modules, absent, None)  # as if it were not installed (it may or may not be)
    with pytest.raises(ModelLoadError) as e:
        load_diffusers(str(spiece_pixart))
    msg = str(e.value)
    assert str(spiece_pixart / "tokenizer") in msg and "spiece.model" in msg and "tokenizer_config.json" in msg
    assert "no tokenizer.json" in msg and "pip install sentencepiece protobuf" in msg
    assert {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}[absent] in msg.split("not installed")[1]
    assert "tiktoken" not in msg


def test_a_spiece_tokenizer_loads_where_its_packages_are_installed(spiece_pixart):
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    backend = load_diffusers(str(spiece_pixart))
    ids = backend.tokenizer("a red circle").input_ids
    assert backend.tokenizer.convert_ids_to_tokens(ids) == ["\u2581a", "\u2581red", "\u2581circle", "</s>"]
    assert backend.encode_prompts(["a red circle"]).mask[0, :5].tolist() == [1, 1, 1, 1, 0]


def test_an_unreadable_tokenizer_says_what_was_found(spiece_pixart):
    (spiece_pixart / "tokenizer" / "spiece.model").write_bytes(b"\xff not a sentencepiece model")
    (spiece_pixart / "tokenizer" / "tokenizer.json").write_text("{ not json")
    from reneg.backends.diffusers_backend import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"could not read the tokenizer.*found spiece\.model, tokenizer\.json"):
        load_diffusers(str(spiece_pixart))


def test_the_extras_that_bring_transformers_bring_what_a_spiece_tokenizer_needs():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    with_transformers = [k for k, v in extras.items() if any(d.startswith("transformers") for d in v)]
    assert {"train", "eval", "studio"} <= set(with_transformers)
    for k in with_transformers:
        names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in extras[k]}
        assert {"sentencepiece", "protobuf"} <= names, k
