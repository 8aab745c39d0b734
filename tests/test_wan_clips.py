"""``reneg train --frames`` and ``reneg tune --frames``: Wan trained and tuned on short clips, each frame
scored by the image reward and a clip's reward the mean over its frames, through the held-out check, its
diversity, the monitor rewards and the sample grids (small WanPipeline folders, a tiny HPS reward)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from reneg.backends.loading import load_diffusers
from reneg.frame_reward import FrameReward, per_frame
from reneg.tiny import build_tiny_wan


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return build_tiny_wan(str(tmp_path_factory.mktemp("wan") / "wan21"))


class _Tower(torch.nn.Module):
    """An image reward with an image tower: the score is the mean pixel, the features the mean colour."""

    name = "tower"

    def forward(self, images, prompts):
        return images.mean((1, 2, 3))

    def image_features(self, images):
        f = images.mean((2, 3)) + 2.0
        return f / f.norm(dim=-1, keepdim=True)


def test_a_clip_is_scored_and_featured_by_its_frames():
    frames = torch.rand(2 * 3, 3, 4, 4) * 2 - 1  # two clips of 3 frames
    r = FrameReward(_Tower(), 3)
    assert torch.allclose(r(frames, ["a", "b"]), frames.mean((1, 2, 3)).view(2, 3).mean(1))
    f = r.image_features(frames)
    per = _Tower().image_features(frames).view(2, 3, -1).mean(1)
    assert f.shape == (2, 3) and torch.allclose(f, per)
    still = frames[:1].repeat(3, 1, 1, 1)  # a still clip has its one frame's features
    assert torch.allclose(r.image_features(still)[0], _Tower().image_features(frames[:1])[0])
    with pytest.raises(ValueError, match="5 frames are not whole videos of 3 frames"):
        r.image_features(frames[:5])
    with pytest.raises(ValueError, match="6 frames for 3 prompts x 3 frames"):
        r(frames, ["a", "b", "c"])
    base = _Tower()
    assert per_frame(base, 1) is base and isinstance(per_frame(base, 5), FrameReward)


def test_train_on_clips_scores_every_clip_as_its_frames(tmp_path, wan21, tiny_hps_ckpt, capsys):
    """--frames 5: each training sample is a 5-frame clip; the held-out check scores the clip the
    final embedding makes as the mean of its frames' rewards (recomputed here by an independent path),
    and so does the monitor; the sample grid shows strips of frames; the file says it was trained on clips."""
    from PIL import Image

    from reneg.cli import main
    from reneg.embedding import load_embedding
    from reneg.generate import generate, seeded_noise
    from reneg.rewards import load_rewards

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green house\na cat in the city\n")
    run = tmp_path / "run"
    spec = f"hpsv2={tiny_hps_ckpt}"
    args = ["train", "--model", wan21, "--reward", spec, "--monitor-reward", f"hpsv2.1={tiny_hps_ckpt}"]
    args += ["--sampling-steps", "3", "--resolution", "16", "--guidance", "5", "--grad-range", "0", "1"]
    args += ["--prompts", str(prompts), "--heldout-count", "2", "--out", str(run), "--steps", "2"]
    args += ["--batch-size", "2", "--micro-batch", "2", "--lr", "0.5", "--eval-every", "1", "--no-progress"]
    args += ["--frames", "5", "--sample-every", "2", "--keep-best-by", "diversity"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    emb = load_embedding(run / "embedding.safetensors", expected_family="wan")
    assert emb.metadata["frames"] == "5" and summary["config"]["frames"] == 5

    with open(run / "heldout_scores.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["step"] == "2"]
    texts = [r["prompt"] for r in rows if r["measure"] == "heldout"]
    assert texts == ["a green house", "a cat in the city"] and summary["heldout_seeds"] == [1234, 1235]
    backend = load_diffusers(wan21, frames=5)
    reward = load_rewards([spec])
    seeds = summary["heldout_seeds"]
    with torch.no_grad():
        clips = generate(
            backend,
            backend.encode_prompts(texts),
            backend.negative_cond(emb.model_rows().float()),
            seeded_noise(backend, seeds, 16, 16),
            3,
            5.0,
        )
        assert clips.shape == (2 * 5, 3, 16, 16)
        per_frame_scores = reward(clips, [t for t in texts for _ in range(5)]).view(2, 5)
    expected = per_frame_scores.mean(1)
    assert not torch.allclose(per_frame_scores, expected[:, None].expand(2, 5))  # the frames differ
    for measure in ("heldout", "hpsv2.1"):
        got = torch.tensor([float(r["score"]) for r in rows if r["measure"] == measure])
        assert torch.allclose(got, expected.float(), atol=2e-5), (measure, got, expected)
    last = summary["heldout_history"][-1]
    assert last["diversity"] is not None and last["diversity"] > 0

    # every step costs 2 clips of 5 frames for the reward (forward and backward)
    with open(run / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert [int(r["compute_R"]) for r in log] == [20, 40]

    grid = Image.open(run / "samples" / "step_000002.png")
    one = Image.open(run / "samples" / "step_000000.png")
    assert grid.size == one.size and grid.size[0] > 4 * grid.size[1] / 2  # two strips of 5 frames a row

    # a resume is the same run: clips of another length are refused by name
    more = [a if a != "2" or i != args.index("--steps") + 1 else "3" for i, a in enumerate(args)]
    more[more.index("--frames") + 1] = "9"
    assert main([*more, "--resume"]) != 0
    assert "--frames 5" in capsys.readouterr().err


def test_tune_on_a_clip_starts_from_the_clips_reward(tmp_path, wan21, tiny_hps_ckpt, capsys):
    from reneg.cli import main
    from reneg.embedding import load_embedding
    from reneg.generate import generate, seeded_noise
    from reneg.rewards import load_rewards

    out = tmp_path / "tuned.safetensors"
    spec = f"hpsv2={tiny_hps_ckpt}"
    args = ["tune", "--model", wan21, "--reward", spec, "--sampling-steps", "3", "--resolution", "16"]
    args += ["--guidance", "5", "--grad-range", "0", "1", "--prompt", "a red circle", "--seed", "1"]
    args += ["--max-steps", "2", "--patience", "2", "--lr", "0.5", "--frames", "5", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    rep = json.loads(out.with_suffix(".json").read_text())
    assert load_embedding(out, expected_family="wan").metadata["frames"] == "5"
    backend = load_diffusers(wan21, frames=5)
    null, _ = backend.null_embedding()
    with torch.no_grad():
        clip = generate(
            backend,
            backend.encode_prompts(["a red circle"]),
            backend.negative_cond(null),
            seeded_noise(backend, [1], 16, 16),
            3,
            5.0,
        )
        expected = float(FrameReward(load_rewards([spec]), 5)(clip, ["a red circle"]))
    assert rep["start_reward"] == pytest.approx(expected, abs=2e-5)


def test_frames_are_refused_where_they_do_not_fit(tmp_path, wan21, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    from reneg.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green house\n")
    base = ["--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "2", "--grad-range", "0", "1"]
    base += [
        "--resolution",
        "16",
        "--prompts",
        str(prompts),
        "--heldout-count",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    cases = [
        (tiny_pipeline_dir, "5", r"--frames 5: .* is a tiny model, which makes images; clips are for a text-to-video"),
        (wan21, "4", r"--frames 4: Wan makes 4 k \+ 1 frames"),
        (wan21, "0", r"--frames must be a positive integer"),
    ]
    for i, (model, frames, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main(["train", "--model", model, *base, "--out", str(out), "--frames", frames]) != 0
        assert re.search(message, capsys.readouterr().err), message
        assert not (out / "embedding.safetensors").exists()
    args = ["tune", "--model", tiny_pipeline_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--prompt", "a red circle"]
    args += ["--sampling-steps", "2", "--grad-range", "0", "1", "--resolution", "16", "--frames", "5"]
    args += ["--out", str(tmp_path / "t.safetensors")]
    assert main(args) != 0
    assert "--frames 5:" in capsys.readouterr().err and not (tmp_path / "t.safetensors").exists()


def test_zeroscope_trains_on_its_clips_and_asks_for_frames_without_them(tmp_path, tiny_hps_ckpt, capsys):
    """A TextToVideoSDPipeline folder (ZeroScope's layout) makes clips only: --frames trains on them (each
    step's reward over 2 clips of 4 frames), and without it the run stops asking for --frames by name."""
    from reneg.cli import main
    from reneg.embedding import load_embedding
    from reneg.tiny import build_tiny_text_to_video

    t2v = build_tiny_text_to_video(str(tmp_path / "t2v"), hidden=64)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green house\n")
    args = ["train", "--model", t2v, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "3"]
    args += ["--grad-range", "0", "1", "--resolution", "16", "--prompts", str(prompts), "--heldout-count", "1"]
    args += ["--steps", "1", "--batch-size", "2", "--micro-batch", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) != 0
    assert "give --frames N" in capsys.readouterr().err
    assert not (tmp_path / "a" / "embedding.safetensors").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--frames", "4"]) == 0, capsys.readouterr().err
    assert load_embedding(tmp_path / "b" / "embedding.safetensors").metadata["frames"] == "4"
    with open(tmp_path / "b" / "log.csv", newline="") as f:
        assert [int(r["compute_R"]) for r in csv.DictReader(f)] == [16]


def test_shift_samples_as_the_pipeline_with_that_shift_and_is_refused_elsewhere(
    tmp_path, wan21, tiny_backend, tiny_hps_ckpt, capsys
):
    """--shift 8 (ComfyUI's ModelSamplingSD3 shift in its Wan 2.2 templates): the same latents as
    WanPipeline with a FlowMatchEuler scheduler of shift 8; other than the model's own 3; on an image model
    it is refused; reneg train records it and a resume with another shift is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from reneg.backends.diffusers_backend import ModelLoadError
    from reneg.backends.loading import apply_model_options
    from reneg.cli import main
    from reneg.embedding import load_embedding
    from reneg.sampling import initial_latent, sample

    b = load_diffusers(wan21, frames=5)
    assert b.shift == 3.0
    own = b.schedule(6)
    assert apply_model_options(b, shift=8.0) is b and b.shift == 8.0
    pipe = WanPipeline.from_pretrained(
        wan21, scheduler=FlowMatchEulerDiscreteScheduler(shift=8.0), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    cond = b.encode_prompts(["a red circle"])
    null, _ = b.null_embedding()
    noise = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = pipe(
        prompt_embeds=cond.crossattn,
        negative_prompt_embeds=null,
        latents=noise.clone(),
        num_inference_steps=6,
        guidance_scale=5.0,
        height=16,
        width=16,
        num_frames=5,
        output_type="latent",
    ).frames
    sig = b.schedule(6)
    got, _ = sample(b.denoiser, initial_latent(noise, sig[0], True), sig, cond, b.negative_cond(null), 5.0)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    assert (sig - own).abs().max() > 0.05  # shift 8 is another schedule than the model's 3
    with pytest.raises(ModelLoadError, match="--shift: for Wan's fixed flow shift; .* is a tiny model"):
        apply_model_options(tiny_backend, shift=8.0)

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green house\n")
    run = tmp_path / "run"
    args = ["train", "--model", wan21, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "3"]
    args += ["--grad-range", "0", "1", "--resolution", "16", "--prompts", str(prompts), "--heldout-count", "1"]
    args += ["--steps", "1", "--batch-size", "1", "--no-progress", "--out", str(run)]
    assert main([*args, "--shift", "8"]) == 0, capsys.readouterr().err
    assert load_embedding(run / "embedding.safetensors").metadata["flow_shift"] == "8.0"
    assert main([*args, "--shift", "5", "--resume", "--steps", "2"]) != 0
    assert "--shift 8.0" in capsys.readouterr().err
    assert main([*args, "--shift", "-1", "--out", str(tmp_path / "x")]) != 0
    assert "--shift must be a finite number > 0" in capsys.readouterr().err


def test_eval_makes_wans_own_length_unless_told(tmp_path, wan21, tiny_pipeline_dir):
    """reneg eval without --frames: 81 frames for Wan (its releases' length; 16 is not a Wan length), 16 for
    ZeroScope; an image model has no default video length to take."""
    from reneg.backends.loading import VIDEO_FRAMES, WAN_FRAMES, default_frames
    from reneg.tiny import build_tiny_text_to_video

    assert default_frames(wan21) == WAN_FRAMES == 81
    assert default_frames(build_tiny_text_to_video(str(tmp_path / "t2v"), hidden=64)) == VIDEO_FRAMES == 16
    assert default_frames(tiny_pipeline_dir) == 16
    assert (81 - 1) % 4 == 0
