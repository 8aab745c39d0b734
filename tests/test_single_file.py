"""Single-file checkpoints: recognised from their header, loaded without --config, refused clearly.

Full-size checkpoints are written as header-only sparse files (their key-and-shape table is that of the
real releases, made from the built-in configs and mapped to the UI layout); small ones are written from a
small diffusers folder in the UI layout and must give what the folder gives.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from ldm_layout import (
    SD1_TE,
    UNET,
    VAE,
    folder_to_single_file,
    full_size_table,
    unet_to_ldm,
    vae_to_ldm,
    write_header_only,
)

from reneg.backends import single_file as sf
from reneg.backends.diffusers_backend import ModelLoadError
from reneg.backends.loading import load_diffusers

FULL = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def full_tables():
    return {fam: full_size_table(fam) for fam in FULL}


def _full(tmp_path, full_tables, fam, name=None, extra=None, drop=(), **kw):
    shapes = {k: v for k, v in full_tables[fam].items() if not (drop and k.startswith(drop))}
    shapes.update(extra or {})
    return write_header_only(str(tmp_path / (name or f"{fam}.safetensors")), shapes, **kw)


# --- recognition of full-size checkpoints from the header ------------------------------------------------


@pytest.mark.slow
def test_full_size_checkpoints_are_recognised_and_build_from_builtin_configs(tmp_path, full_tables):
    """The whole loading path (detection, diffusers' key conversion, the built-in configs, strict
    filling of every module) runs on shape-only tensors from each full-size header."""
    from reneg.backends.loading import family_of

    for fam in FULL:
        path = _full(tmp_path, full_tables, fam)
        assert os.path.getsize(path) > 2e9 and os.stat(path).st_blocks * 512 < 2**20  # sparse: nothing written
        ck = sf.open_checkpoint(path, meta=True)
        info = sf.classify(ck)
        assert (info.family, info.prediction_type, info.has_vae, info.dtype) == (fam, "epsilon", True, "float16")
        assert info.tensors == len(full_tables[fam])
        assert info.native_resolution == {"sdxl": 1024}.get(fam, 512)
        parts, arch, folder = sf.build_parts(ck, info, torch.float16)
        assert folder is None
        tes = [parts[k] for k in ("text_encoder", "text_encoder_2") if k in parts]
        assert family_of(tes, parts["unet"], path) == fam
        n = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        # the released models' sizes: SD1.5 UNet 859.5 M, SD2 OpenCLIP-H (23 layers) 340.4 M, SDXL UNet 2567 M
        assert n["unet"] == {"sd1": 859520964, "sd2": 865910724, "sdxl": 2567463684}[fam]
        assert n["text_encoder"] == {"sd2": 340387840}.get(fam, 123060480)
        assert n["vae"] == 83653863
        if fam == "sdxl":
            assert n["text_encoder_2"] == 694659840
        assert 0 <= info.parameters - sum(n.values()) < 14_000_000  # SD2: its unused 24th layer and projection


def test_full_size_layout_has_the_hosts_key_names(full_tables):
    """A few keys and shapes every real file of each architecture has."""
    sd1, sd2, xl = full_tables["sd1"], full_tables["sd2"], full_tables["sdxl"]
    assert sd1[UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert sd1[UNET + "input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert sd1[UNET + "output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert sd1[VAE + "decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert sd1[VAE + "encoder.down.0.block.0.conv1.weight"] == (128, 128, 3, 3)
    assert sd1[SD1_TE + "text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert sd2[UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert sd2["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert sd2["cond_stage_model.model.text_projection"] == (1024, 1024)
    assert xl[UNET + "label_emb.0.0.weight"] == (1280, 2816)
    assert xl["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert xl["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert xl["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] == (768,)
    assert not any(k.startswith(UNET + "input_blocks.1.1") for k in xl)  # SDXL's first level has no attention


def test_prediction_type_markers_and_the_sd2_768_v_rule(tmp_path, full_tables):
    scalar = ((), torch.float32)
    vpred = _full(tmp_path, full_tables, "sdxl", "vpred.safetensors", extra={"v_pred": scalar, "ztsnr": scalar})
    info = sf.inspect_checkpoint(vpred)
    assert (info.prediction_type, info.ztsnr) == ("v_prediction", True)
    assert "v_pred marker" in info.prediction_reason
    over = sf.inspect_checkpoint(vpred, prediction_type="eps")
    assert (over.prediction_type, over.prediction_reason) == ("epsilon", "--prediction-type")
    spec = _full(tmp_path, full_tables, "sdxl", "spec.safetensors", metadata={"modelspec.prediction_type": "v"})
    assert sf.inspect_checkpoint(spec).prediction_type == "v_prediction"
    # SD2 carries no marker: ComfyUI's rule reads one 320-number tensor (std > 0.09: the 768-v model)
    key = sf.SD2_V_KEY
    torch.manual_seed(0)
    v = _full(tmp_path, full_tables, "sd2", "sd2v.safetensors", data={key: (torch.randn(320) * 0.3).half()})
    eps = _full(tmp_path, full_tables, "sd2", "sd2.safetensors", data={key: (torch.randn(320) * 0.02).half()})
    iv, ie = sf.inspect_checkpoint(v), sf.inspect_checkpoint(eps)
    assert (iv.prediction_type, iv.native_resolution) == ("v_prediction", 768)
    assert (ie.prediction_type, ie.native_resolution) == ("epsilon", 512)
    assert "> 0.09" in iv.prediction_reason and "<= 0.09" in ie.prediction_reason
    # ComfyUI's Save Checkpoint writes modelspec.predict_key: it is read before the SD2 guess
    saved = _full(
        tmp_path,
        full_tables,
        "sd2",
        "comfy_saved_sd2.safetensors",
        data={key: (torch.randn(320) * 0.3).half()},
        metadata={"modelspec.predict_key": "epsilon"},
    )
    info = sf.inspect_checkpoint(saved)
    assert (info.prediction_type, info.prediction_reason) == ("epsilon", "modelspec.predict_key metadata")


def test_storage_dtype_is_read_from_the_one_safetensors_dtype_table(tmp_path, full_tables):
    """The header's dtype names are read through reneg.fileio's table, the one the header checks use:
    an fp8 checkpoint is described as fp8 (a second, shorter table once called it float32)."""
    info = sf.inspect_checkpoint(_full(tmp_path, full_tables, "sdxl", "fp8.safetensors", dtype=torch.float8_e4m3fn))
    assert (info.family, info.dtype) == ("sdxl", "float8_e4m3fn")
    ck = sf.open_checkpoint(tmp_path / "fp8.safetensors", meta=True)
    assert ck.tensor(sf.IN_CONV).dtype == torch.float8_e4m3fn and ck.tensor(sf.IN_CONV).device.type == "meta"


def test_inspect_cli_describes_a_checkpoint_from_its_header(tmp_path, full_tables, capsys):
    from reneg.cli import main

    path = _full(tmp_path, full_tables, "sdxl", drop=(VAE,), extra={"v_pred": ((), torch.float32)})
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "Stable Diffusion XL (sdxl), 1024 px native" in out and "v-prediction" in out
    assert "float16" in out and "VAE inside    no (pass --vae" in out
    assert main(["inspect", "--json", path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["has_vae"] is False and info["prediction_type"] == "v_prediction"


# --- refusals: one line naming the file and what was found, before any work -----------------------------


def _refused(path, match, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("a module was built before the file was refused")

    monkeypatch.setattr(sf, "build_unet", no_work)
    with pytest.raises(ModelLoadError) as e:
        load_diffusers(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert match in msg, msg
    return msg


def test_refusals(tmp_path, full_tables, monkeypatch):
    t = tmp_path
    unet_in = UNET + "input_blocks.0.0.weight"
    sd3 = write_header_only(
        str(t / "sd3.safetensors"),
        {UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), unet_in: (1536, 16, 2, 2)},
    )
    _refused(sd3, "Stable Diffusion 3", monkeypatch)
    flux = write_header_only(str(t / "flux.safetensors"), {"double_blocks.0.img_attn.norm.key_norm.scale": (128,)})
    _refused(flux, "a Flux checkpoint", monkeypatch)
    refiner = write_header_only(
        str(t / "refiner.safetensors"),
        {
            unet_in: (384, 4, 3, 3),
            UNET + "label_emb.0.0.weight": (1536, 2560),
            UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
            "conditioner.embedders.0.model.ln_final.weight": (1280,),
        },
    )
    _refused(refiner, "an SDXL refiner", monkeypatch)
    inpaint = _full(t, full_tables, "sd1", "inpaint.safetensors", extra={unet_in: (320, 9, 3, 3)})
    _refused(inpaint, "an inpainting UNet (9 input channels", monkeypatch)
    lora = write_header_only(
        str(t / "lora.safetensors"),
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (8, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (),
        },
    )
    _refused(lora, "a LoRA", monkeypatch)
    whole = _full(t, full_tables, "sd1", "cut.safetensors")
    cut = t / "truncated.safetensors"
    with open(whole, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(200_000))
        dst.truncate(os.path.getsize(whole) // 2)
    _refused(cut, "truncated: the safetensors header describes", monkeypatch)
    emb = write_header_only(str(t / "neg.safetensors"), {"neg_embedding": (1, 77, 768)})
    _refused(emb, "an embedding", monkeypatch)
    vae = write_header_only(
        str(t / "vae.safetensors"), {k[len(VAE) :]: s for k, s in full_tables["sd1"].items() if k.startswith(VAE)}
    )
    _refused(vae, "a VAE on its own", monkeypatch)
    no_te = _full(t, full_tables, "sdxl", "no_te.safetensors", drop=("conditioner.",))
    _refused(no_te, "without its text encoder", monkeypatch)
    no_vae = _full(t, full_tables, "sd1", "no_vae.safetensors", drop=(VAE,))
    _refused(no_vae, "has no VAE inside", monkeypatch)
    edm = _full(t, full_tables, "sdxl", "pg.safetensors", extra={"edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)})
    _refused(edm, "Playground v2.5", monkeypatch)


def test_refusal_through_the_cli_is_one_line(tmp_path, capsys, tiny_hps_ckpt):
    from reneg.cli import main

    lora = write_header_only(
        str(tmp_path / "style.safetensors"),
        {
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 1280),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": (1280, 4),
        },
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    rc = main(
        [
            "train",
            "--model",
            lora,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompts",
            str(prompts),
            "--heldout-count",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{lora}: a LoRA" in err


def test_pickle_checkpoints_load_only_as_plain_tensors(tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"x": Payload()}}, bad)
    with pytest.raises(ModelLoadError, match=r"bad.ckpt: refused to load this checkpoint"):
        load_diffusers(str(bad))


# --- small checkpoints: the same model as the folder they were written from ------------------------------


def _small_folder(folder: str, family: str, prediction_type: str = "epsilon") -> str:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from reneg.tiny import (
        SD_MODEL_INDEX,
        SD_SCHEDULER,
        save_text_encoder_prefixed,
        write_clip_tokenizer,
        write_pipeline_files,
    )

    torch.manual_seed(1)
    hidden = {"sd1": 768, "sd2": 1024}[family]
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=family == "sd2",
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=16,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu" if family == "sd1" else "gelu",
        )
    )
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder_prefixed(te, os.path.join(folder, "text_encoder"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), pad_token="<|endoftext|>" if family == "sd1" else "!")
    write_pipeline_files(folder, dict(SD_SCHEDULER, prediction_type=prediction_type), SD_MODEL_INDEX)
    return folder


@pytest.fixture(scope="module")
def small_sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    folder = _small_folder(str(d / "sd1"), "sd1")
    return folder, folder_to_single_file(folder, str(d / "sd1.safetensors"), "sd1")


def _same_model(a, b, exact=True):
    """Same encodings (and pooled vector), denoiser output and decoded image."""
    prompts = ["a red circle on a table", ""]
    ca, cb = a.encode_prompts(prompts), b.encode_prompts(prompts)
    close = torch.equal if exact else (lambda x, y: torch.allclose(x, y, atol=1e-5, rtol=1e-4))
    assert close(ca.crossattn, cb.crossattn)
    if ca.pooled is not None or cb.pooled is not None:
        assert close(ca.pooled, cb.pooled)
    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 8) * 3
    sigma = torch.tensor([2.5, 2.5])
    with torch.no_grad():
        da, db = a.denoiser(x, sigma, ca), b.denoiser(x, sigma, cb)
        assert close(da, db)
        assert close(a.decode(da), b.decode(db))
    assert a.prediction_type == b.prediction_type and a.family == b.family
    assert torch.equal(a.schedule(10), b.schedule(10))


def test_small_sd1_file_is_the_folder_it_was_written_from(small_sd1, capsys):
    folder, path = small_sd1
    info = sf.inspect_checkpoint(path)
    assert (info.family, info.prediction_type, info.has_vae, info.dtype) == ("sd1", "epsilon", True, "float32")
    single = load_diffusers(path, config=folder)
    assert single.model_info["kind"] == "single file" and "eps-prediction" in single.describe()
    _same_model(single, load_diffusers(folder))


def test_builtin_tokenizers_pad_as_the_models_do():
    """SD1.x and SDXL's CLIP-L pad with <|endoftext|> (49407); SD2's OpenCLIP-H and SDXL's bigG with "!" (0)."""
    from reneg.backends.configs import ARCHITECTURES
    from reneg.families import FAMILIES

    assert set(ARCHITECTURES) <= set(FAMILIES)  # keyed by the family table's names
    pads = {
        (fam, part): ARCHITECTURES[fam][part]
        for fam in ARCHITECTURES
        for part in ("tokenizer_pad", "tokenizer_2_pad")
        if part in ARCHITECTURES[fam]
    }
    assert pads == {
        ("sd1", "tokenizer_pad"): "<|endoftext|>",
        ("sd2", "tokenizer_pad"): "!",
        ("sdxl", "tokenizer_pad"): "<|endoftext|>",
        ("sdxl", "tokenizer_2_pad"): "!",
    }
    for pad, pad_id in (("<|endoftext|>", 49407), ("!", 0)):
        tok = sf.build._tokenizer(pad)
        ids = tok(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
        assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[-1] == pad_id and len(ids) == 77


@pytest.mark.slow
def test_small_sd2_file_and_prediction_override(tmp_path):
    folder = _small_folder(str(tmp_path / "sd2"), "sd2", prediction_type="v_prediction")
    path = folder_to_single_file(folder, str(tmp_path / "sd2.safetensors"), "sd2")
    # the small UNet has no output_blocks.11: no marker decides, so eps, unless told otherwise
    assert sf.inspect_checkpoint(path).prediction_type == "epsilon"
    single = load_diffusers(path, config=folder, prediction_type="v")
    assert single.prediction_type == "v_prediction" and "--prediction-type" in single.describe()
    _same_model(single, load_diffusers(folder))


@pytest.mark.slow
def test_small_sdxl_file_in_bf16_with_v_pred_and_ztsnr_markers(tmp_path, tiny_sdxl_dir):
    path = folder_to_single_file(
        tiny_sdxl_dir,
        str(tmp_path / "xl.safetensors"),
        "sdxl",
        extra={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])},
    )
    single = load_diffusers(path, config=tiny_sdxl_dir)
    folder = load_diffusers(tiny_sdxl_dir, prediction_type="v")
    assert single.family == "sdxl" and single.prediction_type == "v_prediction"
    # zero terminal SNR: the schedule is rescaled and sampling starts at the last timestep
    assert single.scheduler_config["rescale_betas_zero_snr"] is True
    ac = single.alphas_cumprod()
    assert float(ac[-1]) == pytest.approx(4.8973451890853435e-08) and float(single.schedule(30)[0]) > 4000
    single.scheduler_config.update(rescale_betas_zero_snr=False, timestep_spacing="leading")
    single.set_prediction_type("v_prediction")
    # to float rounding: with transformers 5.25 the pooled projection of the encoder built from the file and
    # of the one from_pretrained read differ by up to 1e-6 with gradients enabled (equal under no_grad, and
    # their weights and hidden states equal bit for bit); the UNet's output follows the pooled vector
    _same_model(single, folder, exact=False)
    # stored in bf16, loaded in fp32: the weights are the folder's rounded to bf16
    half = folder_to_single_file(tiny_sdxl_dir, str(tmp_path / "xl16.safetensors"), "sdxl", dtype=torch.bfloat16)
    assert sf.inspect_checkpoint(half).dtype == "bfloat16"
    b = load_diffusers(half, config=tiny_sdxl_dir)
    for (n, p), q in zip(b.unet.named_parameters(), folder.unet.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q.to(torch.bfloat16).float()), n
    for p, q in zip(b.text_encoder_2.parameters(), folder.text_encoder_2.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16).float())


