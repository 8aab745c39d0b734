"""The negative predictor (reneg/predictor.py): shapes per family, zero-initialised = the global negative,
the file's round trip and refusals, centred features (``feature_mean``: its round trip, format-version-1 files
read as before, real prompts told apart), and ``reneg train --predictor`` (its files, exact resume)."""

from __future__ import annotations

import copy

import json
import struct

import pytest
import torch

from reneg.embedding import EmbeddingError, NegEmbedding, load_embedding
from reneg.families import FAMILIES
from reneg.predictor import (
    ARCHITECTURES,
    PredictorError,
    fit_feature_mean,
    from_embedding,
    is_predictor_file,
    load_predictor,
    predicted_cond,
    save_predictor,
)

FAMS = tuple(FAMILIES)  # every family the trainer supports: Wan (and its two-expert file), Flux, Chroma, ...


def _global(fam: str, seed: int = 0) -> NegEmbedding:
    f = FAMILIES[fam]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(1, f.tokens, f.hidden, generator=g)
    mask = None
    if f.masked:  # a T5 negative reads its first rows only
        mask = torch.zeros(1, f.tokens, dtype=torch.long)
        mask[:, :5] = 1
        rows = rows * mask[..., None]
    pooled = torch.randn(1, f.pooled, generator=g) if f.pooled else None
    return NegEmbedding(rows, fam, pooled, attention_mask=mask)


def _positive(fam: str, batch: int = 2, rows: int | None = None):
    f = FAMILIES[fam]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, rows or f.tokens, f.hidden, generator=g)
    pooled = torch.randn(batch, f.pooled, generator=g) if f.pooled else None
    mask = None
    if f.masked:
        mask = torch.zeros(batch, x.shape[1], dtype=torch.long)
        mask[0, :7], mask[1, :3] = 1, 1
    return x, pooled, mask


def _centred(model, seed: int = 3):
    """Give ``feature_mean`` (zero until fitted) values, as fitting on training prompts does."""
    g = torch.Generator().manual_seed(seed)
    model.set_feature_mean(torch.randn(model.feature_mean.shape, generator=g))
    return model


