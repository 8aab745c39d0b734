"""The ComfyUI node pack, loaded by path as ComfyUI loads it, run on tiny models under stubs of
``comfy.*`` and ``folder_paths`` (tests/comfy_stubs.py), inside ``torch.inference_mode()`` as
ComfyUI's executor runs every node."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy_stubs

ROOT = Path(__file__).resolve().parents[1]
NODE_IDS = [
    "ReNegLoadEmbedding",
    "ReNegPerSampleTune",
    "ReNegRewardScore",
    "ReNegLoadRewardModel",
    "ReNegSaveEmbedding",
    "ReNegNAG",
    "ReNegPredictedNegative",
]


@pytest.fixture
def host(tmp_path):
    h = comfy_stubs.Host(str(tmp_path / "models"))
    # a path the user set in extra_model_paths.yaml (ComfyUI applies it before loading packs)
    h.fp.folder_names_and_paths["reneg"] = ([str(tmp_path / "elsewhere")], set())
    try:
        h.pack = h.load_pack(str(ROOT))
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def models(tiny_pipeline_dir):
    return comfy_stubs.tiny_comfy_models(tiny_pipeline_dir)


@pytest.fixture
def reward(host, tiny_hps_ckpt):
    folder = Path(host.models_dir) / "reward_models" / "tiny-hps"
    folder.mkdir(parents=True)
    for f in os.listdir(os.path.dirname(tiny_hps_ckpt)):
        shutil.copy(os.path.join(os.path.dirname(tiny_hps_ckpt), f), folder / f)
    node = host.pack.NODE_CLASS_MAPPINGS["ReNegLoadRewardModel"]()
    entries = node.INPUT_TYPES()["required"]["model"][0]
    assert "tiny-hps/hps_tiny.pt" in entries
    with torch.inference_mode():
        return node.load("hpsv2", "tiny-hps/hps_tiny.pt", "none", "float32")[0]


def node(host, name):
    return host.pack.NODE_CLASS_MAPPINGS[name]()


def run(fn, *args, **kwargs):
    """Call a node function the way ComfyUI's executor does; unwrap {"ui", "result"}."""
    with torch.inference_mode():
        out = fn(*args, **kwargs)
    return out["result"] if isinstance(out, dict) else out


def save_tiny_embedding(host, name="tiny_neg.safetensors", seed=0):
    from reneg.embedding import NegEmbedding, save_embedding

    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    t = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(seed))
    save_embedding(str(folder / name), NegEmbedding(t, "tiny"))
    return t


def test_pack_loads_by_path_importing_only_torch_and_safetensors():
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import comfy_stubs
h = comfy_stubs.Host({str(ROOT / "no-such-models")!r})
pack = h.load_pack({str(ROOT)!r})
heavy = [m for m in ("diffusers", "transformers", "open_clip") if m in sys.modules]
print(sorted(pack.NODE_CLASS_MAPPINGS), heavy)
for cls in pack.NODE_CLASS_MAPPINGS.values():
    cls.INPUT_TYPES()
heavy = [m for m in ("diffusers", "transformers", "open_clip") if m in sys.modules]
print(heavy)
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = ""  # not via the installed 'reneg': relative imports only
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == f"{sorted(NODE_IDS)} []"
    assert lines[1] == "[]"


def test_node_ids_names_and_model_folders(host, tmp_path):
    pack = host.pack
    assert sorted(pack.NODE_CLASS_MAPPINGS) == sorted(NODE_IDS)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {
        "ReNegLoadEmbedding": "Load ReNeg Embedding",
        "ReNegPerSampleTune": "Per-Sample ReNeg Tune",
        "ReNegRewardScore": "Reward Score",
        "ReNegLoadRewardModel": "Load Reward Model",
        "ReNegSaveEmbedding": "Save ReNeg Embedding",
        "ReNegNAG": "ReNeg NAG",
        "ReNegPredictedNegative": "ReNeg Predicted Negative",
    }
    paths, exts = host.fp.folder_names_and_paths["reneg"]
    assert paths[0] == os.path.join(host.models_dir, "reneg")
    assert str(tmp_path / "elsewhere") in paths  # the user's extra path is kept
    assert paths[-1] == str(ROOT / "embeddings")
    assert {".safetensors", ".bin"} <= exts
    assert host.fp.folder_names_and_paths["reward_models"][0] == [os.path.join(host.models_dir, "reward_models")]
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert callable(getattr(cls, cls.FUNCTION)) and "required" in spec
        assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))


def test_load_embedding_blends_and_keeps_pooled(host, models):
    _, _, clip = models
    t = save_tiny_embedding(host)
    load = node(host, "ReNegLoadEmbedding")
    assert "tiny_neg.safetensors" in load.INPUT_TYPES()["required"]["embedding"][0]
    (full,) = run(load.load, "tiny_neg.safetensors", clip, 1.0)
    assert len(full) == 1 and torch.equal(full[0][0], t)
    assert full[0][1]["pooled_output"].shape == (1, 64)  # from the empty prompt
    with torch.inference_mode():
        null = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        base = clip.encode_from_tokens_scheduled(clip.tokenize("ugly, blurry"))
    (none,) = run(load.load, "tiny_neg.safetensors", clip, 0.0)
    assert torch.equal(none[0][0], null[0][0])
    # a long base negative (154 rows) with a ControlNet-style extra key
    long_base = [[torch.cat([base[0][0], base[0][0]], 1), dict(base[0][1], control="cn")]]
    (half,) = run(load.load, "tiny_neg.safetensors", clip, 0.5, base_negative=long_base)
    assert half[0][0].shape == (1, 154, 64) and half[0][1]["control"] == "cn"
    expect = 0.5 * (base[0][0] + t)
    torch.testing.assert_close(half[0][0][:, :77], expect)
    torch.testing.assert_close(half[0][0][:, 77:], expect)


def test_load_embedding_errors_are_clear(host, models):
    _, _, clip = models
    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True)
    torch.save(torch.randn(1, 77, 768), folder / "sd15_style.bin")  # the paper's format, SD1.x
    load = node(host, "ReNegLoadEmbedding")
    with pytest.raises(RuntimeError) as e:
        run(load.load, "sd15_style.bin", clip, 1.0)
    msg = str(e.value)
    assert msg.startswith("Load ReNeg Embedding:") and "sd1" in msg and "tiny" in msg, msg
    with pytest.raises(RuntimeError, match="not found in the 'reneg' model folder"):
        run(load.load, "missing.safetensors", clip, 1.0)
    save_tiny_embedding(host)
    with pytest.raises(RuntimeError, match="strength must be between 0 and 1"):
        run(load.load, "tiny_neg.safetensors", clip, 1.5)


def test_reward_model_and_score_rank_images(host, reward, tiny_reward):
    images = torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    score = node(host, "ReNegRewardScore")
    with torch.inference_mode():
        out = score.score(images, "a red circle", reward, True)
    scores, report, ranked, best, best_index = out["result"]
    assert isinstance(scores, list) and len(scores) == 3 and all(isinstance(s, float) for s in scores)
    with torch.no_grad():  # the core's reward on the same images gives the same numbers
        expect = tiny_reward(images.movedim(-1, 1) * 2 - 1, ["a red circle"] * 3)
    torch.testing.assert_close(torch.tensor(scores), expect.float(), rtol=1e-4, atol=1e-5)
    order = sorted(range(3), key=lambda i: -scores[i])
    assert best_index == order[0] and torch.equal(best[0], images[order[0]])
    assert all(torch.equal(ranked[k], images[i]) for k, i in enumerate(order))
    assert out["ui"]["text"] == [report] and f"image {order[0]}" in report and "best" in report
    (_, _, unranked, _, _) = run(score.score, images, "a red circle", reward, False)
    assert torch.equal(unranked, images)
    with pytest.raises(RuntimeError, match=r"Reward Score: images: expected an IMAGE batch"):
        run(score.score, torch.rand(16, 16, 3), "a red circle", reward, True)


def test_load_reward_model_errors(host, reward):
    load = node(host, "ReNegLoadRewardModel")
    with pytest.raises(RuntimeError, match="Load Reward Model: model 'nope.pt' was not found"):
        run(load.load, "hpsv2", "nope.pt", "none", "float32")
    with pytest.raises(RuntimeError, match="pickscore needs a model folder"):
        run(load.load, "pickscore", "tiny-hps/hps_tiny.pt", "none", "float32")
    with pytest.raises(RuntimeError, match="aesthetic needs clip_model"):
        run(load.load, "aesthetic", "tiny-hps/hps_tiny.pt", "none", "float32")


