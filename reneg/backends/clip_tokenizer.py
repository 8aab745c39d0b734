"""The CLIP tokenizer, written offline as a transformers ``CLIPTokenizer`` folder.

A single-file checkpoint carries no tokenizer, and nothing is downloaded: the vocabulary and merges are
built from the BPE file open_clip ships, which gives the same ids as OpenAI's CLIP tokenizer. The
single-file loader (:mod:`reneg.backends.single_file`), the demo world's training script and the tiny
test models use it.
"""

from __future__ import annotations

import gzip
import json
import os


def write_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>") -> None:
    """A transformers CLIPTokenizer folder built offline from open_clip's BPE file
    (same ids as open_clip's tokenizer): real CLIP ids, padded with ``<|endoftext|>`` as SD1.x does
    (SDXL's second tokenizer pads with ``!``)."""
    import open_clip

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    from open_clip.tokenizer import bytes_to_unicode

    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=1)
