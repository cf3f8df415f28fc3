from pathlib import Path

import pytest

from holiclip.captioning.perspectives import (
    DEFAULT_PERSPECTIVES,
    PAPER_PERSPECTIVES,
    PerspectiveError,
    load_perspectives_yaml,
    resolve_perspectives,
)


def test_paper_prompts_word_for_word():
    assert list(PAPER_PERSPECTIVES) == ["detail", "few-words", "one-sentence", "nouns", "style", "background", "main"]
    assert PAPER_PERSPECTIVES["detail"].prompt == "Describe the image in detail."
    assert PAPER_PERSPECTIVES["nouns"].prompt == "Briefly describe the image with few noun words separated by ','."
    assert PAPER_PERSPECTIVES["background"].prompt == (
        "Describe only the background of this image, do not say anything about the foreground objects."
    )
    assert PAPER_PERSPECTIVES["main"].prompt == (
        "Describe only the one main object in the image, do not say anything about the other objects or background."
    )
    assert [p.name for p in resolve_perspectives(None)] == list(DEFAULT_PERSPECTIVES)
    assert len(resolve_perspectives("all")) == 7


def test_yaml_adds_and_overrides(tmp_path: Path):
    y = tmp_path / "p.yaml"
    y.write_text(
        "perspectives:\n"
        "  colors: List the main colours.\n"
        "  detail:\n    prompt: Describe every detail.\n    max_new_tokens: 200\n"
    )
    got = resolve_perspectives("detail,colors,detail", y)
    assert [(p.name, p.prompt, p.max_new_tokens) for p in got] == [
        ("detail", "Describe every detail.", 200),
        ("colors", "List the main colours.", None),
    ]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("perspectives:\n  bad@name: x\n", "bad@name"),
        ("perspectives:\n  x:\n    prompt: ''\n", "perspectives.x.prompt"),
        ("perspectives:\n  x:\n    prompt: hi\n    max_new_tokens: -1\n", "perspectives.x.max_new_tokens"),
        ("perspectives:\n  x:\n    promt: hi\n", "unknown field"),
        ("[1, 2]\n", "expected a mapping"),
    ],
)
def test_yaml_errors_name_file_and_field(tmp_path: Path, text: str, needle: str):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(PerspectiveError) as e:
        load_perspectives_yaml(y)
    assert str(y) in str(e.value) and needle in str(e.value)


def test_unknown_perspective_lists_known():
    with pytest.raises(PerspectiveError, match="unknown perspective.*'colour'.*detail"):
        resolve_perspectives("detail,colour")