def _tune_args(models, positive, negative, reward, **kw):
    model, vae, _ = models
    args = dict(
        model=model,
        vae=vae,
        positive=positive,
        negative=negative,
        reward=reward,
        prompt="a red circle",
        seed=3,
        max_steps=3,
        patience=3,
        learning_rate=0.05,
        cfg=7.5,
        steps=4,
        grad_step_min=0,
        grad_step_max=2,
        width=16,
        height=16,
        noise_mode="this seed",
        scheduler="ddim_uniform",
    )
    args.update(kw)
    return args


def _state(modules):
    return [(p.requires_grad, p.grad is None) for m in modules for p in m.parameters()]


def _conds(clip):
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return pos, neg


def test_tune_never_scores_below_start_and_leaves_nothing_behind(host, models, reward):
    from reneg.backends.comfy_backend import ComfyBackend
    from reneg.generate import seeded_noise
    from reneg.sampling import initial_latent, sample

    model, vae, clip = models
    pos, neg = _conds(clip)
    tune = node(host, "ReNegPerSampleTune")
    modules = [model.model, vae.first_stage_model, reward.module]
    before = _state(modules)
    ticks = []
    host.utils.PROGRESS_BAR_HOOK = lambda cur, total, preview: ticks.append((cur, total))
    results = []
    for _ in range(2):  # twice in a row: the second run must see the same clean models
        with torch.inference_mode():
            out = tune.tune(**_tune_args(models, pos, neg, reward))
        results.append(out["result"])
        assert _state(modules) == before  # requires_grad as the host had it, no .grad left behind
    (tuned, r0, r1), (tuned2, r0b, r1b) = results
    assert r1 >= r0 and r0b == pytest.approx(r0, abs=1e-5) and r1b == pytest.approx(r1, abs=1e-5)
    t = tuned[0][0]
    assert t.shape == (1, 77, 64) and not t.requires_grad and t.grad_fn is None and not t.is_inference()
    info = tuned[0][1]["reneg"]
    assert info["kind"] == "per-sample" and info["seed"] == 3 and info["start_reward"] == r0
    assert "pooled_output" in tuned[0][1]
    assert ticks and ticks[-1][0] == ticks[-1][1]  # the progress bar ran to the end
    assert host.mm.load_calls and host.mm.load_calls[0][2] is True  # loaded fully, like the LoRA trainer
    assert not any(p.is_inference() for p in model.model.parameters())  # weights are normal tensors now

    # the returned negative, sampled again on the tuned seed, scores at least as well as the start
    backend = ComfyBackend(model, vae, 64, "ddim_uniform")
    sigmas = backend.schedule(4)

    def final_score(negative):
        with torch.no_grad():
            x = initial_latent(seeded_noise(backend, [3], 16, 16), sigmas[0])
            _, x0 = sample(
                backend.denoiser, x, sigmas, backend.positive_cond(pos), backend.negative_cond(negative), 7.5
            )
            return float(reward.module(backend.decode(x0), ["a red circle"]))

    assert final_score(t) == pytest.approx(r1, abs=1e-4)
    assert final_score(neg[0][0].clone()) == pytest.approx(r0, abs=1e-4)
    assert final_score(t) >= final_score(neg[0][0].clone()) - 1e-6


def test_tune_cancel_stops_within_a_step(host, models, reward):
    model, vae, clip = models
    pos, neg = _conds(clip)
    modules = [model.model, vae.first_stage_model, reward.module]
    before = _state(modules)
    ticks = []

    def hook(cur, total, preview):
        ticks.append(cur)
        if cur == 3:  # the user presses Cancel during the first sampling pass
            host.mm.interrupt_current_processing(True)

    host.utils.PROGRESS_BAR_HOOK = hook
    tune = node(host, "ReNegPerSampleTune")
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        run(tune.tune, **_tune_args(models, pos, neg, reward, max_steps=10))
    assert ticks[-1] == 3  # stopped at the very next check: no further sampling step ran
    assert _state(modules) == before
    assert host.mm.empty_cache_calls >= 1  # memory released on the way out


