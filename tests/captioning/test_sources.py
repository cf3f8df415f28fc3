import json
import os
from pathlib import Path

import pytest
import webdataset as wds

from holiclip.captioning.sources import ImageSource, SourceError, guess_mime

from tests.helpers.captioning import make_images


def test_folder_text_list_and_jsonl_give_absolute_keys(tmp_path: Path):
    imgs = make_images(tmp_path / "data" / "imgs", 4)
    (tmp_path / "data" / "imgs" / "notes.txt").write_text("not an image")
    folder = ImageSource(tmp_path / "data")
    assert folder.kind == "folder"
    keys = [it.key for it in folder]
    assert keys == [os.path.abspath(p) for p in imgs] and folder.total() == 4

    lst = tmp_path / "data" / "list.txt"
    lst.write_text("# comment\nimgs/img001.png\n\n" + str(imgs[2]) + "\n")
    assert [it.key for it in ImageSource(lst)] == [os.path.abspath(imgs[1]), os.path.abspath(imgs[2])]

    jl = tmp_path / "data" / "train.jsonl"
    jl.write_text(json.dumps({"image": "imgs/img003.png", "captions": {"web": "x"}}) + "\n"
                  + json.dumps({"image": "imgs/img000.png", "caption": ["a", "b"]}) + "\n")
    items = list(ImageSource(jl))
    assert [it.key for it in items] == [os.path.abspath(imgs[3]), os.path.abspath(imgs[0])]
    assert items[0].load() == imgs[3].read_bytes()
    assert guess_mime(items[0].load(), ".bin") == "image/png"


def test_jsonl_error_names_file_and_line(tmp_path: Path):
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"image": "a.png"}\n{"captions": {}}\n')
    with pytest.raises(SourceError, match=r"x\.jsonl:2: missing string field 'image'"):
        list(ImageSource(jl))


@pytest.mark.parametrize("name, text", [("y.jsonl", b'{"image": "a.png"}\n{"image": "caf\xe9.png"}\n'),
                                        ("y.txt", b"a.png\ncaf\xe9.png\n")])
def test_source_not_utf8_names_file_line_and_column(tmp_path: Path, name: str, text: bytes):
    src = tmp_path / name
    src.write_bytes(text)
    with pytest.raises(SourceError, match=rf"{name}:2: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        list(ImageSource(src))


def test_shards_partition_the_images(tmp_path: Path):
    make_images(tmp_path / "imgs", 10)
    parts = [[it.key for it in ImageSource(tmp_path / "imgs", (i, 3))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(it.key for it in ImageSource(tmp_path / "imgs"))
    assert [len(p) for p in parts] == [4, 3, 3]
    assert [ImageSource(tmp_path / "imgs", (i, 3)).total() for i in range(3)] == [4, 3, 3]
    with pytest.raises(SourceError):
        ImageSource(tmp_path / "imgs", (3, 3))


def test_webdataset_shards(tmp_path: Path):
    imgs = make_images(tmp_path / "imgs", 4)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as w:
            for k in range(2):
                w.write({"__key__": f"s{s}k{k}", "png": imgs[2 * s + k].read_bytes(), "txt": "web"})
    src = ImageSource(str(tmp_path / "shard-{000..001}.tar"))
    items = list(src)
    assert src.kind == "webdataset" and src.total() is None
    assert [it.key for it in items] == [f"{tmp_path}/shard-000.tar::s0k0", f"{tmp_path}/shard-000.tar::s0k1",
                                         f"{tmp_path}/shard-001.tar::s1k0", f"{tmp_path}/shard-001.tar::s1k1"]
    assert items[3].load() == imgs[3].read_bytes()
    # by tar file: rank 1 of 2 reads only the second shard
    assert [it.key.rsplit("::")[1] for it in ImageSource(str(tmp_path / "shard-{000..001}.tar"), (1, 2))] == ["s1k0", "s1k1"]
