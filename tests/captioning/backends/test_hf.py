"""The hf backend end to end with a tiny, randomly initialised LLaVA built here (no download)."""
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from holiclip.captioning.backends import CaptionRequest, CaptionResult
from holiclip.captioning.backends.hf import HFBackend
from holiclip.captioning.perspectives import PAPER_PERSPECTIVES
from holiclip.cli.caption import app

from tests.helpers.captioning import make_images, read_jsonl

WORDS = ("<pad> <s> </s> <unk> <image> USER ASSISTANT : . , a an the of in on with and is are cat dog red blue "
         "green sky tree house car person image describe detail only background foreground main object style "
         "your feelings about this do not say anything objects other one briefly sentence few words noun").split()
TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }} :{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def tiny_llava():
    """A 2-layer LLaVA (CLIP vision + Llama text) with a word-level tokenizer, all in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (AutoModelForImageTextToText, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast)

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(WORDS), pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=WORDS.index("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=TEMPLATE)
    return model, proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, proc = tiny_llava()
    folder = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model, proc, folder


def test_cli_hf_backend_end_to_end(tiny, tmp_path: Path):
    _, _, folder = tiny
    make_images(tmp_path / "imgs", 5, size=40)
    res = CliRunner().invoke(app, ["run", "--images", str(tmp_path / "imgs"), "--backend", "hf", "--model", str(folder),
                                   "--device", "cpu", "--batch-size", "4", "--perspectives", "detail,background",
                                   "--max-new-tokens", "6", "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "out" / "captions.jsonl")
    assert Counter((r["image"], r["perspective"]) for r in rows) == Counter(
        {(str(p), q): 1 for p in sorted((tmp_path / "imgs").iterdir()) for q in ("detail", "background")})
    for r in rows:
        assert r["model"] == str(folder) and r["prompt"] == PAPER_PERSPECTIVES[r["perspective"]].prompt
        assert r["finish_reason"] in ("stop", "length") and isinstance(r["text"], str)
        assert len(r["text"].split()) <= 6
    assert any(r["text"] for r in rows)
    # resumable like every backend
    res = CliRunner().invoke(app, ["run", "--images", str(tmp_path / "imgs"), "--backend", "hf", "--model", str(folder),
                                   "--device", "cpu", "--perspectives", "detail,background", "--out",
                                   str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0 and "0 rows written" in res.output


def test_batched_generation_matches_one_by_one(tiny, tmp_path: Path):
    model, proc, _ = tiny
    imgs = make_images(tmp_path / "imgs", 3, size=40)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    reqs = [CaptionRequest(str(p), p.read_bytes(), "image/png", name, PAPER_PERSPECTIVES[name].prompt, 5)
            for p in imgs for name in ("detail", "nouns")]  # prompts of different lengths: padding matters
    reqs.insert(2, CaptionRequest("broken", b"not an image", "image/png", "detail", "Describe.", 5))
    one = [HFBackend("tiny", hf_model=model, processor=proc, device="cpu")._generate_sync([r])[0] for r in reqs]
    batched = HFBackend("tiny", hf_model=model, processor=proc, device="cpu")._generate_sync(reqs)
    assert isinstance(batched[2], Exception) and "cannot decode image" in str(batched[2])  # fails alone
    for a, b in zip(one[:2] + one[3:], batched[:2] + batched[3:]):
        assert isinstance(b, CaptionResult) and (a.text, a.finish_reason) == (b.text, b.finish_reason)
    # a per-request token limit below the batch's: the text is cut to it and reported as truncated
    short = CaptionRequest(str(imgs[0]), imgs[0].read_bytes(), "image/png", "detail", "Describe.", 1)
    got = HFBackend("tiny", hf_model=model, processor=proc, device="cpu")._generate_sync([short, reqs[0]])
    assert got[1].text and got[1].finish_reason == "length"  # 5 tokens without an end token
    assert (got[0].text.split(), got[0].finish_reason) == (got[1].text.split()[:1], "length")