def test_tune_clamps_its_grad_range_to_the_sampling_steps(host, models, reward, capsys):
    """The paper's 0-10 needs 11 sampling steps: with 4 the node uses 0-3 and says so, on the node
    and in the log, instead of refusing its own default."""
    from reneg.options import PAPER

    model, vae, clip = models
    pos, neg = _conds(clip)
    tune = node(host, "ReNegPerSampleTune")
    req = tune.INPUT_TYPES()["required"]
    assert (req["grad_step_min"][1]["default"], req["grad_step_max"][1]["default"]) == PAPER.grad_range
    assert req["steps"][1]["default"] == PAPER.sampling_steps and req["cfg"][1]["default"] == PAPER.guidance
    with torch.inference_mode():
        out = tune.tune(**_tune_args(models, pos, neg, reward, max_steps=1, patience=1, grad_step_max=10))
    text = out["ui"]["text"][0]
    assert text.startswith("note: grad step range 0-10 does not fit 4 sampling steps; using 0-3"), text
    assert "using 0-3" in capsys.readouterr().out
    assert out["result"][0][0][1]["reneg"]["grad_range"] == "0,3"


def test_tune_search_steps_meters_and_keeps_the_models_clean(host, models, reward):
    """search_steps: the search runs at fewer sampling steps, the kept negative's image once at
    `steps`; the record carries the meter's counts as flat values the Save node can write."""
    model, vae, clip = models
    pos, neg = _conds(clip)
    modules = [model.model, vae.first_stage_model, reward.module]
    before = _state(modules)
    ticks = []
    host.utils.PROGRESS_BAR_HOOK = lambda cur, total, preview: ticks.append((cur, total))
    tune = node(host, "ReNegPerSampleTune")
    with torch.inference_mode():
        out = tune.tune(
            **_tune_args(
                models,
                pos,
                neg,
                reward,
                steps=8,
                grad_step_min=0,
                grad_step_max=3,
                max_steps=2,
                patience=2,
                search_steps=4,
            )
        )
    assert _state(modules) == before
    info = out["result"][0][0][1]["reneg"]
    assert info["search_steps"] == 4 and info["sampling_steps"] == 8 and info["final_reward"] is not None
    # 2 searches of 4 steps (+1 call: the grad step runs its two branches apart) + 8 for the kept image
    assert info["compute_unet_calls"] == 4 + 1 + 4 + 8
    assert isinstance(info["compute_units"], str) and info["compute_tflop_sd15"] > 0
    assert ticks and ticks[-1][0] == ticks[-1][1] == 2 * 4 + 8
    with pytest.raises(RuntimeError, match="search_steps 9"):
        run(tune.tune, **_tune_args(models, pos, neg, reward, steps=8, search_steps=9))


def test_tune_reports_bad_inputs(host, models, reward):
    model, vae, clip = models
    pos, neg = _conds(clip)
    tune = node(host, "ReNegPerSampleTune")
    wrong = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(RuntimeError, match=r"negative is sd1 .* positive is tiny"):
        run(tune.tune, **_tune_args(models, pos, wrong, reward))
    with pytest.raises(RuntimeError, match="prompt is empty"):
        run(tune.tune, **_tune_args(models, pos, neg, reward, prompt="  "))
    with pytest.raises(RuntimeError, match="width must be a positive multiple of 2, got 17"):
        run(tune.tune, **_tune_args(models, pos, neg, reward, width=17))
    combined = neg + neg
    with pytest.raises(RuntimeError, match="found 2 entries"):
        run(tune.tune, **_tune_args(models, pos, combined, reward))


def test_save_embedding_never_overwrites_silently(host, models):
    from reneg.embedding import load_embedding

    t = torch.randn(1, 77, 64)
    cond = [
        [
            torch.cat([t, t], 1),
            {"pooled_output": torch.zeros(1, 64), "reneg": {"kind": "per-sample", "prompt": "a red circle", "seed": 3}},
        ]
    ]
    save = node(host, "ReNegSaveEmbedding")
    with torch.inference_mode():
        out = save.save(cond, "sub/tuned", False, note="from a test")
    (path,) = out["result"]
    assert path == os.path.join(host.models_dir, "reneg", "sub", "tuned.safetensors")
    emb = load_embedding(path, expected_family="tiny")
    assert torch.equal(emb.tensor, t) and emb.metadata["kind"] == "per-sample"
    assert emb.metadata["prompt"] == "a red circle" and emb.metadata["note"] == "from a test"
    (second,) = run(save.save, [[t + 1, {}]], "sub/tuned", False)
    assert second.endswith("tuned_00001.safetensors")
    assert torch.equal(load_embedding(path).tensor, t)  # the first file is untouched
    (third,) = run(save.save, [[t + 2, {}]], "sub/tuned", True)
    assert third == path and torch.equal(load_embedding(path).tensor, t + 2)
    assert "sub/tuned.safetensors" in node(host, "ReNegLoadEmbedding").INPUT_TYPES()["required"]["embedding"][0]
    with pytest.raises(RuntimeError, match=r"Save ReNeg Embedding: filename '\.\./x'"):
        run(save.save, cond, "../x", False)
    with pytest.raises(RuntimeError, match="not one 77-row block repeated"):
        run(save.save, [[torch.randn(1, 154, 64), {}]], "long", False)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_comfy_denoiser_matches_the_diffusers_backend(request, tmp_path, prediction):
    """apply_model (sigma in, x0 out) through the adapter = the core's own diffusers denoiser."""
    from reneg.backends.comfy_backend import ComfyBackend
    from reneg.backends.loading import load_diffusers
    from reneg.cond import Cond
    from reneg.tiny import build_tiny_pipeline

    if prediction == "eps":
        folder = request.getfixturevalue("tiny_pipeline_dir")
    else:  # SD2.1-768 style
        folder = build_tiny_pipeline(str(tmp_path / "p"), seed=1, prediction_type="v_prediction")
    ref = load_diffusers(folder)
    model, vae, _ = comfy_stubs.tiny_comfy_models(folder, prediction)
    backend = ComfyBackend(model, vae, 64, "ddim_uniform")
    sigmas = backend.schedule(10)
    assert len(sigmas) == 11 and float(sigmas[-1]) == 0.0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = Cond(torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for s in sigmas[:-1:3]:
            sig = torch.full((2,), float(s))
            torch.testing.assert_close(backend.denoiser(x, sig, cond), ref.denoiser(x, sig, cond), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(backend.decode(x), ref.decode(x), rtol=1e-4, atol=1e-4)


def test_sdxl_load_and_tune_nodes(host, tiny_sdxl_dir, reward):
    """SDXL in the graph: the Load node keeps the pooled vector, the tune node builds the ADM vector
    (pooled + size) for every pass from the latent's size, and the ComfyUI denoiser equals the
    diffusers SDXL backend's on the same UNet."""
    from reneg.backends.comfy_backend import ComfyBackend
    from reneg.backends.loading import load_diffusers
    from reneg.cond import Cond
    from reneg.embedding import NegEmbedding, save_embedding

    models = comfy_stubs.tiny_comfy_sdxl_models(tiny_sdxl_dir)
    model, vae, clip = models
    ref = load_diffusers(tiny_sdxl_dir)
    backend = ComfyBackend(model, vae, 2048, "ddim_uniform", width=16, height=16)
    assert backend.family == "sdxl"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = ref.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        for s in backend.schedule(10)[:-1:3]:
            sig = torch.full((2,), float(s))
            torch.testing.assert_close(
                backend.denoiser(x, sig, backend._with_adm(c)), ref.denoiser(x, sig, c), rtol=1e-4, atol=1e-4
            )
    with pytest.raises(Exception, match="needs a pooled_output"):
        backend._with_adm(Cond(c.crossattn))

    # an SDXL file as `reneg train` writes it, through the Load node
    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    t = torch.randn(1, 77, 2048, generator=torch.Generator().manual_seed(0)) * 0.1
    file_pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(1))
    save_embedding(str(folder / "xl.safetensors"), NegEmbedding(t, "sdxl", pooled=file_pooled))
    load = node(host, "ReNegLoadEmbedding")
    (neg,) = run(load.load, "xl.safetensors", clip, 1.0)
    (base,) = run(load.load, "xl.safetensors", clip, 0.0)
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
        empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    # the file's pooled vector (the one its negative was trained with) is blended like the rows
    assert torch.equal(neg[0][0], t) and torch.equal(neg[0][1]["pooled_output"], file_pooled)
    assert torch.equal(base[0][0], empty[0][0])
    assert torch.equal(base[0][1]["pooled_output"], empty[0][1]["pooled_output"])

    model.model.adm_calls.clear()
    with torch.inference_mode():
        out = node(host, "ReNegPerSampleTune").tune(**_tune_args(models, pos, neg, reward, width=24, height=16))
    tuned, r0, r1 = out["result"]
    assert r1 >= r0 and tuned[0][0].shape == (1, 77, 2048) and "pooled_output" in tuned[0][1]
    sizes = {(a["width"], a["height"], a["target_width"], a["target_height"]) for a in model.model.adm_calls}
    assert sizes == {(24, 16, 24, 16)}


@pytest.mark.parametrize("workflow", sorted(p.name for p in (ROOT / "workflows").glob("*.json")))
def test_example_workflows_fit_the_nodes(host, workflow):
    """Every shipped workflow (UI format) gives each ReNeg node one widget value per widget input,
    in order, with choices the node offers; links join existing nodes. A renamed or reordered
    input would otherwise load users' saved graphs with values in the wrong widgets."""
    import json

    wf = json.loads((ROOT / "workflows" / workflow).read_text())
    ids = {n["id"] for n in wf["nodes"]}
    assert all(link[1] in ids and link[3] in ids for link in wf["links"])
    user_files = {"embedding", "predictor", "model", "clip_model", "tokenizer_model"}  # lists of the user's own files
    seen = 0
    for n in wf["nodes"]:
        if not n["type"].startswith("ReNeg"):
            continue
        seen += 1
        spec = node(host, n["type"]).INPUT_TYPES()
        widgets = []
        for section in ("required", "optional"):
            for name, (kind, *opts) in spec.get(section, {}).items():
                if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                    widgets.append((name, kind))
                    if opts and opts[0].get("control_after_generate"):
                        widgets.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"]))
        values = n["widgets_values"]
        assert len(values) == len(widgets), (n["type"], values, [w for w, _ in widgets])
        for (name, kind), value in zip(widgets, values):
            if isinstance(kind, list) and name not in user_files:
                assert value in kind, (n["type"], name, value)
            elif kind in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (n["type"], name, value)
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), (n["type"], name, value)
        if n["type"] == "ReNegPerSampleTune":  # the shipped values pass the shared checks
            named = {name: value for (name, _), value in zip(widgets, values)}
            sys.modules[type(node(host, n["type"])).__module__].check_inputs(**named)
    assert seen >= 1