def _trained(model):
    """Give the read-out (zero at the start) values, as training does."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ("up", "mix", "up_pooled"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_per_family_and_zero_init_is_the_global_negative(fam, arch):
    emb = _global(fam)
    model = from_embedding(emb, arch, rank=3)
    x, pooled, mask = _positive(fam)
    neg, neg_pooled = model(x, pooled, mask)
    f = FAMILIES[fam]
    assert neg.shape == (2, f.tokens, f.hidden)
    # untrained: exactly the global negative (and its pooled vector) for every prompt, centred or not
    for _ in range(2):
        assert torch.equal(neg, emb.model_rows().expand(2, -1, -1))
        if f.pooled:
            assert neg_pooled.shape == (2, f.pooled) and torch.equal(neg_pooled, emb.pooled.expand(2, -1))
        else:
            assert neg_pooled is None
        neg, neg_pooled = _centred(model)(x, pooled, mask)
    assert float(model.feature_mean.abs().sum()) > 0
    _trained(model)
    neg, neg_pooled = model(x, pooled, mask)
    assert not torch.allclose(neg[0], neg[1])  # a per-prompt negative
    if f.masked:  # rows the negative's mask leaves out stay as the global negative has them (zero)
        assert torch.equal(neg[:, 5:], torch.zeros_like(neg[:, 5:]))
        # the prompt's padding rows are never read: changing them changes nothing
        x2 = x.clone()
        x2[0, 7:] += 100.0
        assert torch.allclose(model(x2, pooled, mask)[0], neg)
    # a host's longer conditioning (a 154-row CLIP prompt) gives the same negative shape
    x3, p3, m3 = _positive(fam, rows=2 * f.tokens)
    assert model(x3, p3, m3)[0].shape == (2, f.tokens, f.hidden)


def test_predicted_cond_carries_mask_and_pooled():
    for fam in ("sdxl", "pixart"):
        model = _trained(from_embedding(_global(fam), "lowrank", 2))
        from reneg.cond import Cond

        x, pooled, mask = _positive(fam)
        c = predicted_cond(model, Cond(x, pooled, {}, mask))
        assert c.crossattn.shape[0] == 2
        assert (c.pooled is not None) == (fam == "sdxl")
        assert (c.mask is not None) == (fam == "pixart")
        if c.mask is not None:
            assert c.mask.shape == (2, FAMILIES[fam].tokens) and int(c.mask[0].sum()) == 5


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_file_round_trip(tmp_path, fam, arch):
    model = _centred(_trained(from_embedding(_global(fam), arch, rank=2, seed=5)))
    path = tmp_path / "p.safetensors"
    save_predictor(path, model, trained_steps=7)
    assert is_predictor_file(path)
    back = load_predictor(path, expected_family=fam)
    x, pooled, mask = _positive(fam)
    a, b = model(x, pooled, mask), back(x, pooled, mask)
    assert torch.equal(a[0], b[0])
    assert (a[1] is None and b[1] is None) or torch.equal(a[1], b[1])
    assert back.metadata["architecture"] == arch and back.metadata["trained_steps"] == "7"
    assert back.metadata["family"] == fam and back.metadata["rank"] == "2"
    # the feature mean travels in the file (format version 2), and is what the output depends on
    assert back.metadata["format_version"] == "2"
    assert torch.equal(back.feature_mean, model.feature_mean) and float(back.feature_mean.abs().sum()) > 0
    back.set_feature_mean(torch.zeros_like(back.feature_mean))
    assert not torch.equal(back(x, pooled, mask)[0], a[0])
    # the global negative inside is an embedding of its own
    g = back.global_embedding()
    assert torch.equal(g.tensor, model.base.detach())
    with pytest.raises(FileExistsError):
        save_predictor(path, model)  # never over a file without overwrite


def test_inspect_says_what_a_predictor_is(tmp_path, capsys):
    from reneg.cli import main

    model = _trained(from_embedding(_global("sdxl"), "xattn", rank=3))
    path = tmp_path / "p.safetensors"
    save_predictor(path, model, trained_steps=7)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a negative predictor" in out and "sdxl" in out and "xattn, rank 3" in out and "trained_steps: 7" in out
    assert "reads   the prompt uncentred" in out
    save_predictor(path, _centred(model), overwrite=True)
    assert main(["inspect", str(path)]) == 0
    assert "centred on its training prompts' mean feature (norm " in capsys.readouterr().out
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == model.num_parameters() and info["global"]["pooled_shape"] == [1, 1280]
    assert info["readout_norm"] > 0


def _rewrite(path, out, meta=None, drop=None, tensors=None):
    from safetensors.torch import load_file, save_file

    from reneg.fileio import read_safetensors_header

    m = dict(read_safetensors_header(path)["__metadata__"])
    m.update(meta or {})
    t = load_file(str(path))
    if drop:
        t.pop(drop)
    t.update(tensors or {})
    save_file(t, str(out), metadata=m)
    return out


def _old_forward(model, x, pooled, mask):
    """What a format-version-1 predictor computed (uncentred features), written out again here."""
    import math

    import torch.nn.functional as F

    def ln(t):
        return F.layer_norm(t, t.shape[-1:])

    m = mask.float()[..., None] if mask is not None else torch.ones(*x.shape[:2], 1)
    parts = [ln((x * m).sum(1) / m.sum(1).clamp_min(1.0))] + ([ln(pooled)] if pooled is not None else [])
    h = torch.tanh((torch.cat(parts, -1) / math.sqrt(len(parts))) @ model.w_in.T)
    if model.spec.architecture == "lowrank":
        delta = torch.einsum("br,rld->bld", h, model.up)
    else:
        keys = ln(x)
        scores = keys @ model.queries.T / math.sqrt(model.spec.hidden)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool()[..., None], float("-inf"))
        delta = model.mix @ (scores.softmax(1).transpose(1, 2) @ keys)
    neg = model.base + delta * model.neg_mask[..., None]
    return neg, (model.base_pooled + h @ model.up_pooled if pooled is not None else None)


@pytest.mark.parametrize("fam", ("sd1", "sdxl", "pixart"))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_format_version_1_files_load_and_predict_as_before(tmp_path, fam, arch):
    """A file written before the feature mean (format version 1: no predictor.feature_mean) loads with a zero
    one and gives exactly what version 1 computed; a version-1 file with a feature mean, or a version-2 file
    without one, is refused naming the file, what was expected and what was found."""
    model = _trained(from_embedding(_global(fam), arch, rank=2, seed=5))
    # an uncentred predictor (a zero mean, the default) is written as version 1 itself
    plain = tmp_path / "plain.safetensors"
    save_predictor(plain, model)
    assert load_predictor(plain).metadata["format_version"] == "1"
    new = tmp_path / "new.safetensors"
    save_predictor(new, _centred(copy.deepcopy(model)))
    assert load_predictor(new).metadata["format_version"] == "2"
    old = _rewrite(new, tmp_path / "old.safetensors", {"format_version": "1"}, drop="predictor.feature_mean")
    back = load_predictor(old, expected_family=fam)
    assert back.metadata["format_version"] == "1" and torch.equal(back.feature_mean, torch.zeros(model.spec.features))
    x, pooled, mask = _positive(fam)
    a, b = back(x, pooled, mask), _old_forward(model, x, pooled, mask)
    assert torch.equal(a[0], b[0])
    assert (a[1] is None and b[1] is None) or torch.equal(a[1], b[1])
    with pytest.raises(
        PredictorError, match=r"old1\.safetensors: .*format version 1.*unexpected predictor\.feature_mean"
    ):
        load_predictor(_rewrite(new, tmp_path / "old1.safetensors", {"format_version": "1"}))
    with pytest.raises(PredictorError, match=r"new2\.safetensors: .*format version 2.*missing predictor\.feature_mean"):
        load_predictor(_rewrite(new, tmp_path / "new2.safetensors", drop="predictor.feature_mean"))
    with pytest.raises(
        PredictorError, match=r"v3\.safetensors: predictor format version '3'; this ReNeg reads versions 1, 2"
    ):
        load_predictor(_rewrite(new, tmp_path / "v3.safetensors", {"format_version": "3"}))
    bad = {"predictor.feature_mean": torch.zeros(model.spec.features + 1)}
    with pytest.raises(PredictorError, match=r"fm\.safetensors: predictor\.feature_mean must have shape \["):
        load_predictor(_rewrite(new, tmp_path / "fm.safetensors", tensors=bad))


def test_centred_features_tell_real_prompts_apart(tiny_backend):
    """On the tiny model's real conditionings, the mean fitted on training prompts takes away what prompts
    share: two different prompts' features are far less alike centred than uncentred, and the feature mean
    is the mean of the training prompts' raw features."""
    train = [
        f"{n} {c} {s} on a {g} background"
        for n in ("a", "three")
        for c in ("red", "blue", "green", "yellow")
        for s in ("circle", "square", "triangle")
        for g in ("white", "striped")
    ]
    model = from_embedding(NegEmbedding(tiny_backend.null_embedding()[0].float(), "tiny"), "lowrank", 2)
    two = tiny_backend.encode_prompts(["a red circle", "two purple squares on a checkered background"])

    def cos():
        f = model.features(two.crossattn, two.pooled, two.mask)
        return float(torch.nn.functional.cosine_similarity(f[0], f[1], dim=0))

    uncentred = cos()
    assert fit_feature_mean(model, tiny_backend.encode_prompts, train, batch=5) == len(train)
    centred = cos()
    assert uncentred > 0.85 and centred < uncentred - 0.3, (uncentred, centred)
    c = tiny_backend.encode_prompts(train)
    raw = model.raw_features(c.crossattn, c.pooled, c.mask)
    assert torch.allclose(model.feature_mean, raw.mean(0), atol=1e-5)
    # at most `limit` prompts, evenly spaced: the same ones on every call
    assert fit_feature_mean(model, tiny_backend.encode_prompts, train, limit=4) == 4
    assert torch.allclose(model.feature_mean, raw[[0, 12, 24, 36]].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match=r"feature mean is a finite \[64\], found \[3\]"):
        model.set_feature_mean(torch.zeros(3))


