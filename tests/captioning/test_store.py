import json
from pathlib import Path

import pytest

from holiclip.captioning.store import CaptionWriter, ReadProblems, read_rows, repair_torn_tail


def _row(i: int) -> dict:
    return {"image": f"/x/{i}.png", "perspective": "detail", "model": "m", "prompt": "p", "text": "t" * i,
            "finish_reason": "stop"}


def test_torn_tail_is_cut_and_rows_resume(tmp_path: Path):
    f = tmp_path / "captions.jsonl"
    good = "".join(json.dumps(_row(i)) + "\n" for i in range(3))
    f.write_text(good + '{"image": "/x/9.png", "perspec')  # a killed write
    problems = ReadProblems()
    assert [r["image"] for _, r in read_rows(f, problems)] == ["/x/0.png", "/x/1.png", "/x/2.png"]
    assert problems.items and "captions.jsonl:4: torn final line" in problems.items[0]
    with CaptionWriter(f) as w:
        assert w.dropped_bytes == len('{"image": "/x/9.png", "perspec')
        w.write(_row(5))
    assert f.read_text() == good + json.dumps(_row(5)) + "\n"
    assert repair_torn_tail(f) == 0


def test_bad_middle_line_is_reported_not_fatal(tmp_path: Path):
    f = tmp_path / "captions.jsonl"
    f.write_text(json.dumps(_row(1)) + "\n{oops\n" + json.dumps({"image": 1}) + "\n" + json.dumps(_row(2)) + "\n")
    problems = ReadProblems()
    assert len(list(read_rows(f, problems))) == 2
    assert any(":2: malformed JSON" in p for p in problems.items)
    assert any(":3: not a caption row" in p for p in problems.items)


def test_line_not_utf8_is_reported_with_its_column(tmp_path: Path):
    f = tmp_path / "captions.jsonl"
    f.write_bytes(json.dumps(_row(1)).encode() + b"\n" + json.dumps(_row(2)).encode().replace(b"tt", b"t\xe9") + b"\n")
    problems = ReadProblems()
    assert [r["text"] for _, r in read_rows(f, problems)] == ["t"]
    assert len(problems.items) == 1 and "captions.jsonl:2: not valid UTF-8 (byte 0xe9 at column" in problems.items[0]


def test_second_writer_on_same_file_is_refused(tmp_path: Path):
    f = tmp_path / "captions.jsonl"
    with CaptionWriter(f):
        with pytest.raises(RuntimeError, match="another run is writing"):
            CaptionWriter(f)
    with CaptionWriter(f) as w:  # free again once the first closed
        w.write(_row(1))
    assert len(f.read_text().splitlines()) == 1


def test_long_rows_are_written_whole(tmp_path: Path):
    f = tmp_path / "captions.jsonl"
    with CaptionWriter(f) as w:
        for i in (100_000, 3):  # longer than any I/O buffer
            w.write(_row(i))
    assert [len(r["text"]) for _, r in read_rows(f)] == [100_000, 3]
