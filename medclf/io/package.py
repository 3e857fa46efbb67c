"""Reading a model package (``medclf export RUN --out MODEL.zip``) without ever unpickling.

A package is a zip of flat, named members: ``config.json``, ``model.safetensors``, any other
``*.safetensors`` a run holds, the model card ``README.md`` and an optional ``metrics.json``.
Anything else (a ``.pt`` pickle, a path with a separator, ``..``, an absolute name, a member over
its size limit) is refused before a byte is written. A package is unpacked once into a
content-addressed folder, ``$MEDCLF_CACHE/models/<sha256[:16]>`` (default ~/.cache/medclf),
written to a temp folder and renamed, which then loads as a run folder (``medclf.runs.load_run``).

Here, beside the weight readers, because ``runs`` (which loads packages) sits below ``export``
(which writes them).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from medclf.errors import MedclfError

#: the suffixes a package may hold, and the most bytes one such member may unpack to
MEMBER_LIMITS = {".safetensors": 8 << 30, ".json": 64 << 20, ".md": 4 << 20}
MAX_MEMBERS = 64
REQUIRED = ("config.json", "model.safetensors")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_root() -> Path:
    return Path(os.environ.get("MEDCLF_CACHE", Path.home() / ".cache" / "medclf"))


def check_member_name(name: str, where: str | Path | None = None) -> str:
    """``name`` if it may be a package member (flat, plain, an allowed suffix), else a MedclfError."""
    if "/" in name or "\\" in name or name.startswith(".") or ":" in name or not _NAME.match(name):
        raise MedclfError(f"model package member {name!r} is not a plain file name (no folders, '..' or absolute "
                          "paths): refused", where)
    suffix = Path(name).suffix.lower()
    if suffix not in MEMBER_LIMITS:
        raise MedclfError(f"model package member {name!r} is not safetensors, JSON or Markdown (medclf never "
                          "unpickles): refused", where)
    return name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _members(zf: zipfile.ZipFile, path: Path) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise MedclfError(f"model package holds {len(infos)} members (at most {MAX_MEMBERS}): refused", path)
    seen = set()
    for info in infos:
        check_member_name(info.filename, path)
        if info.is_dir() or info.filename in seen:
            raise MedclfError(f"model package member {info.filename!r} is a folder or repeated: refused", path)
        seen.add(info.filename)
        limit = MEMBER_LIMITS[Path(info.filename).suffix.lower()]
        if info.file_size > limit:
            raise MedclfError(f"model package member {info.filename!r} is {info.file_size} bytes (limit {limit}): "
                              "refused", path)
    missing = [n for n in REQUIRED if n not in seen]
    if missing:
        raise MedclfError(f"not a medclf model package (no {', '.join(missing)})", path)
    return infos


def check_package(path: str | Path) -> list[str]:
    """The member names of a package after the same checks as unpacking (names, sizes, CRCs)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise MedclfError("not a medclf model package (not a zip file)", path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in _members(zf, path)]
            bad = zf.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as e:
        raise MedclfError(f"unreadable model package ({' '.join(str(e).split())[:80]})", path) from None
    if bad:
        raise MedclfError(f"model package member {bad!r} is corrupt", path)
    return names


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, path: Path) -> None:
    """One member, by name, streamed with its size limit enforced on the bytes actually read."""
    limit = min(info.file_size, MEMBER_LIMITS[Path(info.filename).suffix.lower()])
    n = 0
    with zf.open(info.filename) as src, open(dest / info.filename, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            n += len(block)
            if n > limit:
                raise MedclfError(f"model package member {info.filename!r} unpacks past its declared size: refused", path)
            out.write(block)


def is_package(path: str | Path) -> bool:
    """A package is a file; a run is a folder."""
    return Path(path).is_file()


def unpack_package(path: str | Path) -> Path:
    """The folder a package unpacks to (once: the same bytes map to the same folder)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise MedclfError("not a medclf run folder or model package (not a zip file); write one with `medclf export`",
                          path)
    dest = cache_root() / "models" / _sha256(path)[:16]
    if (dest / "config.json").exists():
        return dest
    try:
        with zipfile.ZipFile(path) as zf:
            infos = _members(zf, path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
            try:
                for info in infos:
                    _extract(zf, info, tmp, path)
                try:
                    os.replace(tmp, dest)
                except OSError:
                    if not (dest / "config.json").exists():  # not a concurrent unpack of the same package
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as e:
        raise MedclfError(f"unreadable model package ({' '.join(str(e).split())[:80]})", path) from None
    return dest
