"""reneg eval --video: AnimateDiff (tiny SD UNet + a tiny saved MotionAdapter), frames scored and averaged."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def motion_adapter_dir(tmp_path_factory):
    from diffusers import MotionAdapter

    torch.manual_seed(0)
    # fits reneg.tiny's UNet: two blocks of 32 and 64 channels, one layer per block
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=8,
        use_motion_mid_block=False,
    )
    folder = str(tmp_path_factory.mktemp("motion") / "adapter")
    adapter.save_pretrained(folder)
    return folder


def test_video_backend_shapes(tiny_backend, motion_adapter_dir):
    from reneg.evaluation.video import VideoBackend, load_animatediff

    vb = load_animatediff(tiny_backend, motion_adapter_dir, frames=3)
    assert isinstance(vb, VideoBackend) and vb.family == "tiny"
    assert vb.latent_shape(2, 16, 16) == (2, 4, 3, 8, 8)
    x = torch.randn(2, 4, 3, 8, 8)
    x0 = vb.denoiser(x, torch.tensor([3.0, 3.0]), tiny_backend.encode_prompts(["a", "b"]))
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert vb.decode(x0).shape == (6, 3, 16, 16)
    # AnimateDiff's schedule (linear betas, linspace spacing) differs from the SD folder's
    assert not torch.allclose(vb.schedule(4), tiny_backend.schedule(4))
    from reneg.backends.diffusers_backend import ModelLoadError

    with pytest.raises(ModelLoadError, match="--frames 9: .* at most 8 frames"):
        load_animatediff(tiny_backend, motion_adapter_dir, frames=9)


def test_motion_adapters_fit_the_families_the_table_says():
    """The family table's ``motion_adapter`` says which UNets AnimateDiff extends; any other family's
    model is refused before the adapter is read."""
    import types

    from reneg.backends.diffusers_backend import ModelLoadError
    from reneg.evaluation.video import load_animatediff
    from reneg.families import FAMILIES

    assert [f.name for f in FAMILIES.values() if f.motion_adapter] == ["sd1", "tiny"]
    for name in [f.name for f in FAMILIES.values() if not f.motion_adapter] + ["unknown"]:
        with pytest.raises(ModelLoadError, match=f"extend SD1.x UNets; --model is a {name} model"):
            load_animatediff(types.SimpleNamespace(family=name), "/nowhere")


def test_eval_video_end_to_end(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, tiny_reward, motion_adapter_dir):
    from PIL import Image

    from reneg.evaluation import images as image_files
    from reneg.evaluation import scoring
    from reneg.evaluation import run as ev
    from reneg.evaluation.config import EvalConfig

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "vid"
    cfg = EvalConfig(
        model=tiny_pipeline_dir,
        rewards=[f"hpsv2={tiny_hps_ckpt}"],
        prompts=str(prompts),
        negatives=["null", "handcrafted:blurry", "tuned:null"],
        out=str(out),
        video=motion_adapter_dir,
        frames=2,
        sampling_steps=3,
        resolution=16,
        batch=2,
        tune_steps=2,
        tune_patience=2,
        grad_range=(0, 1),
        tune_lr=0.05,
        progress=False,
        device="cpu",
    )
    summary = ev.run_eval(cfg, log=lambda m: None)
    names = sorted(os.listdir(out / "images"))
    assert len(names) == 6
    for n in names:
        with Image.open(out / "images" / n) as im:
            assert im.format == "PNG" and getattr(im, "n_frames", 1) == 2  # an animated PNG
    # a video's score is the mean of its frames' image scores
    rows = scoring.read_scores_csv(str(out / "scores.csv"))
    r = next(r for r in rows if r["negative"] == "null")
    frames = image_files.load_frames(str(out / r["image"]))
    assert frames.shape == (2, 3, 16, 16)
    with torch.no_grad():
        per_frame = tiny_reward(frames, [r["prompt"]] * 2)
    assert r["score"] == pytest.approx(float(per_frame.mean()), abs=1e-5)
    assert summary["settings"]["video"] == motion_adapter_dir
    html = (out / "report.html").read_text()
    assert all(f"images/{n}" in html for n in names) and "motion adapter" in html


def test_a_text_to_video_folder_is_a_video_folder_kind(tmp_path, monkeypatch):
    """A TextToVideoSDPipeline folder (ZeroScope) is one of the loader's folder kinds, marked video: it
    loads where frames are asked for (reneg eval) and is passed over otherwise, as before it was a kind."""
    import json

    from reneg.backends import loading, video
    from reneg.backends.diffusers_backend import ModelLoadError
    from reneg.evaluation.config import EvalConfig
    from reneg.evaluation.run import load_backend

    folder = tmp_path / "t2v"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline"}))
    calls = []
    monkeypatch.setattr(video, "load_text_to_video", lambda path, device, dtype, frames: calls.append(frames) or "t2v")
    assert loading.makes_videos(str(folder)) and video.is_text_to_video_folder(str(folder))
    assert not loading.makes_videos(str(tmp_path)) and not loading.makes_videos(str(folder / "model_index.json"))
    assert loading.load_diffusers(str(folder), frames=3) == "t2v" and calls == [3]
    with pytest.raises(ModelLoadError, match="not a complete diffusers Stable Diffusion folder"):
        loading.load_diffusers(str(folder))  # no frames: not a video kind's load
    with pytest.raises(ModelLoadError, match="--vae is for Stable Diffusion checkpoints"):
        loading.load_diffusers(str(folder), vae=str(tmp_path), frames=3)
    assert load_backend(EvalConfig(model=str(folder), video=str(folder), frames=2), torch.device("cpu")) == "t2v"
    assert calls == [3, 2]
