"""Image checks remembered across jobs: a dataset whose images all decoded at their recorded sizes is not decoded
again (a sweep's next trial, every DDP rank, a restart) while its files, records and check settings are unchanged.

A pass is a small JSON file in a cache folder (beside `pipeline.data.anchor_cache`'s), named by a fingerprint of what
the image check reads: the image folder; each image record (id, file name, width, height) with its file's size,
mtime_ns and ctime_ns (never its content: hashing the bytes would cost what decoding costs); the annotation file's
path, size and mtime_ns; the Pillow version and its decompression-bomb limit. Changing, adding or removing an image
gives another fingerprint. Only passes are stored: a failing dataset is decoded again and fails with the same
message. A check of files modified (mtime) within RACY_NS before it started is not remembered (a rewrite within
the file system's timestamp resolution could keep size and mtime). A cache file that cannot be read is ignored and
rewritten; writes go to a temp file, then os.replace, so parallel jobs never see half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

import PIL
from PIL import Image

VERSION = 1
# Files changed this recently (ns) before a check began are not trusted to be told apart by their stat.
RACY_NS = 2_000_000_000


def fingerprint(images_dir: Path, images: list[dict], annotations: Path) -> tuple[str, int] | None:
    """(hex digest, newest mtime_ns) of what the image check reads; None if an image is not a regular file."""
    digest = hashlib.sha256(f"image check v{VERSION} pillow {PIL.__version__} "
                            f"max_pixels {Image.MAX_IMAGE_PIXELS}\n".encode())  # fmt: skip
    newest, size, mtime = 0, None, None  # a converted dataset's `annotations` names its source, not a file
    with contextlib.suppress(OSError):
        ann = os.stat(annotations)
        if stat.S_ISREG(ann.st_mode):
            newest, size, mtime = ann.st_mtime_ns, ann.st_size, ann.st_mtime_ns
    digest.update(repr((os.path.abspath(annotations), size, mtime)).encode() + b"\n")
    base = os.path.abspath(images_dir)
    for image in images:
        file = os.path.join(base, image["file_name"])
        try:
            st = os.stat(file)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        newest = max(newest, st.st_mtime_ns)
        record = (image["id"], file, image["width"], image["height"], st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest.update(repr(record).encode() + b"\n")
    return digest.hexdigest(), newest


def _passed(path: Path, count: int) -> bool:
    """Whether `path` records a pass of `count` images (an unreadable or foreign file: no)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("passed") is True and data.get("images") == count


def _remember(path: Path, count: int, images_dir: Path, annotations: Path) -> None:
    """Write the pass atomically; a folder that cannot be written only costs the next job its decoding."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, "x") as out:
            json.dump({"passed": True, "images": count, "images_dir": str(images_dir),
                       "annotations": str(annotations), "version": VERSION}, out)  # fmt: skip
        os.replace(staging, path)  # whole or absent, also with parallel jobs
    except OSError as err:
        with contextlib.suppress(OSError):  # e.g. the cache path is a file, or a folder that cannot be searched
            staging.unlink()
        print(f"Image check cache {path} not written ({err})")


def check_images_once(
    check: Callable[[], None],
    images_dir: Path,
    images: list[dict],
    annotations: Path,
    cache_dir: str | os.PathLike | None,
) -> bool:
    """Run `check()` (raises on unusable images) unless `cache_dir` holds a pass of the same fingerprint; a new
    pass is remembered there. Returns whether the cache answered (check() not run)."""
    started = time.time_ns()
    found = None if cache_dir is None else fingerprint(images_dir, images, annotations)
    if found is None:
        check()
        return False
    digest, newest = found
    path = Path(cache_dir) / f"images-{digest[:32]}.json"
    if _passed(path, len(images)):
        return True
    check()
    if newest < started - RACY_NS:
        _remember(path, len(images), images_dir, annotations)
    return False
