"""``--offload-text-encoder``: every prompt a run needs is encoded first, then the text encoder(s) leave the
compute device. On this CPU-only test machine the compute device is the CPU too, so what is shown here is
that the run after the offload point never calls the text encoder, that its result is bit-identical to
the run without the flag, that the encoders are moved (``.to("cpu")`` called, weights on the CPU), and that
a prompt encoded late is still encoded exactly (on the encoder's own device, the result on the backend's).
The device memory this saves is arithmetic from parameter counts (docs/performance.md), not measured here."""

from __future__ import annotations

import json

import pytest
import torch

from reneg.backends.loading import load_diffusers
from reneg.cli import main
from reneg.embedding import load_embedding
from reneg.tiny import build_tiny_chroma


@pytest.fixture(scope="module")
def chroma_dir(tmp_path_factory):
    return build_tiny_chroma(str(tmp_path_factory.mktemp("tiny") / "chroma"), seed=0)


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\na blue square\na green house\na black cat\na white dog\n")
    return str(p)


class Watch:
    """The backend a command loads, with its text encoders' forward calls counted: in all, inside the
    training steps (``micro_batch``), and at the moment of the offload."""

    def __init__(self, monkeypatch):
        import reneg.backends.loading as loading
        from reneg.trainer import train as T

        self.backend, self.calls, self.in_steps, self.at_offload, self.moves = None, 0, 0, None, []
        self.stepping = False
        real_load, real_micro = loading.load_diffusers, T.micro_batch

        def load(*a, **k):
            b = real_load(*a, **k)
            self.backend = b
            for name, m in b.text_encoders():
                m.register_forward_pre_hook(self._count)
                real_to = m.to

                def to(*args, _real=real_to, _name=name, **kw):
                    self.moves.append((_name, str(args[0] if args else kw.get("device"))))
                    return _real(*args, **kw)

                m.to = to
            real_offload = b.offload_text_encoder

            def offload(*args, **kw):
                self.at_offload = self.calls
                return real_offload(*args, **kw)

            b.offload_text_encoder = offload
            return b

        def micro(*a, **k):
            self.stepping = True
            try:
                return real_micro(*a, **k)
            finally:
                self.stepping = False

        monkeypatch.setattr(loading, "load_diffusers", load)
        monkeypatch.setattr(T, "micro_batch", micro)

    def _count(self, module, args):
        self.calls += 1
        self.in_steps += self.stepping


def test_training_with_the_flag_is_bit_identical_and_never_calls_the_text_encoder(
    tmp_path, chroma_dir, tiny_hps_ckpt, capsys, monkeypatch
):
    prompts = _prompts(tmp_path)
    common = ["train", "--model", chroma_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "4"]
    common += ["--grad-range", "0", "1", "--resolution", "32", "--guidance", "5", "--prompts", prompts]
    common += ["--heldout-count", "2", "--steps", "2", "--batch-size", "2", "--micro-batch", "1", "--lr", "0.05"]
    common += ["--eval-every", "1", "--sample-every", "1", "--no-progress", "--handcrafted", "blurry"]
    runs = {}
    for flag in ([], ["--offload-text-encoder"]):
        w = Watch(monkeypatch)
        out = tmp_path / f"run{len(flag)}"
        rc = main([*common, "--out", str(out), *flag])
        printed = capsys.readouterr()
        monkeypatch.undo()  # the next run's watch wraps the real loader, not this one
        assert rc == 0, printed.err
        runs[bool(flag)] = (w, out, printed.out)
    (plain, plain_out, plain_log), (off, off_out, off_log) = runs[False], runs[True]
    # without the flag the training steps encode their prompts (the counting sees them) ...
    assert plain.in_steps > 0 and plain.at_offload is None and "--offload-text-encoder" not in plain_log
    # ... with it, every encoder call came before the offload point, none in the steps or after
    assert off.at_offload == off.calls > 0 and off.in_steps == 0
    assert getattr(off.backend, "late_encoder_calls", 0) == 0 and "warning" not in off_log
    assert off.moves == [("text_encoder", "cpu")] and off.backend.text_offloaded
    assert all(p.device.type == "cpu" for p in off.backend.text_encoder.parameters())
    n = sum(p.numel() for p in off.backend.text_encoder.parameters())
    line = next(x for x in off_log.splitlines() if "--offload-text-encoder:" in x)
    assert "3 training and 2 held-out prompts" in line and "text_encoder (T5EncoderModel" in line, line
    assert f"{n / 1e6:.3g} M parameters" in line, line
    # the same embedding, bit for bit, and the same held-out checks
    a = load_embedding(plain_out / "embedding.safetensors", expected_family="chroma")
    b = load_embedding(off_out / "embedding.safetensors", expected_family="chroma")
    assert torch.equal(a.tensor, b.tensor) and torch.equal(a.attention_mask, b.attention_mask)
    sa, sb = (json.loads((o / "summary.json").read_text()) for o in (plain_out, off_out))
    assert sa["heldout_history"] == sb["heldout_history"] and sb["config"]["offload_text_encoder"] is True
    assert (plain_out / "log.csv").read_text().count("\n") == (off_out / "log.csv").read_text().count("\n")


def test_tune_with_the_flag_gives_the_same_file(tmp_path, chroma_dir, tiny_hps_ckpt, capsys, monkeypatch):
    common = ["tune", "--model", chroma_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--sampling-steps", "4"]
    common += ["--grad-range", "0", "1", "--resolution", "32", "--guidance", "5", "--prompt", "a red circle"]
    common += ["--seed", "1", "--max-steps", "2", "--patience", "2", "--lr", "0.05"]
    got = []
    for flag in ([], ["--offload-text-encoder"]):
        w = Watch(monkeypatch)
        out = tmp_path / f"tuned{len(flag)}.safetensors"
        rc = main([*common, "--out", str(out), *flag])
        printed = capsys.readouterr()
        monkeypatch.undo()
        assert rc == 0, printed.err
        got.append(load_embedding(out).tensor)
    assert torch.equal(got[0], got[1])
    assert w.at_offload == w.calls == 2 and getattr(w.backend, "late_encoder_calls", 0) == 0  # the prompt and ""
    assert "reneg tune: --offload-text-encoder: the prompt encoded; moved text_encoder" in printed.out


def _late_prompt(backend):
    """Encode a prompt, offload, encode it again: the same rows (and mask), on the backend's device."""
    p = "a prompt that turns up after the offload"
    before = backend.encode_prompts([p])
    backend._cache.clear()
    warned = []
    moved = backend.offload_text_encoder("cpu", warn=warned.append)
    assert moved == {n: sum(x.numel() for x in m.parameters()) for n, m in backend.text_encoders()} and moved
    assert all(x.device.type == "cpu" for _, m in backend.text_encoders() for x in m.parameters())
    after = backend.encode_prompts([p])
    assert torch.equal(after.crossattn, before.crossattn) and after.crossattn.device == backend.device
    for f in ("mask", "pooled"):
        x, y = getattr(before, f), getattr(after, f)
        assert (x is None and y is None) or torch.equal(x, y), f
    backend.encode_prompts(["and one more"])
    assert len(warned) == 1 and "after the text encoder was offloaded" in warned[0]
    assert backend.late_encoder_calls >= 2
    return before


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from reneg.tiny import build_tiny_wan

    return build_tiny_wan(str(tmp_path_factory.mktemp("wan") / "wan21"))


# every family's own encoding path: Chroma and PixArt (T5 with a mask), Flux (CLIP-L pooled + T5), Wan
# (UMT5), Qwen-Image (Qwen2.5-VL's inner model), SD1.x (CLIP); SDXL's two CLIPs below
FAMILY_DIRS = ["chroma_dir", "tiny_pixart_dir", "tiny_flux_dir", "wan_dir", "tiny_qwen_image_dir", "tiny_pipeline_dir"]


@pytest.mark.parametrize("folder", FAMILY_DIRS)
def test_a_prompt_encoded_after_offload_equals_its_encoding_before(folder, request):
    _late_prompt(load_diffusers(request.getfixturevalue(folder)))


def test_both_sdxl_encoders_move_and_to_moves_them_back(tiny_sdxl_dir):
    b = load_diffusers(tiny_sdxl_dir)
    assert [n for n, _ in b.text_encoders()] == ["text_encoder", "text_encoder_2"]
    _late_prompt(b)  # CLIP-L and bigG, the pooled vector too
    b.to("cpu")
    assert not b.text_offloaded
    n = b.late_encoder_calls
    b.encode_prompts(["back on the device"])
    assert b.late_encoder_calls == n  # no longer counted as late


@pytest.mark.parametrize("folder", FAMILY_DIRS + ["tiny_sdxl_dir"])
def test_the_prompt_cache_stays_with_the_offloaded_encoders_and_batches_go_to_the_backends_device(folder, request):
    """The prompt cache goes with the offloaded encoders (the CPU): a prompt cached before the offload is kept
    there, unchanged, and one encoded after it too; with the backend's device set apart from the encoders'
    (``meta``: shapes only, on a CPU-only machine), each batch's rows come to the backend's device. (A late
    prompt's encoding on the CPU is compared with its encoding before the offload above.)"""
    b = load_diffusers(request.getfixturevalue(folder))
    b.encode_prompts(["a red circle"])  # to the cache only: the meta device below has no data to compare
    before = b.encode_prompts(["a blue square"])
    b.offload_text_encoder("cpu", warn=lambda m: None)
    entry = b._cache["a blue square"]
    rows = entry[0] if isinstance(entry, tuple) else entry
    assert rows.device.type == "cpu" and torch.equal(rows, before.crossattn[0]), folder  # moved, not changed
    b.encode_prompts(["a late prompt"])
    kept = [t for v in b._cache.values() for t in (v if isinstance(v, tuple) else (v,)) if t is not None]
    assert len(b._cache) == 3 and all(t.device.type == "cpu" for t in kept), folder
    b.device = torch.device("meta")
    c = b.encode_prompts(["a blue square", "a red circle"])
    for f in ("crossattn", "mask", "pooled"):
        t = getattr(c, f)
        assert t is None or t.device.type == "meta", (folder, f)


def test_tokens_and_too_many_prompts_are_refused_before_a_model_loads(tmp_path, chroma_dir, tiny_hps_ckpt):
    from reneg.trainer.config import OFFLOAD_PROMPTS_MAX, ConfigError, TrainConfig, validate_train

    base = dict(model=chroma_dir, rewards=[f"hpsv2={tiny_hps_ckpt}"], heldout_count=2, offload_text_encoder=True)
    validate_train(TrainConfig(prompts=_prompts(tmp_path), out=str(tmp_path / "ok"), **base))
    cfg = TrainConfig(prompts=_prompts(tmp_path), out=str(tmp_path / "a"), tokens=4, **base)
    with pytest.raises(ConfigError, match="--offload-text-encoder does not go with --tokens"):
        validate_train(cfg)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"prompt {i}\n" for i in range(OFFLOAD_PROMPTS_MAX)))
    with pytest.raises(ConfigError, match="more than the 20000 the prompt cache keeps"):
        validate_train(TrainConfig(prompts=str(many), out=str(tmp_path / "b"), **base))


def test_the_memory_arithmetic_in_the_docs():
    """docs/performance.md's table is benchmarks/cost_model.py's arithmetic (bf16, GB = 1e9 bytes)."""
    from benchmarks.cost_model import memory_table

    got = {r["family"]: (round(r["without_gb"], 1), round(r["with_gb"], 1)) for r in memory_table()}
    assert got == {"chroma": (27.5, 18.0), "qwen-image": (57.6, 41.1), "flux": (33.7, 24.0)}
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    for without, with_ in got.values():
        assert f"| {without} GB | {with_} GB |" in doc


@pytest.mark.parametrize("folder", FAMILY_DIRS)
def test_a_full_prompt_cache_keeps_the_batch_and_encodes_the_same(folder, request, monkeypatch):
    """Past the cache's limit (2 here, 20000 in use) a batch with a prompt cached earlier and a new one still
    encodes, each prompt as it was encoded alone (the PixArt backend once kept only the new prompts and failed)."""
    import reneg.backends.diffusers_backend as db

    b = load_diffusers(request.getfixturevalue(folder))
    alone = {p: b.encode_prompts([p]).crossattn[0] for p in ("a red circle", "a blue square", "a green house")}
    monkeypatch.setattr(db, "PROMPT_CACHE_MAX", 2)
    c = b.encode_prompts(["a red circle", "a cat in the city"])
    assert len(b._cache) <= 2 and torch.equal(c.crossattn[0][: len(alone["a red circle"])], alone["a red circle"])
