"""The rewards' image preprocessing against the transforms the reward models were trained behind:
torchvision's ``Resize(size, BICUBIC, antialias=True)`` + ``CenterCrop(size)`` + ``Normalize`` (HPS,
the aesthetic predictor, ImageReward) and Hugging Face's ``CLIPImageProcessor`` (PickScore), at every
image shape, not only square ones."""

from __future__ import annotations

import pytest
import torch

from reneg.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, center_crop, clip_preprocess, resized_size

tv = pytest.importorskip("torchvision.transforms")
tvF = pytest.importorskip("torchvision.transforms.functional")

# (height, width): SDXL's buckets both ways, common photo shapes, odd and tiny ones
SHAPES = [
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
    (400, 300),
    (300, 400),
    (1024, 768),
    (768, 1024),
    (512, 512),
    (576, 1024),
    (1024, 576),
    (224, 224),
    (225, 224),
    (224, 225),
    (223, 301),
    (333, 257),
    (257, 333),
    (131, 97),
    (64, 64),
    (17, 29),
    (5, 40),
    (1, 1),
]


def torchvision_reference(x01: torch.Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    t = tv.Compose(
        [
            tv.Resize(size, interpolation=tv.InterpolationMode.BICUBIC, antialias=True),
            tv.CenterCrop(size),
            tv.Normalize(mean, std),
        ]
    )
    return t(x01)


def _image(h, w, seed=0, batch=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 7919 * h + w)
    return torch.rand(batch, 3, h, w, generator=g, dtype=dtype) * 2 - 1


@pytest.mark.parametrize("h,w", SHAPES)
def test_clip_preprocess_equals_torchvision_at_every_shape(h, w):
    x = _image(h, w)
    ours = clip_preprocess(x, 224)
    ref = torchvision_reference(((x + 1) / 2).clamp(0, 1), 224)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("h,w", [(400, 300), (1216, 832), (57, 31)])
def test_other_sizes_dtypes_and_batches_equal_torchvision_too(h, w):
    for size in (32, 384):
        x = _image(h, w, batch=2, dtype=torch.float64)
        ours = clip_preprocess(x, size)
        ref = torchvision_reference(((x + 1) / 2).clamp(0, 1), size)
        assert ours.dtype == torch.float64 and (ours - ref).abs().max().item() <= 1e-10


def test_the_resized_size_is_torchvisions():
    from torchvision.transforms.functional import _compute_resized_output_size

    for h in range(1, 700, 7):
        for w in (1, 2, 3, 223, 224, 225, 299, 300, 301, 640, 832, 1536):
            assert resized_size(h, w, 224) == tuple(_compute_resized_output_size((h, w), [224])), (h, w)


@pytest.mark.parametrize(
    "h,w", [(10, 10), (3, 300), (300, 3), (223, 225), (100, 101), (224, 224), (301, 225), (226, 511)]
)
def test_center_crop_equals_torchvisions_including_when_it_pads(h, w):
    x = torch.randn(2, 3, h, w)
    assert torch.equal(center_crop(x, 224), tvF.center_crop(x, [224, 224]))


def test_center_crop_floor_offset_equals_hugging_faces():
    """PickScore's reference (``CLIPImageProcessor``) takes the offset as ``int(excess / 2)``, not
    torchvision's rounding; with a one-pixel excess the two differ."""
    x = torch.arange(225.0).view(1, 1, 1, 225).expand(1, 1, 224, 225)
    assert center_crop(x, 224)[0, 0, 0, 0].item() == 0.0  # round(0.5) == 0, as torchvision
    x = torch.arange(227.0).view(1, 1, 1, 227).expand(1, 1, 224, 227)
    assert center_crop(x, 224)[0, 0, 0, 0].item() == 2.0  # round(1.5) == 2
    assert center_crop(x, 224, offset="floor")[0, 0, 0, 0].item() == 1.0


def test_preprocessing_is_differentiable_at_a_non_square_size():
    x = _image(400, 300).requires_grad_(True)
    clip_preprocess(x, 224).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("h,w", [(400, 300), (300, 400), (1216, 832), (1536, 640), (227, 224)])
def test_pickscore_preprocessing_equals_the_clip_image_processor(h, w):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(do_rescale=False)  # PickScore's: shortest edge 224, bicubic, crop 224
    x = _image(h, w)
    x01 = ((x + 1) / 2).clamp(0, 1)
    ref = proc(images=x01[0], return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(x, 224, crop_offset="floor")
    assert (ours - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------ each reward, end to end


def _hf_clip(folder):
    from test_rewards_prompts import _tiny_hf_clip

    return _tiny_hf_clip(str(folder))


def _score_from(reward, name, x, prompts):
    """The reward's score computed from an already preprocessed batch ``x``: the reward's own model
    calls after its preprocessing."""
    if name == "hps":
        img = reward.model.encode_image(x).float()
        img = img / img.norm(dim=-1, keepdim=True)
        return reward.scale * (img * reward.text_features(prompts)).sum(-1)
    if name == "pickscore":
        img = reward.model.get_image_features(pixel_values=x)
        img = getattr(img, "pooler_output", img).float()
        tok = reward.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        txt = reward.model.get_text_features(**tok)
        txt = getattr(txt, "pooler_output", txt).float()
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return reward.model.logit_scale.exp().float() * (img * txt).sum(-1)
    if name == "aesthetic":
        emb = reward.vision.get_image_features(pixel_values=x)
        emb = getattr(emb, "pooler_output", emb).float()
        return reward.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    if name == "imagereward":
        ids, mask = reward.tokens(prompts, x.device)
        return reward.model(ids, mask, x)
    raise AssertionError(name)


def _telling_shapes(size):
    """Non-square shapes, both ways round: resized (shorter side not ``size``) to a long side where
    truncating and rounding differ; and resized to a long side whose excess over ``size`` is 3 mod 4,
    where rounding the crop offset (to even) and truncating it differ."""
    rounding, offset = [], []
    for short in (size * 5 // 4, size * 3 // 2 + 1):
        for long in range(short * 5 // 4, short * 2):
            exact = size * long / short
            if not rounding and round(exact) != int(exact):
                rounding = [(long, short), (short, long)]
            if not offset and (int(exact) - size) % 4 == 3:
                offset = [(long, short), (short, long)]
    assert rounding and offset
    return rounding + offset


@pytest.mark.parametrize("name", ["hps", "pickscore", "aesthetic", "imagereward"])
def test_every_reward_scores_a_non_square_image_as_its_reference_preprocessing(name, tmp_path, tiny_hps_ckpt):
    from reneg.rewards import load_rewards

    if name == "hps":
        reward = load_rewards([f"hpsv2.1={tiny_hps_ckpt}"])
    elif name == "pickscore":
        reward = load_rewards([f"pickscore={_hf_clip(tmp_path / 'clip')}"])
    elif name == "aesthetic":
        from reneg.rewards.aesthetic import AestheticMLP

        torch.save(AestheticMLP(16).state_dict(), tmp_path / "mlp.pth")
        reward = load_rewards([f"aesthetic={tmp_path / 'mlp.pth'},clip={_hf_clip(tmp_path / 'clip')}"])
    else:
        from test_imagereward import make_tiny_imagereward

        reward = load_rewards([f"imagereward={make_tiny_imagereward(tmp_path / 'ir') / 'ImageReward.pt'}"])
    size = reward.size
    shapes = _telling_shapes(size)
    prompts = ["a red circle"]
    for h, w in shapes:
        x = _image(h, w, seed=3)
        x01 = ((x + 1) / 2).clamp(0, 1)
        if name == "pickscore":
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor(
                do_rescale=False, size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
            ref_x = proc(images=x01[0], return_tensors="pt")["pixel_values"]
        else:
            ref_x = torchvision_reference(x01, size)
        with torch.no_grad():
            got = reward(x, prompts)
            want = _score_from(reward, name, ref_x, prompts)
        assert torch.allclose(got.float(), want.float(), atol=1e-5, rtol=0), (name, h, w, got, want)
