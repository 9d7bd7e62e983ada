"""Class names read from the annotation file once per file version, however often the config reads the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import pipeline.training.resolvers


def _write(path: Path, names: list[str]) -> None:
    categories = [{"id": 10 + i, "name": n} for i, n in enumerate(names)]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))


def test_coco_class_names_are_parsed_once_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = pipeline.training.resolvers.read_json
    monkeypatch.setattr(pipeline.training.resolvers, "read_json", lambda path: reads.append(path) or real(path))
    annotations = tmp_path / "instances.json"
    _write(annotations, ["cat", "dog"])
    cfg = OmegaConf.create({"names": f"${{pipeline.coco_class_names:{annotations}}}", "n": "${pipeline.len:${names}}"})
    for _ in range(5):
        assert list(cfg.names) == ["background", "cat", "dog"] and cfg.n == 3
    assert len(reads) == 1
    _write(annotations, ["cat", "dog", "zebra"])  # a new version of the file (other size) is read again
    assert list(cfg.names) == ["background", "cat", "dog", "zebra"]
    assert len(reads) == 2
    with pytest.raises(Exception, match="no such annotation file"):
        _ = OmegaConf.create({"x": f"${{pipeline.coco_class_names:{tmp_path / 'missing.json'}}}"}).x


def test_the_cached_resolvers_pickle_with_the_config(tmp_path: Path) -> None:
    import pickle

    annotations = tmp_path / "instances.json"
    _write(annotations, ["cat"])
    cfg = OmegaConf.create({"names": f"${{pipeline.coco_class_names:{annotations}}}"})
    # submitit and joblib pickle the config and the resolvers registered with it
    for resolver in (
        pipeline.training.resolvers.cached_coco_class_names,
        pipeline.training.resolvers.cached_yolo_class_names,
    ):
        assert pickle.loads(pickle.dumps(resolver)) is resolver
    assert list(pickle.loads(pickle.dumps(cfg)).names) == ["background", "cat"]