def test_refusals_name_file_expected_and_found(tmp_path):
    model = from_embedding(_global("sd1"), "lowrank", rank=2)
    path = tmp_path / "p.safetensors"
    save_predictor(path, model)
    with pytest.raises(PredictorError, match=r"p\.safetensors: this is a sd1 predictor.*model in use is sdxl"):
        load_predictor(path, expected_family="sdxl")
    cases = [
        (
            {"architecture": "evil"},
            None,
            None,
            r"unknown predictor architecture 'evil'; expected one of lowrank, xattn",
        ),
        ({"family": "sd9"}, None, None, r"unknown family 'sd9'"),
        ({"hidden_size": "1024"}, None, None, r"family sd1 needs hidden size 768, found 1024"),
        ({"rank": "3"}, None, None, r"predictor\.(w_in|up) must have shape \[3, .*found \[2, "),
        ({"rank": "99999"}, None, None, r"'rank' must be an integer from 1 to 256"),
        ({"format": "reneg"}, None, None, r"not a ReNeg predictor"),
        (None, "predictor.up", None, r"missing predictor\.up"),
        (None, None, {"predictor.payload": torch.zeros(1)}, r"unexpected predictor\.payload"),
        (None, None, {"predictor.up": torch.full((2, 77, 768), float("nan"))}, r"predictor\.up has NaN/inf"),
        (None, None, {"global.neg_embedding": torch.zeros(1, 77, 1024)}, r"global\.neg_embedding must have shape"),
    ]
    for i, (meta, drop, tensors, msg) in enumerate(cases):
        bad = _rewrite(path, tmp_path / f"bad{i}.safetensors", meta, drop, tensors)
        with pytest.raises(PredictorError, match=f"bad{i}\\.safetensors: .*{msg}"):
            load_predictor(bad)
    # not a safetensors file at all; a truncated one
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(PredictorError, match="junk.safetensors"):
        load_predictor(junk)
    # an embedding loader handed a predictor file says what it is rather than misreading it
    with pytest.raises(EmbeddingError, match=r"p\.safetensors: .*predictor"):
        load_embedding(path)


