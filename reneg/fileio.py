"""Crash-safe file writing and safe reading of untrusted files.

Every file ReNeg writes goes to a temporary file in the same folder first and is
renamed over the target only once complete, so a kill or a full disk never leaves
a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


class OutputError(OSError):
    """Writing an output failed (read-only folder, full disk...)."""


def not_a_file(path: str | os.PathLike) -> str:
    """Why ``path`` can not be read as a file, in a few words: "no such file", "a directory, not a
    file", "a symlink loop", "a FIFO (named pipe), not a regular file"... ("" for a regular file)."""
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        import errno

        if e.errno == errno.ELOOP:
            return "a symlink loop, not a file"
        if os.path.islink(path):
            return "a broken symlink (its target does not exist)"
        if e.errno == errno.ENOENT:
            return "no such file"
        return f"not readable ({e.strerror or e})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    for test, what in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return f"{what}, not a regular file"
    return "not a regular file"


def walk_folder(folder: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(folder, followlinks=True)``, sorted, that enters each real directory once.

    Links to folders are followed (model folders are often links), but a link back to a folder
    already walked (``ln -s . loop``, two links to one place) is not entered again, so a loop
    can neither hang the walk nor list the same files over and over. The caller may prune
    ``dirs`` in place, as with ``os.walk``."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        files.sort()
        yield root, dirs, files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any error the temporary file is removed and the old ``path`` (if any) is
    left untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists (not overwriting)")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; outputs get the usual mode
    except OSError as e:
        raise OutputError(f"{path}: cannot write into {folder}: {e.strerror or e}") from e
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise FileExistsError(f"{path}: already exists (not overwriting)")
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if isinstance(e, (FileExistsError, OutputError)):
            raise
        raise OutputError(f"{path}: writing failed: {e.strerror or e}") from e
    except BaseException:
        _unlink(tmp)
        raise


def _new_file_mode() -> int:
    """0666 less the process umask (read without changing it), as ``open`` would create."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_bytes(path, data: bytes, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text: str, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_json(path, obj: Any, overwrite: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite)


def atomic_torch_save(path, obj: Any, overwrite: bool = True) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), overwrite)


def atomic_save_safetensors(path, tensors: dict, metadata: dict | None = None, overwrite: bool = True) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data, overwrite)


def safe_torch_load(path, what: str = "file") -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that name the file.

    A pickle that would import or call anything besides tensors and plain
    containers is refused; its payload never runs.
    """
    import pickle

    import torch

    import warnings

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    _check_zip_sizes(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol N" on corrupt files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).replace("\x1b[1m", "").replace("\x1b[0m", "").splitlines()]
        detail = next((ln for ln in lines if "GLOBAL" in ln), None)
        if detail is not None:
            raise ValueError(
                f"{path}: refused to load this {what}: it is a pickle that asks to run code or build "
                f"objects other than tensors ({detail[:200]}). Only plain tensor files are loaded "
                f"(torch.load weights_only=True)."
            ) from None
        detail = next((ln for ln in lines if "Unsupported" in ln), None) or next(
            (ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln and ln.split("error:", 1)[1].strip()),
            lines[-1] if lines else "",
        )
        raise ValueError(
            f"{path}: not a readable torch {what} (truncated, corrupt, or not written by torch.save): {detail[:200]}"
        ) from None
    except Exception as e:  # untrusted input: any failure inside torch.load is a bad file
        raise ValueError(
            f"{path}: not a readable torch {what} (truncated or corrupt?): {type(e).__name__}: {str(e)[:200]}"
        ) from None


def _check_zip_sizes(path: Path, what: str) -> None:
    """Refuse a zip-format torch file whose entries declare far more content than the
    file holds (a decompression bomb): torch would inflate it into memory first.
    ``torch.save`` stores entries uncompressed, so a real file declares about its size."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            declared = sum(max(0, int(i.file_size)) for i in z.infolist())
    except Exception:  # noqa: BLE001 - unreadable archives are reported by torch.load below
        return
    if declared > 4 * size + (1 << 20):
        raise ValueError(
            f"{path}: refused to load this {what}: its zip entries declare {declared} bytes "
            f"of content in a {size}-byte file (a decompression bomb or a corrupt archive)"
        )


MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

# The one table of safetensors dtypes: bytes per element and the torch dtype's name (by name, so that
# this module needs no torch). A dtype missing here is refused as a corrupt header.
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
_COMPLEX_DTYPES = {"C64": "complex64", "C128": "complex128", "C32": "complex32"}


class TruncatedFile(ValueError):
    """A safetensors file whose header describes more bytes of tensors than the file holds."""


def read_safetensors_header(path, name_truncation: bool = False) -> dict:
    """Parse and check a safetensors header without trusting it.

    Checks the header length against the file size, that it is JSON, and that
    every tensor's byte range lies inside the file and matches its dtype and shape,
    so that a lying header can cause neither a huge allocation nor a crash.

    ``name_truncation``: a file cut short (its tensors' byte ranges end past the file's end) is
    reported as such, :class:`TruncatedFile`, before any tensor is checked: how a model checkpoint
    whose download did not finish is named.
    """
    import struct

    shown = os.fspath(path)
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file: {size} bytes, expected an 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
            raise ValueError(
                f"{path}: corrupt safetensors header: it claims {n} bytes of header "
                f"but the file has {size - 8} after the length field"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also: integers of thousands of digits, deep nesting
        raise ValueError(
            f"{path}: corrupt safetensors header (not JSON: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (expected a JSON object)")
    if name_truncation and n > 0:
        need = _described_size(header, n)
        if need is not None and need > size:
            raise TruncatedFile(
                f"{shown}: truncated: the safetensors header describes {need:,} bytes of tensors but "
                f"the file has {size:,} ({100 * size / need:.0f} %); the download or copy did not finish"
            )
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValueError(f"{path}: corrupt safetensors metadata (expected string values)")
            continue
        if isinstance(info, dict) and info.get("dtype") in _COMPLEX_DTYPES:
            raise ValueError(
                f"{path}: tensor {key!r} holds complex numbers ({_COMPLEX_DTYPES[info['dtype']]}), which are "
                f"not supported: embeddings and models hold real floating-point values"
            )
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for s in shape:
                if not isinstance(s, int) or s < 0:
                    raise ValueError
                count *= s
            ok = (
                dtype in SAFETENSORS_DTYPES
                and isinstance(a, int)
                and isinstance(b, int)
                and 0 <= a <= b <= data_len
                and (b - a) == count * SAFETENSORS_DTYPES[dtype][0]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{path}: corrupt safetensors header: tensor {key!r} has an invalid "
                f"dtype, shape or byte range ({str(info)[:120]})"
            )
    return header


def _described_size(header: dict, n: int):
    """The file size a header of ``n`` bytes describes (its tensors' furthest end), or None when its
    byte ranges are too malformed to say (the tensor checks then name what is wrong)."""
    try:
        ends = [
            v["data_offsets"][1]
            for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
        ]
        need = 8 + n + max(ends, default=0)
        return need
    except (KeyError, TypeError, IndexError):  # e.g. a string offset
        return None


LOCK_NAME = ".reneg.lock"


class FolderBusy(OutputError):
    """Another process holds an output folder's lock."""


class FolderLock:
    """An exclusive lock on ``FOLDER/.reneg.lock`` (``fcntl.flock``) while a command writes there.

    The operating system drops the lock when its process ends, however it ends, so a killed run never
    leaves a stale lock behind; the file itself stays (it names the last holder). Where ``fcntl`` is
    missing (Windows) no lock is taken.
    """

    def __init__(self, folder: str | os.PathLike, what: str, flag: str = "--out"):
        self.folder, self.what, self.flag = os.fspath(folder), what, flag
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{self.flag} {self.folder}: cannot create its lock file: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            except OSError:
                holder = "another process"
            os.close(fd)
            raise FolderBusy(
                f"{self.flag} {self.folder}: {holder} is writing there now; wait for it to end, "
                f"or choose another {self.flag}"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{self.what} (process {os.getpid()})\n".encode())
        except OSError:
            pass  # the lock holds whether or not its note could be written
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)  # closing the file releases the lock
            except OSError:
                pass
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