@pytest.mark.slow
def test_vae_override_and_a_checkpoint_without_vae(tmp_path, small_sd1):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    folder, _ = small_sd1
    novae = folder_to_single_file(folder, str(tmp_path / "novae.safetensors"), "sd1", vae=False)
    assert sf.inspect_checkpoint(novae).has_vae is False
    with pytest.raises(ModelLoadError, match="novae.safetensors: has no VAE inside .* pass --vae"):
        load_diffusers(novae, config=folder)
    ref = load_diffusers(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    ldm_vae = str(tmp_path / "vae-ldm.safetensors")  # a VAE file as the UIs keep them: no prefix
    save_file(vae_to_ldm(vae.state_dict(), dict(vae.config), prefix=""), ldm_vae)
    for given in (
        os.path.join(folder, "vae"),
        folder,
        ldm_vae,
        os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"),
    ):
        m = load_diffusers(novae, config=folder, vae=given)
        assert given in m.describe()
        _same_model(m, ref)
    # --vae replaces a folder model's VAE too
    _same_model(load_diffusers(folder, vae=ldm_vae), ref)
    with pytest.raises(ModelLoadError, match="--vae .*novae.safetensors: no VAE in it"):
        load_diffusers(novae, config=folder, vae=novae)


def test_ckpt_pickle_of_the_same_model(tmp_path, small_sd1):
    from safetensors.torch import load_file

    folder, path = small_sd1
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    assert sf.inspect_checkpoint(str(ckpt)).family == "sd1"
    _same_model(load_diffusers(str(ckpt), config=folder), load_diffusers(folder))


def test_config_folder_of_another_architecture_is_named(tmp_path, small_sd1, tiny_sdxl_dir):
    _, path = small_sd1
    with pytest.raises(
        ModelLoadError,
        match=r"sd1.safetensors: is Stable Diffusion 1.x, but the config folder "
        r".* is an SDXL folder",
    ):
        load_diffusers(path, config=tiny_sdxl_dir)


def test_conversion_mapping_round_trips_through_diffusers(small_sd1):
    """The UI-layout writer is the inverse of diffusers' own single-file conversion."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    folder, _ = small_sd1
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    sd = unet.state_dict()
    back = convert_ldm_unet_checkpoint(unet_to_ldm(sd, dict(unet.config)), dict(unet.config))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_train_records_the_checkpoint_file_and_its_hash(tmp_path, small_sd1, tiny_hps_ckpt, capsys):
    from reneg.cli import main
    from reneg.embedding import load_embedding

    folder, path = small_sd1
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green cube\n")
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            path,
            "--config",
            folder,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompts",
            str(prompts),
            "--heldout-count",
            "1",
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--sampling-steps",
            "2",
            "--grad-range",
            "0",
            "1",
            "--resolution",
            "16",
            "--eval-batch",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "reneg train: model sd1.safetensors: Stable Diffusion 1.x (single file), eps-prediction" in cap.out
    emb = load_embedding(out / "embedding.safetensors")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert emb.family == "sd1" and emb.metadata["base_model"] == "sd1.safetensors"
    assert emb.metadata["base_model_hash"] == digest[:10]
    # summary.json says how the file was read, as the first line printed does
    import json

    model = json.loads((out / "summary.json").read_text())["model"]
    assert (model["kind"], model["family"], model["prediction_type"]) == ("single file", "sd1", "epsilon")
    assert model["prediction_reason"] == "no v-prediction marker" and model["vae"] == "inside"


def test_model_file_flags_reach_train_tune_and_eval():
    from reneg.cli import build_parser
    from reneg.evaluation.cli import eval_config_from_args
    from reneg.trainer.config import train_config_from_args
    from reneg.backends.loading import weights_dtype

    p = build_parser()
    flags = ["--model", "m.safetensors", "--vae", "v.safetensors", "--prediction-type", "v"]
    assert (
        train_config_from_args(p.parse_args(["train", *flags])).vae,
        train_config_from_args(p.parse_args(["train", *flags])).prediction_type,
    ) == ("v.safetensors", "v")
    ns = p.parse_args(["tune", *flags])
    assert (ns.vae, ns.prediction_type, ns.config) == ("v.safetensors", "v", None)
    cfg = eval_config_from_args(p.parse_args(["eval", *flags]))
    assert (cfg.vae, cfg.prediction_type) == ("v.safetensors", "v")
    # --mixed-precision is one option of train, tune and eval (an SDXL eval on a CPU in bf16)
    for cmd in ("train", "tune", "eval"):
        assert p.parse_args([cmd, *flags, "--mixed-precision", "bf16"]).mixed_precision == "bf16"
    assert eval_config_from_args(p.parse_args(["eval", *flags, "--mixed-precision", "bf16"])).mixed_precision == "bf16"
    # bf16 weights on the CPU when asked (an SDXL checkpoint in half the memory); fp16 stays fp32 there
    cpu = torch.device("cpu")
    assert weights_dtype("bf16", cpu) == torch.bfloat16 and weights_dtype("fp16", cpu) == torch.float32