def _train_args(tmp_path, pipe, hps, out, steps, extra=()):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")))
    return [
        "train",
        "--model",
        pipe,
        "--reward",
        f"hpsv2={hps}",
        "--prompts",
        str(p),
        "--heldout-count",
        "2",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--micro-batch",
        "1",
        "--sampling-steps",
        "4",
        "--grad-range",
        "0",
        "1",
        "--resolution",
        "16",
        "--lr",
        "0.05",
        "--lr-schedule",  # so that a run of 2 steps is the first 2 steps of a run of 4
        "constant",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "0",
        "--no-progress",
        "--predictor",
        "xattn",
        "--predictor-rank",
        "2",
        *extra,
    ]


def test_train_predictor_files_and_exact_resume(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    from reneg.cli import main

    full, part = tmp_path / "full", tmp_path / "part"
    c = ["--predictor-features", "centred"]
    assert main(_train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, full, 4, c)) == 0, capsys.readouterr().err
    summary = json.loads((full / "summary.json").read_text())
    assert summary["kind"] == "predictor" and set(summary["heldout"]) == {"null", "global", "predictor"}
    assert len(summary["heldout_per_prompt"]) == 2
    model = load_predictor(full / "predictor.safetensors", expected_family="tiny")
    assert model.metadata["trained_steps"] == "4" and model.metadata["architecture"] == "xattn"
    assert float(model.mix.abs().sum()) > 0  # the correction moved away from zero
    glob = load_embedding(full / "embedding.safetensors")
    assert torch.equal(glob.tensor, model.base)
    # centred: the feature mean fitted on the 4 training prompts, stored in the file
    assert model.metadata["predictor_features"] == "centred" and model.metadata["feature_mean_prompts"] == "4"
    assert float(model.feature_mean.abs().sum()) > 0
    # the same run stopped after its step-2 checkpoint, then resumed: bit for bit the same predictor
    assert main(_train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, part, 2, c)) == 0
    assert main(_train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, part, 4, [*c, "--resume"])) == 0
    resumed = load_predictor(part / "predictor.safetensors")
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    # a different --predictor-rank can not resume this run
    rc = main(
        _train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, part, 6, [*c, "--resume", "--predictor-rank", "3"])
    )
    assert rc == 2 and "--predictor-rank" in capsys.readouterr().err
    rc = main(
        _train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, part, 6, ["--resume", "--predictor-features", "mean"])
    )
    assert rc == 2 and "--predictor-features" in capsys.readouterr().err


