"""Wan 2.1 / 2.2 text-to-video: small WanPipeline folders (Wan's real text width 4096 and 512 rows, its
transformer and VAE architectures), loaded through the user's path and checked against diffusers'
WanPipeline given the same negative_prompt_embeds, for Wan 2.1 and Wan 2.2 A14B's expert switch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg.backends.diffusers_backend import ModelLoadError
from reneg.backends.loading import load_diffusers, makes_videos
from reneg.backends.wan import WanBackend, latent_frames
from reneg.sampling import initial_latent, is_flow, sample
from reneg.tiny import build_tiny_wan


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return build_tiny_wan(str(tmp_path_factory.mktemp("wan") / "wan21"))


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return build_tiny_wan(str(tmp_path_factory.mktemp("wan") / "wan22"), seed=1, experts=2)


def _pipe(folder, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(
        folder, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(b, cond, neg, noise, steps, scale):
    sig = b.schedule(steps)
    x, _ = sample(b.denoiser, initial_latent(noise, sig[0], is_flow(b)), sig, cond, b.negative_cond(neg), scale)
    return x


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_wan21_matches_diffusers_pipeline(wan21):
    assert makes_videos(wan21)
    b = load_diffusers(wan21, frames=5)
    assert isinstance(b, WanBackend) and b.family == "wan" and b.experts == 1 and is_flow(b)
    assert b.latent_shape(2, 16, 16) == (2, 16, 2, 2, 2)
    pipe = _pipe(wan21, b.shift)
    prompts = ["a red circle", "a blue square on a green house"]
    pe, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    cond = b.encode_prompts(prompts)
    assert cond.crossattn.shape == (2, 512, 4096) and torch.allclose(cond.crossattn, pe, atol=1e-5)
    # rows past each prompt's tokens (and its end token) are zero, as in the pipeline
    assert int((cond.crossattn[0].abs().sum(-1) > 0).sum()) == len(pipe.tokenizer("a red circle").input_ids)
    null, _ = b.null_embedding()
    npe, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=512)
    assert torch.allclose(null, npe, atol=1e-5) and int((null[0].abs().sum(-1) > 0).sum()) == 1
    noise = torch.randn(2, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    learned = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1))
    for neg in (null, learned):
        ref = pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=neg.expand(2, -1, -1),
            latents=noise.clone(),
            num_inference_steps=6,
            guidance_scale=5.0,
            height=16,
            width=16,
            num_frames=5,
            output_type="latent",
        ).frames
        got = _ours(b, cond, neg, noise, 6, 5.0)
        assert _rel(got, ref) < 1e-4
    assert _rel(_ours(b, cond, learned, noise, 6, 5.0), _ours(b, cond, null, noise, 6, 5.0)) > 1e-3
    # decoding: the pipeline's latents_mean / latents_std and AutoencoderKLWan; 2 latent frames are 5 frames
    video = pipe(
        prompt_embeds=pe[:1],
        negative_prompt_embeds=null,
        latents=noise[:1].clone(),
        num_inference_steps=3,
        guidance_scale=5.0,
        height=16,
        width=16,
        num_frames=5,
        output_type="pt",
    ).frames
    frames = b.decode(_ours(b, cond.index(slice(0, 1)), null, noise[:1], 3, 5.0))
    assert frames.shape == (5, 3, 16, 16)
    assert (((frames + 1) / 2).clamp(0, 1) - video[0]).abs().max().item() < 1e-4


def test_wan22_a14b_expert_switch_matches_diffusers_with_two_guidance_scales(wan22):
    b = load_diffusers(wan22)  # no frames: image mode, one frame
    assert b.experts == 2 and b.boundary_ratio == 0.875 and b.latent_shape(1, 16, 16) == (1, 16, 1, 2, 2)
    sig = b.schedule(8)
    used = [b.denoiser.expert(float(s)) for s in sig[:-1]]
    assert used[0] == 0 and used[-1] == 1 and sorted(used) == used  # high-noise expert first, then the low
    pipe = _pipe(wan22, b.shift)
    prompts = ["a red circle"]
    pe, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    cond = b.encode_prompts(prompts)
    neg = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    kw = dict(latents=noise.clone(), num_inference_steps=8, height=16, width=16, num_frames=1, output_type="latent")
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=neg, guidance_scale=5.0, guidance_scale_2=2.0, **kw).frames
    b.denoiser.guidance_2 = 2.0
    try:
        got = _ours(b, cond, neg, noise, 8, 5.0)
    finally:
        b.denoiser.guidance_2 = None
    assert _rel(got, ref) < 1e-4
    one = pipe(prompt_embeds=pe, negative_prompt_embeds=neg, guidance_scale=5.0, **kw).frames
    assert _rel(_ours(b, cond, neg, noise, 8, 5.0), one) < 1e-4 and _rel(one, ref) > 1e-3


def test_wan22_ti2v_5b_shape_matches_diffusers_pipeline(tmp_path):
    """Wan 2.2 TI2V 5B used for text to video, on a small folder of its shape: 48 latent channels, Wan 2.2's
    VAE (residual, 2 x 2 patches, 16x spatial in the release; 8x here), ``expand_timesteps`` (one timestep per
    latent token, as ``WanPipeline`` feeds this model): our sampling equals the pipeline's for the empty and a
    learned negative, and the decoded video is the pipeline's."""
    import shutil

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    folder = build_tiny_wan(str(tmp_path / "ti2v"), seed=5)
    torch.manual_seed(5)
    shutil.rmtree(os.path.join(folder, "transformer"))
    shutil.rmtree(os.path.join(folder, "vae"))
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48,
                          out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6,
                          rope_max_seq_len=32).save_pretrained(os.path.join(folder, "transformer"))  # fmt: skip
    AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True], is_residual=True, in_channels=12, out_channels=12,
                     patch_size=2, scale_factor_temporal=2, scale_factor_spatial=8, latents_mean=[0.1] * 48,
                     latents_std=[1.5] * 48).save_pretrained(os.path.join(folder, "vae"))  # fmt: skip
    index = os.path.join(folder, "model_index.json")
    with open(index) as f:
        idx = json.load(f)
    idx["expand_timesteps"] = True
    with open(index, "w") as f:
        json.dump(idx, f)
    b = load_diffusers(folder, frames=5)
    assert b.model_info["expand_timesteps"] and b.latent_shape(2, 32, 32) == (2, 48, 3, 4, 4)
    pipe = _pipe(folder, b.shift)
    assert pipe.config.expand_timesteps
    prompts = ["a red circle", "a blue square on a green house"]
    pe, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    cond = b.encode_prompts(prompts)
    null, _ = b.null_embedding()
    noise = torch.randn(*b.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(0))
    learned = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1))
    for neg in (null, learned):
        ref = pipe(prompt_embeds=pe, negative_prompt_embeds=neg.expand(2, -1, -1), latents=noise.clone(),
                   num_inference_steps=6, guidance_scale=5.0, height=32, width=32, num_frames=5,
                   output_type="latent").frames  # fmt: skip
        assert _rel(_ours(b, cond, neg, noise, 6, 5.0), ref) < 1e-5
    video = pipe(prompt_embeds=pe[:1], negative_prompt_embeds=null, latents=noise[:1].clone(), num_inference_steps=3,
                 guidance_scale=5.0, height=32, width=32, num_frames=5, output_type="pt").frames  # fmt: skip
    frames = b.decode(_ours(b, cond.index(slice(0, 1)), null, noise[:1], 3, 5.0))
    assert frames.shape == (5, 3, 32, 32)
    assert (((frames + 1) / 2).clamp(0, 1) - video[0]).abs().max().item() < 1e-5


def test_wan_refusals(tmp_path, wan21):
    assert latent_frames(1) == 1 and latent_frames(9) == 3
    with pytest.raises(ModelLoadError, match="4 k \\+ 1 frames"):
        load_diffusers(wan21, frames=16)
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    assert makes_videos(str(i2v))
    with pytest.raises(ModelLoadError, match="an image-to-video model .*text-to-video"):
        load_diffusers(str(i2v))
    with pytest.raises(ModelLoadError, match="flow-matching"):
        load_diffusers(wan21, prediction_type="v")
    assert os.path.isdir(os.path.join(wan21, "transformer"))


def test_one_negative_per_expert_matches_the_pipeline_switching_negatives_at_the_boundary(wan22):
    """--wan-experts per-expert: the high-noise expert reads the file's first 512 rows, the low-noise
    expert the last 512; the pipeline does the same when its negative_prompt_embeds are swapped (through
    its step callback) where the experts switch."""
    from reneg.backends.loading import apply_model_options

    b = apply_model_options(load_diffusers(wan22), "per-expert", 2.0)
    assert b.family == "wan-experts" and b.null_embedding()[0].shape == (1, 1024, 4096)
    high = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(4))
    low = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(5))
    cond = b.encode_prompts(["a red circle"])
    noise = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    sig = b.schedule(8)
    got = _ours(b, cond, torch.cat([high, low], 1), noise, 8, 5.0)
    pipe = _pipe(wan22, b.shift)

    def swap(p, i, t, kw):
        return {"negative_prompt_embeds": low} if b.denoiser.expert(float(sig[i + 1])) == 1 else {}

    ref = pipe(
        prompt_embeds=cond.crossattn,
        negative_prompt_embeds=high,
        guidance_scale=5.0,
        guidance_scale_2=2.0,
        latents=noise.clone(),
        num_inference_steps=8,
        height=16,
        width=16,
        num_frames=1,
        output_type="latent",
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["negative_prompt_embeds"],
    ).frames
    assert _rel(got, ref) < 1e-4
    shared_b = load_diffusers(wan22)
    with pytest.raises(ValueError, match="wan-experts negative .*per-expert"):
        shared_b.negative_cond(torch.cat([high, low], 1))


