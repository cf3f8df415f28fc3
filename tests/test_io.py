"""holiclip.io: the one JSONL reader, UTF-8 text, atomic writes, package folders, torchrun's environment."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from holiclip.io import (
    atomic_path, jsonl_rows, package_path, read_json, read_text, text_lines, torchrun_env,
)


class BadRow(ValueError):
    pass


def _write(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def test_rows_name_their_line_and_skip_blank_lines_and_a_bom(tmp_path):
    path = _write(tmp_path / "a.jsonl", b'\xef\xbb\xbf{"x": 1}\n', b"\n", b'  {"x": 2}\r\n', b'{"x": 3}')
    assert list(jsonl_rows(path)) == [(f"{path}:1", {"x": 1}), (f"{path}:3", {"x": 2}), (f"{path}:4", {"x": 3})]


@pytest.mark.parametrize("line, why", [
    (b'{"x": 1\n', r"malformed JSON \(Expecting ',' delimiter at column 8\)"),
    (b'{"x": "caf\xe9"}\n', r"not valid UTF-8 \(byte 0xe9 at column 11\); save the file as UTF-8"),
    (b'[1, 2]\n', r"expected a JSON object, got a list"),
    (b'"text"\n', r"expected a JSON object, got a string"),
])
def test_each_bad_line_is_an_error_naming_file_and_line(tmp_path, line, why):
    path = _write(tmp_path / "b.jsonl", b'{"x": 1}\n', line, b'{"x": 3}\n')
    with pytest.raises(BadRow, match=rf"b\.jsonl:2: {why}"):
        list(jsonl_rows(path, error=BadRow))
    seen = []
    assert [w for w, _ in jsonl_rows(path, on_error="skip", skipped=seen.append)] == [f"{path}:1", f"{path}:3"]
    assert len(seen) == 1 and seen[0].startswith(f"{path}:2: ")


def test_parse_converts_rows_and_its_errors_follow_the_policy(tmp_path):
    path = _write(tmp_path / "c.jsonl", b'{"image": "a.png"}\n', b'{"captions": {}}\n', b'{"image": "b.png"}\n')

    def image(row: dict, where: str) -> str:
        if not isinstance(row.get("image"), str):
            raise BadRow(f"{where}: no string field 'image'")
        return row["image"]

    with pytest.raises(BadRow, match=r"c\.jsonl:2: no string field 'image'"):
        list(jsonl_rows(path, image, error=BadRow))
    seen = []
    got = list(jsonl_rows(path, image, on_error="skip", skipped=seen.append, error=BadRow))
    assert [v for _, v in got] == ["a.png", "b.png"] and seen == [f"{path}:2: no string field 'image'"]
    with pytest.raises(KeyError):  # only ``error`` counts as a bad line; a bug stays a bug
        list(jsonl_rows(path, lambda row, where: row["image"], on_error="skip"))


def test_torn_tail_is_never_read(tmp_path):
    path = _write(tmp_path / "d.jsonl", b'{"x": 1}\n', b'{"x": 2}')  # a parsable row, but its write was cut
    seen = []
    assert [r for _, r in jsonl_rows(path, torn_tail=True, on_error="skip", skipped=seen.append)] == [{"x": 1}]
    assert seen == [f"{path}:2: torn final line (interrupted write)"]
    _write(path, b'{"x": 1}\n', b"  ")  # only blanks after the last line break: nothing torn
    seen.clear()
    assert len(list(jsonl_rows(path, torn_tail=True, on_error="skip", skipped=seen.append))) == 1 and seen == []


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"on_error must be one of \('error', 'skip'\), got 'ignore'"):
        list(jsonl_rows(_write(tmp_path / "e.jsonl", b"{}\n"), on_error="ignore"))


def test_text_and_json_files_name_line_and_column(tmp_path):
    path = _write(tmp_path / "t.txt", b"\xef\xbb\xbfone\n", b"two caf\xe9\n")
    with pytest.raises(BadRow, match=r"t\.txt:2: not valid UTF-8 \(byte 0xe9 at column 8\)"):
        read_text(path, BadRow)
    with open(path, "rb") as fh:
        lines = text_lines(fh, path, BadRow)
        assert next(lines) == "one\n"  # the BOM is dropped
        with pytest.raises(BadRow, match=r"t\.txt:2: not valid UTF-8 \(byte 0xe9 at column 8\)"):
            next(lines)
    _write(path, b"\xef\xbb\xbf{\n", b'  "a": 1,\n', b"}\n")
    with pytest.raises(BadRow, match=r"t\.txt:3: malformed JSON \(Expecting property name .* at column 1\)"):
        read_json(path, BadRow)
    _write(path, b'{"a": [1]}\n')
    assert read_json(path) == {"a": [1]}


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # readers see the old file until the rename
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "cache.safetensors"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the last rename wins, and it is one whole file
    code = f"from holiclip.io import atomic_path\nwith atomic_path({str(target)!r}) as t: t.write_bytes(b'x'); print(t.name)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other not in (first.name, second.name) and target.read_bytes() == b"x"


def test_package_path_finds_an_installed_package_without_importing_it():
    assert package_path("pytest", "sub") == Path(pytest.__file__).parent / "sub"
    assert package_path("no_such_package_here") is None


def test_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = torchrun_env()
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    monkeypatch.setenv("WORLD_SIZE", "eight")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='eight' is not an integer"):
        torchrun_env()


def test_io_imports_no_torch():
    code = "import holiclip.io, sys, json; print(json.dumps([m for m in ('torch', 'open_clip') if m in sys.modules]))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == []
