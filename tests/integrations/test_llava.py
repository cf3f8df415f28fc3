"""The holistic image encoder as the vision tower of a tiny, randomly initialised LLaVA
(transformers' LlavaForConditionalGeneration built from a config here, nothing downloaded), on
images and captions of the tiny emoji build."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import holiclip
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.evaluation.features import read_image
from holiclip.integrations.llava import HolisticVisionTower, attach_vision_tower

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = B.preset("tiny")
BRANCHES = ("web", "main", "background")
# byte-level tokens: 0 padding, 1 begin, 2 end, 3 + byte, then the image token
PAD, BOS, EOS, IMAGE = 0, 1, 2, 259
PROMPT = "USER: <image>\nWhat is the main object? ASSISTANT: "


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    """Four test images of the tiny emoji build and their ``main`` captions."""
    root = tmp_path_factory.mktemp("emoji") / "tiny"
    B.build(root, TINY, sources=S.require_sources(styles=TINY.heldout_styles))
    rows = B.read_rows(root, "test")[:4]
    return [read_image(root / r["image"]) for r in rows], [r["captions"]["main"] for r in rows]


def _model(encoder: str) -> holiclip.HolisticCLIP:
    torch.manual_seed(0)
    return holiclip.create_model("holi-small", encoder, BRANCHES).eval()  # 4 blocks; Psi_MLP forks at block 2


def _pixels(model, images) -> torch.Tensor:
    transform = holiclip.get_transforms(model)
    return torch.stack([transform(im) for im in images])


def _llava(tower: HolisticVisionTower, strategy: str = "default", layer=-2) -> LlavaForConditionalGeneration:
    torch.manual_seed(1)
    text = LlamaConfig(vocab_size=IMAGE + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    config = LlavaConfig(vision_config=tower.config, text_config=text, image_token_id=IMAGE,
                         vision_feature_select_strategy=strategy, vision_feature_layer=layer)
    return attach_vision_tower(LlavaForConditionalGeneration(config), tower)


def _encode(text: str) -> list[int]:
    return [3 + b for b in text.encode("utf-8")]


def _batch(captions, image_tokens: int):
    """input_ids with ``<image>`` expanded to the tower's image tokens (as LlavaProcessor does),
    labels on the answer only, right-padded."""
    before, after = PROMPT.split("<image>")
    rows = []
    for caption in captions:
        prompt = [BOS] + _encode(before) + [IMAGE] * image_tokens + _encode(after)
        answer = _encode(caption) + [EOS]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    length = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [PAD] * (length - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in rows])
    return ids, (ids != PAD).long(), labels


def test_tower_returns_what_clip_vision_model_returns(emoji):
    model = _model("cls")
    tower = HolisticVisionTower(model, branch="main")
    pixels = _pixels(model, emoji[0])
    clip = CLIPVisionModel(tower.config).eval()  # the tower LLaVA builds from the same config
    with torch.no_grad():
        for hidden in (True, -2, [0, -1]):
            ours, theirs = tower(pixels, output_hidden_states=hidden), clip(pixels, output_hidden_states=hidden)
            assert len(ours.hidden_states) == len(theirs.hidden_states) == 5
            for a, b in zip(ours.hidden_states, theirs.hidden_states):
                assert (a is None) == (b is None) and (a is None or a.shape == b.shape)
            assert ours.last_hidden_state.shape == theirs.last_hidden_state.shape
            assert ours.pooler_output.shape == theirs.pooler_output.shape
        out = tower(pixels, output_hidden_states=True)
        tokens = model.encode_image_tokens(pixels, "main", list(range(5)))
        for got, want in zip(out.hidden_states, tokens):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(out.last_hidden_state, tokens[-1], atol=0, rtol=0)
        torch.testing.assert_close(out.pooler_output, model.visual.ln_post(tokens[-1][:, 0]), atol=0, rtol=0)
        assert tower(pixels).hidden_states is None
        as_tuple = tower(pixels, output_hidden_states=True, return_dict=False)
        assert len(as_tuple) == 3 and as_tuple[2][1] is not None


@pytest.mark.parametrize("encoder, branch, all_class_tokens, strategy, prefix", [
    ("cls", "main", False, "default", 1),
    ("cls", "main", False, "full", 1),
    ("cls", None, False, "full", 3),
    ("mlp", "main", False, "default", 1),
    ("mlp", "background", True, "full", 3),
])
def test_llava_reads_the_branch_tokens(emoji, encoder, branch, all_class_tokens, strategy, prefix):
    """The LLaVA projector gets the tower's tokens at vision_feature_layer, with the class tokens
    the strategy keeps; here also the list of layers LLaVA concatenates."""
    model = _model(encoder)
    tower = HolisticVisionTower(model, branch=branch, all_class_tokens=all_class_tokens)
    assert tower.num_prefix_tokens == prefix
    pixels = _pixels(model, emoji[0])
    drop = 1 if strategy == "default" else 0
    for layer in (-2, [-3, -1]):
        llava = _llava(tower, strategy, layer)
        with torch.no_grad():
            got = llava.model.get_image_features(pixel_values=pixels).pooler_output
            tokens = model.encode_image_tokens(pixels, branch, [layer] if isinstance(layer, int) else layer,
                                               all_class_tokens=all_class_tokens)
            want = llava.model.multi_modal_projector(torch.cat([t[:, drop:] for t in tokens], -1))
        assert len(got) == len(pixels) and got[0].shape[0] == tower.num_image_tokens(strategy)
        assert llava.config.image_seq_length == tower.num_image_tokens(strategy) == 64 + prefix - drop
        torch.testing.assert_close(torch.stack(list(got)), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["cls", "mlp"])
def test_training_steps_with_the_holistic_tower(emoji, encoder):
    """Forward with a prompt holding the image token, then training: gradients reach the projector
    and the unfrozen tower up to the layer read (for Psi_MLP, the chosen branch's own forked
    layer, not another branch's), and the loss goes down; a frozen tower gets none."""
    images, captions = emoji
    model = _model(encoder)
    tower = HolisticVisionTower(model, branch="main")
    llava = _llava(tower).train()
    ids, mask, labels = _batch(captions, tower.num_image_tokens("default"))
    pixels = _pixels(model, images)
    optimizer = torch.optim.AdamW(llava.parameters(), lr=3e-3)
    losses = []
    for step in range(4):
        loss = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            projector = llava.model.multi_modal_projector.linear_1.weight.grad
            assert projector is not None and projector.abs().sum() > 0
            visual = llava.model.vision_tower.visual
            assert visual.conv1.weight.grad.abs().sum() > 0
            # the penultimate block's output is read: the last block gets no gradient
            assert all(p.grad is None for p in visual.transformer.resblocks[-1].parameters())
            if encoder == "cls":  # class token 1 is "main" (the patches attend to every class token)
                assert visual.class_embedding.grad[1].abs().sum() > 0
            else:  # the forked layers' replicated c_proj: only branch 1's copy is read at layer -2
                fork = visual.transformer.resblocks[visual.fork_at].mlp.c_proj.weight.grad.abs().sum((1, 2))
                assert fork[1] > 0 and fork[0] == 0 and fork[2] == 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    llava.model.vision_tower.requires_grad_(False)  # LLaVA's first stage: projector only
    llava.zero_grad(set_to_none=True)
    llava(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()
    assert all(p.grad is None for p in llava.model.vision_tower.parameters())
    assert llava.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_clear_errors(emoji):
    cls, mlp = _model("cls"), _model("mlp")
    with pytest.raises(ValueError, match=r"Psi_MLP's branches have token streams of their own .* name one with "
                                         r"branch= \(one of \['web', 'main', 'background'\]\)"):
        HolisticVisionTower(mlp)
    with pytest.raises(ValueError, match="unknown branch 'object'"):
        HolisticVisionTower(cls, branch="object")
    with pytest.raises(TypeError, match="takes a HolisticCLIP, got CLIPVisionModel"):
        HolisticVisionTower(CLIPVisionModel(HolisticVisionTower(cls).config))
    every = HolisticVisionTower(cls)
    with pytest.raises(ValueError, match="'default' drops only the first of the tower's 3 class tokens: use 'full'"):
        _llava(every, "default")
    with pytest.raises(ValueError, match="vision_feature_layer -6 is not a layer of the tower: it has 4 blocks"):
        _llava(HolisticVisionTower(cls, "main"), layer=-6)
    clip_sized = LlavaForConditionalGeneration(LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        text_config=LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2)))
    with pytest.raises(ValueError, match=r"projector takes 32 features per image token, the tower gives 192 x 1 "
                                         r"layer\(s\) = 192: build the LlavaConfig with vision_config=tower.config"):
        attach_vision_tower(clip_sized, HolisticVisionTower(cls, "main"))
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, 64, 64\), the tower's image size, got "
                                         r"\(1, 3, 32, 32\)"):
        every(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="does not return attention weights"):
        every(_pixels(cls, emoji[0][:1]), output_attentions=True)