# --------------------------------------------------------------------------- the options layer's checks


@pytest.mark.parametrize(
    "kw,expect",
    [
        (dict(cfg=float("nan")), "cfg must be a finite number > 0, got nan"),
        (dict(cfg=0.0), "cfg must be a finite number > 0, got 0.0"),
        (dict(learning_rate=0.0), "learning_rate must be a finite number > 0, got 0.0"),
        (dict(learning_rate=float("inf")), "learning_rate must be a finite number > 0"),
        (dict(max_steps=3, patience=5), "patience 5 is above max_steps 3"),
        (dict(max_steps=0, patience=0), "max_steps must be a positive integer, got 0"),
        (dict(steps=0), "steps must be a positive integer up to 1000, got 0"),
        (dict(steps=2.5), "steps must be an integer, got 2.5"),
        (dict(seed=-5), "seed must be between 0 and"),
        (dict(width=0), "width must be an integer >= 2 up to 8192, got 0"),
        (dict(height=-16), "height must be an integer >= 2 up to 8192, got -16"),
        (dict(width=17), "width must be a positive multiple of 2, got 17"),
        (dict(grad_step_min=float("nan")), "grad_step_min must be an integer, got nan"),
    ],
)
def test_tune_refuses_what_reneg_tune_refuses(host, models, reward, kw, expect):
    """The node's inputs pass through the options layer's checks (the ones `reneg tune` runs), with
    the node input's name in the message, before any sampling: values that reach the node through a
    link are not held to INPUT_TYPES' min and max by ComfyUI."""
    _, _, clip = models
    pos, neg = _conds(clip)
    ticks = []
    host.utils.PROGRESS_BAR_HOOK = lambda cur, total, preview: ticks.append(cur)
    with pytest.raises(RuntimeError) as e:
        run(node(host, "ReNegPerSampleTune").tune, **_tune_args(models, pos, neg, reward, **kw))
    assert str(e.value).startswith("Per-Sample ReNeg Tune: " + expect), str(e.value)
    assert ticks == []  # refused before the first sampling step


def test_tune_input_ranges_lie_inside_the_options_checks(host):
    """ComfyUI holds a widget's value to INPUT_TYPES' min and max: every value it lets through, at
    either end of each numeric input, must pass the shared checks (others at their defaults)."""
    tune_module = sys.modules[type(node(host, "ReNegPerSampleTune")).__module__]
    spec = tune_module.ReNegPerSampleTune.INPUT_TYPES()
    inputs = {**spec["required"], **spec["optional"]}
    numeric = {k: v[1] for k, v in inputs.items() if v[0] in ("INT", "FLOAT")}
    defaults = {k: o["default"] for k, o in numeric.items()}
    tune_module.check_inputs(**defaults, noise_mode=tune_module.NOISE_MODES[0])
    for name, o in numeric.items():
        for value in (o["min"], o["max"]):
            args = dict(defaults, **{name: value})
            if name in ("max_steps", "patience"):  # patience <= max_steps: take both to the same end
                args["max_steps"] = args["patience"] = value
            tune_module.check_inputs(**args, noise_mode=tune_module.NOISE_MODES[0])
    assert numeric["learning_rate"]["min"] > 0  # a learning rate of 0 is refused: not offered either