def test_expert_files_and_options_are_refused_where_they_do_not_fit(tmp_path, wan21, wan22):
    from reneg.backends.loading import apply_model_options
    from reneg.embedding import EmbeddingError, NegEmbedding, load_embedding, save_embedding

    two = save_embedding(str(tmp_path / "two.safetensors"), NegEmbedding(torch.zeros(1, 1024, 4096), "wan-experts"))
    one = save_embedding(str(tmp_path / "one.safetensors"), NegEmbedding(torch.zeros(1, 512, 4096), "wan"))
    with pytest.raises(EmbeddingError, match=r"wan-experts embedding \(Wan 2.2 A14B.*model in use is wan \(Wan 2.1"):
        load_embedding(two, expected_family="wan")
    with pytest.raises(EmbeddingError, match="a wan embedding .*model in use is wan-experts"):
        load_embedding(one, expected_family="wan-experts")
    with pytest.raises(EmbeddingError, match="a wan embedding .*model in use is pixart"):
        load_embedding(one, expected_family="pixart")
    with pytest.raises(ModelLoadError, match="per-expert: .* has one transformer"):
        apply_model_options(load_diffusers(wan21), "per-expert")
    with pytest.raises(ModelLoadError, match="--guidance-2: .* has one transformer"):
        apply_model_options(load_diffusers(wan21), "shared", 3.0)


def test_wan_options_are_refused_on_other_models(tiny_backend):
    from reneg.backends.loading import apply_model_options

    with pytest.raises(ModelLoadError, match="--wan-experts and --guidance-2: for Wan 2.2 A14B.* a tiny model"):
        apply_model_options(tiny_backend, "per-expert", 3.0)
    assert apply_model_options(tiny_backend) is tiny_backend