def test_train_predictor_uncentred_and_old_checkpoints(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    """``--predictor-features mean`` (the default) leaves the feature mean zero (the features of format
    version 1); a checkpoint written before the feature mean (none in it, none in its config) resumes only
    uncentred."""
    from reneg.cli import main

    out = tmp_path / "mean"
    extra = ["--predictor-features", "mean"]
    assert main(_train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out, 2, extra)) == 0
    model = load_predictor(out / "predictor.safetensors")
    assert model.metadata["predictor_features"] == "mean" and model.metadata["feature_mean_prompts"] == "0"
    assert torch.equal(model.feature_mean, torch.zeros(64)) and float(model.mix.abs().sum()) > 0
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["predictor"]["feature_mean"]
    cfg = json.loads(state["config"])
    del cfg["predictor_features"]
    state["config"] = json.dumps(cfg, sort_keys=True)
    torch.save(state, ckpt)
    rc = main(
        _train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out, 4, ["--resume", "--predictor-features", "centred"])
    )
    assert rc != 0 and "resume it with --predictor-features mean" in capsys.readouterr().err
    assert main(_train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out, 4, ["--resume"])) == 0  # the default
    resumed = load_predictor(out / "predictor.safetensors")
    assert resumed.metadata["trained_steps"] == "4" and torch.equal(resumed.feature_mean, torch.zeros(64))


def test_eval_and_tune_take_a_predictor(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, tiny_backend):
    """``reneg eval --negative predictor:FILE``: a zero-initialised predictor makes exactly the images of its
    global negative; a trained one makes others; ``tuned:PREDICTOR`` tunes each image from its prompt's own
    negative. ``reneg tune --embedding PREDICTOR`` starts from the prompt's predicted negative."""
    from reneg.cli import main
    from reneg.embedding import save_embedding
    from reneg.evaluation import run as ev
    from reneg.evaluation import scoring
    from reneg.evaluation.config import EvalConfig

    null, _ = tiny_backend.null_embedding()
    glob = NegEmbedding(
        (null + 0.3 * torch.randn(null.shape, generator=torch.Generator().manual_seed(4))).float(), "tiny"
    )
    gpath = str(tmp_path / "glob.safetensors")
    save_embedding(gpath, glob)
    zero = str(tmp_path / "zero.safetensors")
    save_predictor(zero, from_embedding(load_embedding(gpath), "lowrank", 2))
    moved = str(tmp_path / "moved.safetensors")
    from reneg.rewards import reward_files

    trained_on = reward_files([f"hpsv2={tiny_hps_ckpt}"])  # as reneg train --predictor records it
    save_predictor(moved, _trained(from_embedding(load_embedding(gpath), "xattn", 2)), reward_files=trained_on)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = EvalConfig(
        model=tiny_pipeline_dir,
        rewards=[f"hpsv2={tiny_hps_ckpt}"],
        prompts=str(prompts),
        negatives=[gpath, f"predictor:{zero}", moved, f"tuned:{moved}"],
        out=str(tmp_path / "ev"),
        sampling_steps=3,
        guidance=5.0,
        resolution=16,
        batch=2,
        seed=7,
        progress=False,
        device="cpu",
        tune_steps=1,
        tune_patience=1,
        grad_range=(0, 1),
    )
    summary = ev.run_eval(cfg, log=lambda m: None)
    role = summary["rewards"][0]  # the report says the predictor was trained on the eval's reward
    assert role["role"] == "trained on" and "predictor-moved" in role["trained_by"]
    assert role["embeddings"]["predictor-zero"] != "trained on"  # saved without saying its rewards
    rows = scoring.read_scores_csv(str(tmp_path / "ev" / "scores.csv"))
    by = {(r["prompt_index"], r["negative"]): r["score"] for r in rows}
    assert {n for _, n in by} == {"glob", "predictor-zero", "predictor-moved", "tuned-moved"}
    for i in range(2):
        assert by[(i, "predictor-zero")] == pytest.approx(by[(i, "glob")], abs=1e-6)
    assert any(abs(by[(i, "predictor-moved")] - by[(i, "glob")]) > 1e-6 for i in range(2))
    # tuned:PREDICTOR: each search starts at the predictor's image of the same prompt and seed
    logs = json.loads((tmp_path / "ev" / "tuning_tuned-moved.json").read_text())
    starts = {v["prompt_index"]: v["start_reward"] for v in logs.values()}
    for i in range(2):  # the saved image is 8-bit: its score is close to, not exactly, the in-memory one
        assert starts[i] == pytest.approx(by[(i, "predictor-moved")], abs=2e-2)
    # a predictor of another family is refused before the first image, naming the negative and file
    other = str(tmp_path / "sd1.safetensors")
    save_predictor(other, from_embedding(_global("sd1"), "lowrank", 1))
    for spec in (f"predictor:{other}", f"tuned:{other}"):
        with pytest.raises(ValueError, match=r"--negative \S+ \(.*sd1\.safetensors\): .*this is a sd1 predictor"):
            ev.run_eval(
                EvalConfig(**{**cfg.__dict__, "negatives": [spec], "out": str(tmp_path / "ev2")}), log=lambda m: None
            )

    def tune(start, name):
        out = tmp_path / f"{name}.safetensors"
        rc = main(
            ["tune", "--model", tiny_pipeline_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--prompt", "a red circle",
             "--embedding", start, "--max-steps", "1", "--patience", "1", "--sampling-steps", "3", "--grad-range",
             "0", "1", "--resolution", "16", "--out", str(out), "--device", "cpu"]
        )  # fmt: skip
        assert rc == 0
        return load_embedding(out), json.loads((tmp_path / f"{name}.json").read_text())

    # the zero predictor starts exactly where its global negative does; the trained one elsewhere
    _, from_glob = tune(gpath, "t-glob")
    _, from_zero = tune(zero, "t-zero")
    emb, from_moved = tune(moved, "t-moved")
    assert from_zero["start_reward"] == from_glob["start_reward"]
    assert from_moved["start_reward"] != from_glob["start_reward"]
    assert emb.metadata["start_embedding"] == "moved.safetensors"
    assert emb.metadata["start_kind"] == "predictor"


@pytest.mark.slow
def test_two_processes_take_the_same_predictor_step_as_one(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    """The multi-process test of tests/test_multiprocess.py with --predictor xattn: two processes of a batch of
    2 each take, to float tolerance, the step one process takes on the batch of 4 (every tensor of the
    predictor, its global part included), and not the step of a batch of 2."""
    import test_multiprocess as M

    extra = ["--predictor", "xattn", "--predictor-rank", "2", "--lr", "0.5"]
    dirs = M.run_two_and_one(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, extra)
    two, one4, one2 = (
        load_predictor(dirs[k] / "out" / "predictor.safetensors").state_dict() for k in ("two", "one4", "one2")
    )
    assert set(two) == set(one4)
    moved = 0.0
    for name in two:
        scale = max(1.0, float(one4[name].abs().max()))
        diff = float((two[name] - one4[name]).abs().max())
        assert diff < 1e-5 * scale, f"{name}: 2 processes vs 1, max diff {diff:.3g}"
        moved = max(moved, float((two[name] - one2[name]).abs().max()))
    assert moved > 1e-4  # a batch of 2 takes another step: the comparison can tell steps apart


@pytest.mark.parametrize("fam", ("sdxl", "pixart"))
def test_convert_gives_a_predictors_global_negative(tmp_path, fam, capsys):
    """``reneg convert PREDICTOR DST`` writes its global negative as an embedding (bit for bit, SDXL's pooled
    vector and a T5 family's mask included), keeps how it was trained and says the per-prompt part is not in
    it; loading it as an embedding still refuses by name."""
    from reneg.cli import main

    model = _trained(from_embedding(_global(fam), "xattn", rank=2))
    src, dst = tmp_path / "p.safetensors", tmp_path / "g.safetensors"
    save_predictor(src, model, rewards=["hpsv2=x.pt"], guidance="cfg")
    assert main(["convert", str(src), str(dst)]) == 0
    assert "a negative predictor: this is its global negative" in capsys.readouterr().out
    emb, glob = load_embedding(dst), model.global_embedding()
    assert emb.family == fam and torch.equal(emb.tensor, glob.tensor)
    assert (emb.pooled is None and glob.pooled is None) or torch.equal(emb.pooled, glob.pooled)
    if FAMILIES[fam].masked:
        assert torch.equal(emb.mask(), glob.attention_mask)
    meta = emb.metadata
    assert meta["kind"] == "global" and meta["source_kind"] == "predictor global part" and meta["guidance"] == "cfg"
    assert "architecture" not in meta and json.loads(meta["rewards"]) == ["hpsv2=x.pt"]
    assert main(["convert", str(src), str(dst)]) != 0  # never over a file without --overwrite
    with pytest.raises(EmbeddingError, match=r"p\.safetensors: a ReNeg negative predictor"):
        load_embedding(src)
