"""The image check's cache: a second check of unchanged files decodes nothing and answers the same; any change to
an image misses; a corrupt cache file is ignored; failures are never cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import checks
from pipeline.data.checks import DataError, check_coco

OLD_NS = 1_600_000_000 * 10**9  # mtime of the written files: long before any check (a fresh file is not cached)


def _age(*files: Path, ns: int = OLD_NS) -> None:
    for file in files:
        os.utime(file, ns=(ns, ns))


def _write(tmp_path: Path, images: int = 3, width: int = 40) -> tuple[Path, Path]:
    """A valid dataset of `images` 40x30 PNGs (records say `width` wide), one box each; returns (folder, json)."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(1, images + 1):
        Image.fromarray(np.full((30, 40, 3), 30 * i, np.uint8)).save(folder / f"{i}.png")
        data["images"].append({"id": i, "file_name": f"{i}.png", "width": width, "height": 30})
        data["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 8]})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    _age(path, *folder.iterdir())
    return folder, path


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The image files the check decodes, in order."""
    calls: list[Path] = []
    real = checks.image_size

    def counted(path: Path, decode: bool = False) -> tuple[int, int]:
        calls.append(path)
        return real(path, decode=decode)

    monkeypatch.setattr(checks, "image_size", counted)
    return calls


def test_a_second_check_of_unchanged_files_decodes_nothing_and_answers_the_same(tmp_path, monkeypatch, capsys):
    images, path = _write(tmp_path)
    cache = tmp_path / "cache"
    first, report = check_coco(images, path, cache_dir=cache)
    said = capsys.readouterr()
    assert len(list(cache.glob("*.json"))) == 1 and not list(cache.glob(".*"))  # no staging file left

    def no_decoding(*_, **__):
        raise AssertionError("an image was decoded on a cache hit")

    monkeypatch.setattr(checks, "image_size", no_decoding)
    again, report_again = check_coco(images, path, cache_dir=cache)
    assert again == first and report_again.summary() == report.summary()
    assert capsys.readouterr() == said


def test_changing_adding_or_removing_an_image_misses(tmp_path, decodes):
    images, path = _write(tmp_path)
    cache = tmp_path / "cache"
    check_coco(images, path, cache_dir=cache)
    assert len(decodes) == 3
    _age(images / "2.png", ns=OLD_NS + 1)  # touched: another mtime
    check_coco(images, path, cache_dir=cache)
    assert len(decodes) == 6
    check_coco(images, path, cache_dir=cache)  # unchanged since: a hit
    assert len(decodes) == 6
    size = (images / "2.png").stat().st_size
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(images / "2.png")  # other bytes, same size and mtime
    _age(images / "2.png", ns=OLD_NS + 1)
    assert (images / "2.png").stat().st_size == size
    check_coco(images, path, cache_dir=cache)  # a miss all the same: its ctime changed
    assert len(decodes) == 9
    check_coco(images, path, cache_dir=cache)
    assert len(decodes) == 9
    _write(tmp_path, images=4)  # an image added (and the annotation file rewritten)
    check_coco(images, path, cache_dir=cache)
    assert len(decodes) == 13
    _write(tmp_path, images=2)  # an image removed from the records
    check_coco(images, path, cache_dir=cache)
    assert len(decodes) == 15


def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, decodes):
    images, path = _write(tmp_path)
    cache = tmp_path / "cache"
    first = check_coco(images, path, cache_dir=cache)[0]
    (entry,) = cache.glob("*.json")
    for garbage in (b"{not json", b"[1, 2]", b'{"passed": true, "images": 99}', b"\xff\xfe"):
        entry.write_bytes(garbage)
        assert check_coco(images, path, cache_dir=cache)[0] == first
        assert json.loads(entry.read_text())["passed"] is True
    assert len(decodes) == 3 * 5
    check_coco(images, path, cache_dir=cache)
    assert len(decodes) == 15


def test_a_failing_dataset_is_not_cached_and_fails_again_with_the_same_message(tmp_path, decodes):
    images, path = _write(tmp_path, width=41)  # every record says 41 wide, the files are 40
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as first:
        check_coco(images, path, cache_dir=cache)
    assert "is 40x30 but the file says 41x30" in str(first.value)
    assert not cache.exists()
    with pytest.raises(DataError) as again:
        check_coco(images, path, cache_dir=cache)
    assert str(again.value) == str(first.value) and len(decodes) == 6


def test_a_missing_image_fails_with_the_fresh_checks_message(tmp_path):
    images, path = _write(tmp_path)
    cache = tmp_path / "cache"
    check_coco(images, path, cache_dir=cache)
    (images / "3.png").unlink()
    with pytest.raises(DataError, match=r"image id 3: file .*3\.png does not exist"):
        check_coco(images, path, cache_dir=cache)


def test_files_modified_just_before_the_check_are_not_remembered(tmp_path, decodes):
    images, path = _write(tmp_path)
    os.utime(images / "1.png")  # mtime now: a rewrite within the timestamp resolution could keep its stat
    cache = tmp_path / "cache"
    check_coco(images, path, cache_dir=cache)
    assert not cache.exists()
    check_coco(images, path)  # no cache folder: nothing written anywhere
    assert len(decodes) == 6


def test_the_datamodule_uses_its_check_cache_folder(tmp_path, decodes):
    from pipeline.data.datamodule import CocoDataModule

    images, path = _write(tmp_path)
    files = {"images": images, "annotations": path}

    def setup(cache: Path | None) -> None:
        data = CocoDataModule(files, files, num_classes=2, class_names=["background", "thing"], targets="boxes",
                              num_workers=0, check_cache=cache)  # fmt: skip
        data.setup("fit")

    setup(tmp_path / "cache")
    assert len(decodes) == 3  # val has the same files as train: its check is already a hit
    setup(tmp_path / "cache")
    assert len(decodes) == 3
    setup(None)
    assert len(decodes) == 9


def test_a_cache_path_that_cannot_be_a_folder_only_costs_the_decoding(tmp_path, decodes, capsys):
    images, path = _write(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    first, _ = check_coco(images, path, cache_dir=blocker / "cache")
    assert "not written" in capsys.readouterr().out
    again, _ = check_coco(images, path, cache_dir=blocker / "cache")
    assert again == first and len(decodes) == 6  # checked in full both times, no error