def test_wan_train_tune_and_eval_through_the_cli(tmp_path, wan21, wan22, tiny_hps_ckpt, capsys):
    """The user's path on a tiny Wan: train one negative per expert on 2.2 A14B in image mode (one frame),
    tune one on 2.1, and eval 5-frame videos against Wan's own default negative, with temporal measures."""
    from reneg.cli import main
    from reneg.embedding import load_embedding
    from reneg.evaluation.images import load_frames

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green house\na cat in the city\n")
    common = ["--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "3", "--resolution", "16", "--guidance", "5"]
    run = tmp_path / "run"
    args = ["train", "--model", wan22, *common, "--grad-range", "0", "1", "--prompts", str(prompts)]
    args += ["--heldout-count", "2", "--out", str(run), "--steps", "2", "--batch-size", "2", "--micro-batch", "2"]
    args += ["--lr", "0.05", "--eval-every", "2", "--no-progress", "--wan-experts", "per-expert", "--guidance-2", "3"]
    assert main(args) == 0, capsys.readouterr().err
    emb = load_embedding(run / "embedding.safetensors", expected_family="wan-experts")
    assert emb.tensor.shape == (1, 1024, 4096)
    assert json.loads((run / "summary.json").read_text())["family"] == "wan-experts"
    tuned = tmp_path / "tuned.safetensors"
    args = ["tune", "--model", wan21, *common, "--grad-range", "0", "1", "--prompt", "a red circle", "--seed", "1"]
    args += ["--max-steps", "1", "--patience", "1", "--lr", "0.05", "--out", str(tuned)]
    assert main(args) == 0, capsys.readouterr().err
    assert load_embedding(tuned, expected_family="wan").metadata["kind"] == "per-sample"
    ev = tmp_path / "eval"
    negs = ["--negative", "null", "--negative", "wan-default", "--negative", "wan-default-en"]
    negs += ["--negative", f"learned={tuned}"]
    args = ["eval", "--model", wan21, *common, "--prompts", str(prompts), "--limit", "2", *negs]
    args += ["--frames", "5", "--batch", "2", "--out", str(ev), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    s = json.loads((ev / "summary.json").read_text())
    names = ["null", "wan-default", "wan-default-en", "learned"]
    assert [n["name"] for n in s["negatives"]] == names
    from reneg.evaluation.provenance import reward_names_of

    assert reward_names_of(s) == ["hpsv2", "temporal_flickering", "consistency"]
    assert load_frames(str(next((ev / "images").iterdir()))).shape == (5, 3, 16, 16)


def test_temporal_measures():
    from reneg.evaluation.temporal import consistency, flickering

    still = torch.rand(1, 1, 3, 4, 4).expand(2, 3, 3, 4, 4) * 2 - 1
    blink = torch.stack([-torch.ones(3, 4, 4), torch.ones(3, 4, 4), -torch.ones(3, 4, 4)])[None]
    assert torch.allclose(flickering(still), torch.ones(2)) and torch.allclose(flickering(blink), torch.zeros(1))
    f = torch.randn(1, 1, 8).expand(1, 4, 8)
    assert torch.allclose(consistency(f), torch.ones(1))
    assert torch.allclose(consistency(torch.tensor([[[1.0, 0], [0, 1.0], [0, 1.0]]])), torch.tensor([0.25]))


def test_comfyui_single_files_are_named_by_inspect_and_refused_as_a_model(tmp_path, capsys):
    """The files a ComfyUI Wan user holds, from their headers: the transformer (Wan's own layout; Wan 2.1 T2V 1.3B
    here, an image-to-video and a VACE one named as not supported) and the UMT5-XXL encoder (a bias in every
    layer, which T5-XXL lacks: not taken for Flux's t5xxl); each but the text-to-video transformer (which asks
    for its parts) refused as --model with what to pass."""
    from safetensors.torch import save_file

    from reneg.cli import main

    z = torch.zeros

    def transformer(dim, in_ch, extra=()):
        sd = {
            "patch_embedding.weight": z(dim, in_ch, 1, 1, 1),
            "text_embedding.0.weight": z(dim, 4096),
            "head.modulation": z(1, 2, dim),
            "blocks.0.ffn.0.weight": z(8, dim),
            "blocks.29.self_attn.q.weight": z(1, 1),
        }
        sd.update({k: z(1) for k in extra})
        return sd

    files = {
        "wan2.1_t2v_1.3B_fp16.safetensors": transformer(1536, 16),
        "wan2.1_i2v_480p_14B.safetensors": transformer(5120, 36, ["img_emb.proj.0.weight"]),
        "wan2.1_vace_1.3B.safetensors": transformer(1536, 16, ["vace_blocks.0.before_proj.weight"]),
        "umt5_xxl_fp16.safetensors": {
            "shared.weight": z(4, 4096),
            "encoder.block.0.layer.0.SelfAttention.q.weight": z(4, 4),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": z(32, 64),
            "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": z(32, 64),
            "spiece_model": torch.zeros(16, dtype=torch.uint8),
        },
    }
    want = {
        "wan2.1_t2v_1.3B_fp16.safetensors": ("Wan 2.1 T2V 1.3B transformer", "30 blocks 1536 wide", 'family": "wan'),
        "wan2.1_i2v_480p_14B.safetensors": ("image-to-video", "text-to-video models", 'family": null'),
        "wan2.1_vace_1.3B.safetensors": ("VACE", "does not support", 'family": null'),
        "umt5_xxl_fp16.safetensors": ("UMT5-XXL text encoder", "2 layers, 4096 wide", 'family": "wan'),
    }
    for name, sd in files.items():
        path = str(tmp_path / name)
        save_file(sd, path)
        assert main(["inspect", path]) == 0
        out = capsys.readouterr().out
        assert want[name][0] in out and want[name][1] in out and "WanPipeline folder" in out, out
        assert main(["inspect", "--json", path]) == 0
        assert want[name][2] in capsys.readouterr().out
        if name.startswith("wan2.1_t2v"):  # loads with its parts (the next test); alone, it asks for them
            with pytest.raises(ModelLoadError, match=r"a Wan transformer file needs its text encoder: pass --text-enc"):
                load_diffusers(path)
            continue
        with pytest.raises(ModelLoadError, match=r"one part of a Wan model on its own; ReNeg trains.*WanPipeline"):
            load_diffusers(path)
    assert main(["inspect", "--json", str(tmp_path / "umt5_xxl_fp16.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["part"] == "text_encoder" and info["comfyui_folder"] == "models/text_encoders"
    assert "spiece_model" in info["details"]["tokenizer"]


def _comfy_wan_files(folder: str, root, name: str, spiece: bytes | None = None) -> dict:
    """A Wan folder's parts written as ComfyUI keeps them under ``root/models``: the transformer(s) in Wan's own
    layout (``transformer_2/`` as the low-noise twin), UMT5 with transformers' names (and ``spiece_model``), the
    VAE in the Wan 2.1 layout."""
    from diffusers import AutoencoderKLWan
    from ldm_layout import transformer_to_wan, vae_to_wan21
    from safetensors.torch import load_file, save_file

    models = root / "models"
    for d in ("diffusion_models", "text_encoders", "vae"):
        (models / d).mkdir(parents=True, exist_ok=True)
    out = {}
    for sub, kind in (("transformer", "high_noise"), ("transformer_2", "low_noise")):
        src = os.path.join(folder, sub, "diffusion_pytorch_model.safetensors")
        if os.path.isfile(src):
            out[sub] = str(models / "diffusion_models" / f"{name}_{kind}.safetensors")
            save_file({k: v.contiguous() for k, v in transformer_to_wan(load_file(src)).items()}, out[sub])
    te = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    if spiece is not None:
        te["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    out["umt5"] = str(models / "text_encoders" / f"{name}_umt5_xxl.safetensors")
    save_file(te, out["umt5"])
    vae = AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae"))
    out["vae"] = str(models / "vae" / f"{name}_wan_2.1_vae.safetensors")
    save_file({k: v.contiguous() for k, v in vae_to_wan21(vae.state_dict(), dict(vae.config)).items()}, out["vae"])
    return out


def test_transformer_layout_round_trips_through_diffusers_converter(tmp_path):
    """The tests' writer of Wan's own transformer layout is the inverse of diffusers'
    ``convert_wan_transformer_to_diffusers``, which the loader uses (checked on names, meta tensors)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from ldm_layout import transformer_to_wan

    with torch.device("meta"):
        sd = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=128, num_layers=2, ffn_dim=32,
                                   cross_attn_norm=True, qk_norm="rms_norm_across_heads").state_dict()  # fmt: skip
    wan = transformer_to_wan(sd)
    assert "head.modulation" in wan and "blocks.1.cross_attn.o.weight" in wan and "blocks.0.norm3.weight" in wan
    back = convert_wan_transformer_to_diffusers(dict(wan))
    assert sorted(back) == sorted(sd) and all(back[k] is sd[k] for k in sd)


def test_comfyui_single_files_load_as_the_folder_does(tmp_path, tiny_hps_ckpt, capsys):
    """A ComfyUI Wan user's files (the transformer in Wan's layout, umt5_xxl, wan_2.1_vae) load into the model
    the WanPipeline folder of the same weights makes: the same rows, schedule and videos; Wan 2.2 A14B's two
    expert files load as the folder's two experts; the tokenizer ComfyUI keeps inside the UMT5 file gives
    SentencePiece's own ids; ``reneg train`` takes the files; each missing part is asked for by its flag."""
    import io

    import sentencepiece as spm

    from reneg.generate import generate

    folder = build_tiny_wan(str(tmp_path / "wan21"), seed=2, head_dim=128)
    tok = os.path.join(folder, "tokenizer")
    f = _comfy_wan_files(folder, tmp_path / "ComfyUI", "wan2.1_t2v")
    a = load_diffusers(folder)
    b = load_diffusers(f["transformer"], text_encoders=[f["umt5"]], vae=f["vae"], tokenizer=tok)
    assert b.family == "wan" and b.model_info["kind"] == "single files (ComfyUI)" and b.transformer_2 is None
    prompts = ["a red circle", "a blue square on a green house"]
    ca, cb = a.encode_prompts(prompts), b.encode_prompts(prompts)
    assert torch.equal(ca.crossattn, cb.crossattn) and torch.equal(a.schedule(4), b.schedule(4))
    assert b.scheduler_config["flow_shift"] == 3.0
    noise = torch.randn(2, 16, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    neg = a.encode_prompts(["blurry"])
    ia, ib = generate(a, ca, neg, noise, 3, 5.0), generate(b, cb, b.encode_prompts(["blurry"]), noise, 3, 5.0)
    assert ia.abs().max() > 0 and torch.equal(ia, ib)
    assert makes_videos(f["transformer"]) and not makes_videos(f["umt5"])

    # Wan 2.2 A14B: the high-noise file as --model, its low-noise twin beside it
    folder2 = build_tiny_wan(str(tmp_path / "wan22"), seed=4, experts=2, head_dim=128)
    f2 = _comfy_wan_files(folder2, tmp_path / "ComfyUI", "wan2.2_t2v")
    c = load_diffusers(folder2)
    d = load_diffusers(f2["transformer"], text_encoders=[f2["umt5"]], vae=f2["vae"], tokenizer=tok,
                       low_noise_model=f2["transformer_2"])  # fmt: skip
    assert d.boundary_ratio == c.boundary_ratio == 0.875 and d.model_info["experts"] == 2
    assert d.scheduler_config["flow_shift"] == 12.0  # the A14B release's shift (the test folder's is 3)
    x = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    cc = c.encode_prompts(["a cat"])
    for t in (0.95, 0.5):  # one step on each side of the boundary: each expert is its folder twin
        s = torch.tensor([t])
        assert _rel(d.denoiser(x, s, d.encode_prompts(["a cat"])), c.denoiser(x, s, cc)) < 1e-6

    # the tokenizer inside the UMT5 file (ComfyUI's spiece_model): SentencePiece's ids, then </s>
    text = "a red circle\na blue square on a green house\nblurry ugly low quality\n" * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=24,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)  # fmt: skip
    g = _comfy_wan_files(folder, tmp_path / "spm", "wan2.1_t2v", spiece=model.getvalue())
    e = load_diffusers(g["transformer"], text_encoders=[g["umt5"]], vae=g["vae"])
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    for p in ("a red circle", "Blurry, ugly!  low quality"):
        assert e.tokenizer(p).input_ids == sp.encode(p) + [1]
    assert (
        e.model_info["tokenizer"].endswith("(spiece_model)")
        and e.encode_prompts(["a red circle"]).crossattn.shape[-1] == 4096
    )

    from split_files import train_one_step

    parts = ["--text-encoder", f["umt5"], "--vae", f["vae"], "--tokenizer", tok, "--guidance", "5"]
    assert train_one_step(tmp_path, capsys, f["transformer"], parts, tiny_hps_ckpt, prompts, 16) == "wan"

    # ComfyUI's scaled fp8 files (umt5_xxl_fp8_e4m3fn_scaled, the fp8 transformers): read as ComfyUI computes
    # with them, weight * scale_weight
    from ldm_layout import to_scaled_fp8
    from safetensors.torch import load_file, save_file

    fp8 = {}
    for name in ("transformer", "umt5"):
        fp8[name] = str(tmp_path / f"{name}_fp8_e4m3fn_scaled.safetensors")
        save_file(to_scaled_fp8(load_file(f[name])), fp8[name])
    q = load_diffusers(fp8["transformer"], text_encoders=[fp8["umt5"]], vae=f["vae"], tokenizer=tok)
    for model, file, key in ((q.text_encoder, fp8["umt5"], "encoder.block.0.layer.0.SelfAttention.q.weight"),
                             (q.transformer, fp8["transformer"], "blocks.0.ffn.net.0.proj.weight")):  # fmt: skip
        raw = load_file(file)
        name = "blocks.0.ffn.0.weight" if model is q.transformer else key  # Wan's own name in the file
        want = raw[name].float() * raw[name.replace(".weight", ".scale_weight")]
        got = model.state_dict()[key]
        assert torch.equal(got, want) and raw[name].dtype == torch.float8_e4m3fn, key
        ref = (b.text_encoder if model is q.text_encoder else b.transformer).state_dict()[key]
        assert 0 < _rel(got, ref) < 0.05  # fp8's rounding
    cq = q.encode_prompts(prompts)  # the tiny encoder is far more sensitive than a trained one: no value check
    assert cq.crossattn.shape == cb.crossattn.shape and torch.equal(cq.crossattn != 0, cb.crossattn != 0)
    assert generate(q, cq, q.encode_prompts(["blurry"]), noise, 3, 5.0).isfinite().all()

    with pytest.raises(ModelLoadError, match=r"pass --text-encoder FILE once, for UMT5-XXL"):
        load_diffusers(f["transformer"], vae=f["vae"])
    with pytest.raises(ModelLoadError, match=r"needs its VAE: pass --vae FILE"):
        load_diffusers(f["transformer"], text_encoders=[f["umt5"]])
    with pytest.raises(ModelLoadError, match=r"no tokenizer inside .*pass --tokenizer FOLDER"):
        load_diffusers(f["transformer"], text_encoders=[f["umt5"]], vae=f["vae"])
    with pytest.raises(ModelLoadError, match=r"--text-encoder .*wan_2.1_vae.safetensors: .*Wan reads UMT5-XXL"):
        load_diffusers(f["transformer"], text_encoders=[f["vae"]], vae=f["vae"])
    with pytest.raises(ModelLoadError, match=r"--low-noise-model .*umt5_xxl.safetensors: .*give a Wan text-to-video"):
        load_diffusers(
            f["transformer"], text_encoders=[f["umt5"]], vae=f["vae"], tokenizer=tok, low_noise_model=f["umt5"]
        )
    with pytest.raises(ModelLoadError, match=r"--low-noise-model: for Wan 2.2 A14B's files"):
        load_diffusers(folder, low_noise_model=f2["transformer_2"])
