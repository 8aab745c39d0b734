"""The demo world: deterministic data, the designed degraded fraction, and the shipped assets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from reneg import demo_world
from reneg.demo_world import world

DEGRADATION_WORDS = ("blurry", "noisy", "smeared", "washed", "discoloured")


def _has_degradation_word(caption: str) -> bool:
    return any(w in caption for w in DEGRADATION_WORDS)


def test_world_is_deterministic_by_seed():
    a = world.make_dataset(40, seed=7)
    b = world.make_dataset(40, seed=7)
    c = world.make_dataset(40, seed=8)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[0], c[0])
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(5):
        i1, c1, f1, m1 = world.make_sample(rng1)
        i2, c2, f2, m2 = world.make_sample(rng2)
        assert np.array_equal(i1, i2) and c1 == c2 and f1 == f2 and m1 == m2
        assert i1.shape == (32, 32, 3) and i1.dtype == np.uint8
        # the clean image can be rebuilt from the meta
        clean = world.render_scene(m1["scene"])
        assert f1 == np.array_equal(clean, i1) or not f1
    assert world.heldout_prompts() == world.heldout_prompts()
    assert world.train_prompts(20, seed=1) == world.train_prompts(20, seed=1)
    assert world.train_prompts(20, seed=1) != world.train_prompts(20, seed=2)


def test_prompts_are_clean_style():
    held = demo_world.heldout_prompts()
    assert len(held) == 32 and len(set(held)) == 32
    train = demo_world.train_prompts(200, seed=0)
    assert not any(_has_degradation_word(p) for p in held + train)
    for p in held:
        assert any(c in p for c in world.COLOURS) and any(s in p for s in world.SHAPES)
    assert all(w in world.vocabulary() for w in demo_world.HANDCRAFTED_NEGATIVE.replace(",", " ").split())


def test_degraded_fraction_is_as_designed():
    _, caps, clean, metas = world.make_dataset(3000, seed=11)
    degraded = ~clean
    named = np.array([m["named"] for m in metas])
    assert abs(degraded.mean() - world.DEGRADED_FRACTION) < 0.03
    assert abs((degraded & ~named).mean() - world.UNLABELLED_DEGRADED_FRACTION) < 0.03
    assert abs(named.mean() - (world.DEGRADED_FRACTION - world.UNLABELLED_DEGRADED_FRACTION)) < 0.02
    assert not (named & clean).any()
    for cap, _c, n in zip(caps, clean, named):
        assert _has_degradation_word(cap) == bool(n)
    kinds = {m["degradation"] for m in metas if m["degradation"]}
    assert kinds == set(world.DEGRADATIONS)


def test_package_paths():
    assert os.path.isdir(demo_world.ASSETS)
    assert os.path.isfile(os.path.join(demo_world.pipeline_dir(), "model_index.json"))
    assert os.path.isfile(demo_world.reward_checkpoint())
    assert os.path.isfile(demo_world.reward_config())


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        demo_world.pipeline_dir(), torch_dtype=torch.float32, local_files_only=True
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_loads_and_generates(pipe):
    from safetensors.torch import load_file

    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float32
    assert pipe.unet.config.cross_attention_dim == 64 == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 4
    assert pipe.vae.config.scaling_factor != 1.0
    sc = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.num_train_timesteps) == (
        "scaled_linear",
        0.00085,
        0.012,
        1000,
    )
    assert (sc.steps_offset, sc.clip_sample, sc.set_alpha_to_one, sc.prediction_type) == (1, False, False, "epsilon")
    index = json.load(open(os.path.join(demo_world.pipeline_dir(), "model_index.json")))
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]

    keys = load_file(os.path.join(demo_world.pipeline_dir(), "text_encoder", "model.safetensors")).keys()
    assert keys and all(k.startswith("text_model.") for k in keys)

    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, :5].tolist() == [49406, 320, 736, 7117, 49407]
    assert (ids[0, 5:] == 49407).all()  # SD1 pads with <|endoftext|>

    out = pipe(
        "two blue squares",
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def _load_reward():
    import open_clip
    from open_clip import factory

    name = demo_world.register_reward_config()
    assert name in factory._MODEL_CONFIGS
    model = open_clip.create_model(name, pretrained=None)
    ckpt = torch.load(demo_world.reward_checkpoint(), map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict"}
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), open_clip.get_tokenizer(name)


def _score(model, tokenizer, imgs_uint8, captions):
    import torch.nn.functional as F

    x = torch.from_numpy(np.stack(imgs_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [-1, 1]
    x = (x + 1) / 2
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    with torch.no_grad():
        fi = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        ft = F.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)
    return (fi * ft).sum(-1)


def test_reward_prefers_clean_and_matching_images():
    model, tokenizer = _load_reward()
    rng = np.random.default_rng(123)
    clean, degraded, wrong, caps = [], [], [], []
    for i in range(20):
        scene = world.sample_scene(rng)
        img = world.render_scene(scene)
        kind = world.DEGRADATIONS[i % len(world.DEGRADATIONS)]
        clean.append(img)
        degraded.append(world.degrade(img, kind, rng))
        other = dict(scene, colour=[c for c in world.COLOURS if c != scene["colour"]][i % 5])
        wrong.append(world.render_scene(other))
        caps.append(world.caption_for(scene))
    s_clean = _score(model, tokenizer, clean, caps)
    s_deg = _score(model, tokenizer, degraded, caps)
    s_wrong = _score(model, tokenizer, wrong, caps)
    assert s_clean.mean() > s_deg.mean() and (s_clean > s_deg).float().mean() >= 0.75
    assert s_clean.mean() > s_wrong.mean() and (s_clean > s_wrong).float().mean() >= 0.75


def _clean_degraded_mismatched(n: int, seed: int):
    """``n`` rendered scenes: clean images, degraded copies (every degradation in turn), the same scenes
    in another colour, and their captions."""
    rng = np.random.default_rng(seed)
    clean, degraded, wrong, caps = [], [], [], []
    for i in range(n):
        scene = world.sample_scene(rng)
        img = world.render_scene(scene)
        clean.append(img)
        degraded.append(world.degrade(img, world.DEGRADATIONS[i % len(world.DEGRADATIONS)], rng))
        wrong.append(world.render_scene(dict(scene, colour=[c for c in world.COLOURS if c != scene["colour"]][i % 5])))
        caps.append(world.caption_for(scene))

    def tensor(imgs):
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [-1, 1]

    return tensor(clean), tensor(degraded), tensor(wrong), caps


def test_held_out_judges_are_shipped_in_the_reward_format():
    assert [name for name, _c, _j in demo_world.judges()] == list(demo_world.JUDGES) == ["judge", "referee"]
    assert (demo_world.judge_checkpoint(), demo_world.judge_config()) == demo_world.judge_files("judge")
    assert (demo_world.referee_checkpoint(), demo_world.referee_config()) == demo_world.judge_files("referee")
    shipped = json.load(open(demo_world.reward_config()))
    for _name, ckpt, config in demo_world.judges():
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert set(sd) == {"state_dict"}
        assert all(v.dtype == torch.float16 for v in sd["state_dict"].values() if v.is_floating_point())
        assert os.path.getsize(ckpt) < 4.2e6
        cfg = json.load(open(config))
        assert cfg["vision_cfg"] != shipped["vision_cfg"]  # another architecture than the reward's
    with pytest.raises(ValueError, match="expected one of judge, referee"):
        demo_world.judge_files("umpire")


def test_held_out_judges_load_with_the_hps_loader_and_prefer_clean_images():
    rewards = pytest.importorskip("reneg.rewards")
    clean, degraded, wrong, caps = _clean_degraded_mismatched(20, seed=321)
    for name, ckpt, config in demo_world.judges():
        r = rewards.load_rewards([f"hpsv2={ckpt},config={config}"])
        with torch.no_grad():
            s_clean, s_deg, s_wrong = (r(x, caps) for x in (clean, degraded, wrong))
        assert (s_clean > s_deg).float().mean() >= 0.75, (name, s_clean - s_deg)
        assert (s_clean > s_wrong).float().mean() >= 0.75, (name, s_clean - s_wrong)


def test_demo_setup_lists_the_judges_and_train_demo_only_monitors_them(tmp_path):
    from reneg import demo
    from reneg.cli import _apply_demo, build_parser
    from reneg.rewards import parse_spec

    d = demo.setup(str(tmp_path / "setup"))
    assert d["kind"] == "demo world"
    assert d["judges"] == [f"hpsv2={c},config={j}" for _n, c, j in demo_world.judges()] and len(d["judges"]) == 2
    for spec in d["judges"]:
        assert parse_spec(spec).name == "hpsv2"
    # training optimises the reward alone: the judges only ever judge, as its monitors (named as eval names them)
    ns = build_parser().parse_args(["train", "--demo", "--out", str(tmp_path / "run")])
    _apply_demo(ns, "train")
    assert ns.rewards == [d["reward"]] and ns.monitor_rewards == d["judges"]
    from reneg.options import monitor_names

    assert monitor_names(ns.monitor_rewards, ns.rewards) == ["hpsv2-judge", "hpsv2-referee"]
    # a --monitor-reward given replaces them
    from reneg.options import given_flags

    argv = ["train", "--demo", "--out", str(tmp_path / "run"), "--monitor-reward", d["judges"][1]]
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.given_flags = given_flags(parser, argv)
    _apply_demo(ns, "train")
    assert ns.monitor_rewards == [d["judges"][1]]


def test_demo_holds_out_prompts_training_never_draws(tmp_path, monkeypatch):
    """The demo's held-out prompts are captions its training prompts never contain (the world has only about
    860 distinct captions: a plain draw of 2000 held 29 of the first 32), eval --demo judges on all 128 with
    tuning on the first 8, and the trainer checks on the first 32."""
    from test_hostile_inputs import demo_eval_config, fake_finished_demo_train

    from reneg import demo
    from reneg.prompts import load_prompts

    d = demo.setup(str(tmp_path / "setup"))
    train = [p.text for p in load_prompts(d["prompts"])]
    held = [p.text for p in load_prompts(d["heldout"])]
    assert len(train) == 2000 and len(held) == len(set(held)) == demo.DEMO_HELDOUT_PROMPTS == 128
    assert not set(train) & set(held)
    assert held[:32] == demo_world.heldout_prompts(32) and d["settings"]["heldout_count"] == 32
    # excluding changes only which captions are drawn: no degradation words, and the draw is reproducible
    assert not any(_has_degradation_word(p) for p in train)
    assert world.train_prompts(50, seed=3, exclude=held) == world.train_prompts(50, seed=3, exclude=held)

    monkeypatch.chdir(tmp_path)  # no runs/demo-train here
    fake_finished_demo_train(tmp_path / "ev")  # (else the eval's config would train one first)
    cfg = demo_eval_config(["eval", "--demo", "--out", str(tmp_path / "ev")])
    assert cfg.tune_prompts == 8 and cfg.tune_per_prompt == 1 and cfg.images_per_prompt == 8
    assert len(load_prompts(cfg.prompts)) == 128


def test_train_prompts_refuse_an_exclusion_that_leaves_nothing(monkeypatch):
    monkeypatch.setattr(world, "caption_for", lambda scene: "a red circle")
    with pytest.raises(ValueError, match="only 0 of 5 prompts could be drawn outside the 1 excluded"):
        world.train_prompts(5, seed=0, exclude=["a red circle"])


def test_demo_setup_has_no_judges_with_the_tiny_fallback(tmp_path, monkeypatch):
    from reneg import demo

    monkeypatch.setattr(demo, "_world", lambda: None)
    d = demo.setup(str(tmp_path))
    assert d["kind"] == "tiny random models" and d["judges"] == []


def test_eval_demo_scores_with_the_reward_first_and_the_judges(tmp_path, monkeypatch):
    from test_hostile_inputs import demo_eval_config, fake_finished_demo_train

    from reneg import demo
    from reneg.evaluation.scoring import reward_names
    from reneg.rewards import parse_spec

    monkeypatch.chdir(tmp_path)  # no runs/demo-train here
    out = tmp_path / "ev"
    fake_finished_demo_train(out)
    d = demo.setup(str(out))
    cfg = demo_eval_config(["eval", "--demo", "--out", str(out)])
    assert cfg.rewards == [d["reward"], *d["judges"]] and len(cfg.rewards) == 3
    # the trained-on reward stays first: the report's headline and per-sample tuning's reward
    assert reward_names([parse_spec(s) for s in cfg.rewards]) == ["hpsv2", "hpsv2-judge", "hpsv2-referee"]
    assert "held-out judges" in cfg.note


def test_reward_loads_with_the_project_hps_loader():
    rewards = pytest.importorskip("reneg.rewards")
    r = rewards.load_rewards(["hpsv2=" + demo_world.reward_checkpoint()])
    rng = np.random.default_rng(5)
    scene = world.sample_scene(rng)
    img = world.render_scene(scene)
    imgs = [img, world.degrade(img, "blur", rng)]
    cap = world.caption_for(scene)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        s = r(x, [cap, cap])
    model, tokenizer = _load_reward()
    assert torch.allclose(s, _score(model, tokenizer, imgs, [cap, cap]), atol=1e-5)


def _demo_world_tool():
    """tools/train_demo_world.py (not a package: loaded from its file, once)."""
    import importlib.util
    import sys

    if "train_demo_world" not in sys.modules:
        path = os.path.join(os.path.dirname(__file__), "..", "tools", "train_demo_world.py")
        spec = importlib.util.spec_from_file_location("train_demo_world", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclass looks itself up there
        spec.loader.exec_module(mod)
    return sys.modules["train_demo_world"]


def test_judges_card_section_replaces_its_earlier_self_and_agreement_measures(tmp_path):
    tool = _demo_world_tool()
    (tmp_path / "CARD.md").write_text("# card\n\n## Reward\n\nr\n\n## Limits\n\n- toy\n")
    tool.write_card_section(tmp_path, [tool.JUDGES_HEADING + " (old)", "", "first", ""])
    tool.write_card_section(tmp_path, [tool.JUDGES_HEADING + " (new)", "", "second", ""])
    text = (tmp_path / "CARD.md").read_text()
    assert text == "# card\n\n## Reward\n\nr\n\n## Held-out judges (new)\n\nsecond\n\n## Limits\n\n- toy\n"
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert tool.spearman(a, a * 2) == pytest.approx(1.0) and tool.spearman(a, -a) == pytest.approx(-1.0)
    assert tool.same_order(np.array([1.0, -1.0, 2.0]), np.array([0.5, 1.0, 3.0])) == pytest.approx(2 / 3)
    # 3 seeds x 2 prompts, seed-major: the 3 pairs of seeds of each prompt
    d = tool.within_prompt_pairs(np.array([1.0, 10.0, 2.0, 20.0, 4.0, 40.0]), 2)
    assert sorted(d.tolist()) == sorted([-1.0, -3.0, -2.0, -10.0, -30.0, -20.0])
    # the judges differ from the reward and from each other in architecture, and in every seed
    configs = [tool.REWARD_CONFIG] + [r.config for r in tool.JUDGES]
    assert len({json.dumps(c["vision_cfg"], sort_keys=True) for c in configs}) == 3
    seeds = [s for r in (tool.SHIPPED_REWARD, *tool.JUDGES) for s in (r.data_seed, r.train_seed)]
    assert len(set(seeds + [tool.JUDGE_EVAL_SEED, 5])) == len(seeds) + 2


def test_every_demo_setting_belongs_to_train_or_to_eval_and_the_studies_build_their_runs(tmp_path):
    """A setting added to the demo for eval (eval_tune_prompts) once reached the studies' TrainConfig and
    crashed them; train_settings() is the one filter, and every other setting is one eval or tune reads."""
    from types import SimpleNamespace

    from benchmarks.compute_study import base_recipe, demo_train_config, demo_world

    from reneg import demo
    from reneg.trainer.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    kept = demo.train_settings(demo.WORLD_SETTINGS)
    assert set(kept) <= set(fields) and "eval_every" in kept and "heldout_count" in kept
    others = set(demo.WORLD_SETTINGS) - set(kept)
    assert others == {
        "eval_images_per_prompt",
        "eval_tune_per_prompt",
        "eval_tune_prompts",
        "eval_tune_steps",
        "tune_lr",
        "eval_train_steps",
    }
    world = demo_world(str(tmp_path / "study"))
    assert len(world["heldout_texts"]) == 32  # the studies score the trainer's 32, not eval's 128
    cfg = demo_train_config(
        world, str(tmp_path / "run"), base_recipe(world, SimpleNamespace(steps=None, batch_size=None, lr=None))
    )
    assert cfg.steps == demo.WORLD_SETTINGS["steps"] and cfg.heldout_count == 32
