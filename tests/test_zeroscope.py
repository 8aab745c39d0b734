"""The paper's SD2.1 -> ZeroScope transfer: a small ZeroScope-architecture TextToVideoSDPipeline folder
(UNet3DConditionModel, a CLIP text encoder of SD2.1's width 1024), checked against diffusers' pipeline and
measured with `reneg eval` (null / handcrafted / the paper's SD2.1 file)."""

from __future__ import annotations

import json

import pytest
import torch

from reneg.backends.video import TextToVideoBackend, is_text_to_video_folder, load_text_to_video
from reneg.sampling import initial_latent, sample, to_vp
from reneg.tiny import build_tiny_text_to_video

pytestmark = pytest.mark.slow  # builds a 210 MB folder (SD2.1's 1024-wide token table)


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return build_tiny_text_to_video(str(tmp_path_factory.mktemp("zeroscope") / "t2v"))


def test_text_to_video_matches_diffusers_pipeline_with_the_sd21_file(t2v_dir, shared_data):
    from diffusers import TextToVideoSDPipeline

    assert is_text_to_video_folder(t2v_dir)
    b = load_text_to_video(t2v_dir, frames=3)
    assert isinstance(b, TextToVideoBackend) and b.family == "sd2" and b.latent_shape(2, 16, 16) == (2, 4, 3, 8, 8)
    pipe = TextToVideoSDPipeline.from_pretrained(t2v_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    pe, npe = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=["", ""])
    cond = b.encode_prompts(prompts)
    null, _ = b.null_embedding()
    # the pipeline's text conditioning is SD2.1's: the CLIP encoder's last hidden state, final layer norm
    assert torch.allclose(cond.crossattn, pe, atol=1e-6) and torch.allclose(null, npe[:1], atol=1e-6)
    noise = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = b.schedule(10)

    def ours(neg):
        x, _ = sample(b.denoiser, initial_latent(noise, sig[0]), sig, cond, b.negative_cond(neg), 9.0)
        return to_vp(x, sig[-1])

    ref = pipe(
        prompt=prompts,
        negative_prompt=["", ""],
        latents=noise.clone(),
        num_inference_steps=10,
        guidance_scale=9.0,
        eta=0.0,
        output_type="latent",
        height=16,
        width=16,
        num_frames=3,
    ).frames
    assert ((ours(null) - ref).norm() / ref.norm()).item() < 1e-4
    official = shared_data / "reneg-official" / "sd2.1_reneg_emb.bin"
    if official.is_file():
        from reneg.embedding import load_embedding

        emb = load_embedding(official, expected_family=b.family).tensor.float()
        ref_e = pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=emb.expand(2, -1, -1),
            latents=noise.clone(),
            num_inference_steps=10,
            guidance_scale=9.0,
            eta=0.0,
            output_type="latent",
            height=16,
            width=16,
            num_frames=3,
        ).frames
        got = ours(emb)
        assert ((got - ref_e).norm() / ref_e.norm()).item() < 1e-4
        assert ((got - ref).norm() / ref.norm()).item() > 1e-3  # the file changes the video
    assert b.decode(ref[:1]).shape == (3, 3, 16, 16)  # frames as images, for any image reward


def test_reneg_eval_on_zeroscope(tmp_path, t2v_dir, tiny_hps_ckpt, shared_data):
    from reneg.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    negs = ["--negative", "null", "--negative", "handcrafted:blurry, ugly"]
    names = ["null", "handcrafted"]
    official = shared_data / "reneg-official" / "sd2.1_reneg_emb.bin"
    if official.is_file():
        negs += ["--negative", f"sd21={official}"]
        names.append("sd21")
    out = tmp_path / "ev"
    rc = main(
        [
            "eval",
            "--model",
            t2v_dir,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompts",
            str(prompts),
            *negs,
            "--frames",
            "2",
            "--sampling-steps",
            "3",
            "--resolution",
            "16",
            "--batch",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert [n["name"] for n in s["negatives"]] == names and s["images"] == {n: 2 for n in names}
    assert s["settings"]["frames"] == 2
    from reneg.evaluation.images import load_frames

    assert load_frames(str(next((out / "images").iterdir()))).shape == (2, 3, 16, 16)


def test_zeroscope_eval_loads_in_bf16_with_mixed_precision(t2v_dir):
    """--mixed-precision bf16 reaches the text-to-video loader (it loaded fp32 before) and a video samples."""
    from reneg.evaluation.config import EvalConfig
    from reneg.evaluation.run import load_backend
    from reneg.generate import generate, seeded_noise

    cfg = EvalConfig(model=t2v_dir, video=t2v_dir, frames=2, mixed_precision="bf16")
    b = load_backend(cfg, torch.device("cpu"))
    assert isinstance(b, TextToVideoBackend) and b.dtype == torch.bfloat16
    assert next(b.unet.parameters()).dtype == torch.bfloat16
    cond = b.encode_prompts(["a red circle"])
    video = generate(b, cond, b.negative_cond(b.null_embedding()[0]), seeded_noise(b, [0], 16, 16), 2, 7.5)
    assert video.shape[0] == 2 and torch.isfinite(video.float()).all()