def test_load_embedding_refuses_malformed_base_negative(host, models):
    _, _, clip = models
    save_tiny_embedding(host)
    load = node(host, "ReNegLoadEmbedding")
    for bad, expect in [
        ([[]], r"base_negative entry 0: expected \[tensor, dict\], found an empty list"),
        ([[torch.zeros(77, 64), {}]], r"base_negative entry 0: expected a tensor \[batch, tokens, hidden\]"),
        ([["text", {}]], "base_negative entry 0: expected .tensor, dict., found .str"),
        ([[torch.zeros(1, 77, 64), "x"]], "base_negative entry 0: expected .tensor, dict., found .Tensor, str"),
        ([], "base_negative: expected a CONDITIONING"),
    ]:
        with pytest.raises(RuntimeError, match="Load ReNeg Embedding: " + expect):
            run(load.load, "tiny_neg.safetensors", clip, 1.0, base_negative=bad)


def test_reward_score_empty_batch_and_nan_images(host, reward):
    score = node(host, "ReNegRewardScore")
    with pytest.raises(RuntimeError, match=r"Reward Score: images: the batch is empty \(0 images of 16x16\)"):
        run(score.score, torch.rand(0, 16, 16, 3), "a red circle", reward, True)
    images = torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    images[0] = float("nan")  # e.g. a VAE decode that overflowed
    scores, report, ranked, best, best_index = run(score.score, images, "a red circle", reward, True)
    assert math.isnan(scores[0]) and all(math.isfinite(s) for s in scores[1:])
    assert best_index == (1 if scores[1] >= scores[2] else 2)  # NaN is never the best ...
    assert torch.isnan(ranked[-1]).all() and not torch.isnan(best).any()  # ... it ranks last
    assert "image 0: nan  (rank 3)" in report, report
    nan_only = torch.full((2, 16, 16, 3), float("nan"))
    scores, report, ranked, best, best_index = run(score.score, nan_only, "a red circle", reward, True)
    assert best_index == 0 and all(math.isnan(s) for s in scores)
    assert "no image has a finite score" in report and "best" not in report.replace("best_", ""), report


def test_tune_and_score_nodes_at_a_non_square_size(host, models, reward, tiny_reward, monkeypatch):
    """SDXL users tune and score non-square images every day: a 64x48 latent (wider than tall)
    runs through the tune node at that size, and Reward Score gives each non-square image what
    the core reward gives it (the nodes hand the images to the rewards' own preprocessing as
    they are)."""
    model, vae, clip = models
    pos, neg = _conds(clip)
    seen = set()
    apply_model = model.model.apply_model

    def spy(x, *a, **k):
        seen.add(tuple(x.shape[-2:]))
        return apply_model(x, *a, **k)

    monkeypatch.setattr(model.model, "apply_model", spy)
    latent = {"samples": torch.zeros(1, 4, 48, 64)}
    args = _tune_args(models, pos, neg, reward, max_steps=1, patience=1, steps=2, grad_step_max=1, latent=latent)
    tuned, r0, r1 = run(node(host, "ReNegPerSampleTune").tune, **args)
    assert seen == {(48, 64)}  # the latent's size, not width x height
    assert math.isfinite(r0) and r1 >= r0 and torch.isfinite(tuned[0][0]).all()

    images = torch.rand(2, 96, 128, 3, generator=torch.Generator().manual_seed(2))  # IMAGE: B, H, W, C
    scores, report, ranked, best, best_index = run(node(host, "ReNegRewardScore").score, images, "a cat", reward, True)
    with torch.no_grad():
        expect = tiny_reward(images.movedim(-1, 1) * 2 - 1, ["a cat"] * 2).float()
    torch.testing.assert_close(torch.tensor(scores), expect, rtol=1e-4, atol=1e-5)
    assert best.shape == (1, 96, 128, 3) and ranked.shape == images.shape
