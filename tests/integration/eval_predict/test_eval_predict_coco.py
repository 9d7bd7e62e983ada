"""Evaluation and prediction where users expect them (issue 15.6), on real COCO data from ../shared: plain
`data.*` overrides point pipeline-eval at other files, typos and data groups fail with the keys to use, and
pipeline-predict in batches writes what it writes one image at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.metrics.detection import COCO_STATS, pycocotools_stats
from tests.helpers import SHARED, project_dir, requires_shared, run_dirs, run_main

pytestmark = [requires_shared, pytest.mark.slow]

COCO_TINY = SHARED / "datasets" / "coco_tiny"
VAL_IMAGES = COCO_TINY / "val2017"
VAL_JSON = COCO_TINY / "annotations" / "instances_val2017.json"
# A nearly untrained detector that keeps every detection (score_threshold 0), so no image's predictions are empty.
TRAIN = ["model=yolo", "data=coco", f"data.train.images={VAL_IMAGES}", f"data.train.annotations={VAL_JSON}",
         f"data.val.images={VAL_IMAGES}", f"data.val.annotations={VAL_JSON}", "data.train_sizes=[128]",
         "data.val_size=128", "data.batch_size=8", "data.num_workers=0", "model.net.backbone.width=8",
         "model.net.neck_width=32", "model.postprocess.score_threshold=0.0", "trainer.accelerator=cpu",
         "trainer.max_epochs=1", "trainer.limit_train_batches=1", "callbacks.model_summary.max_depth=0"]  # fmt: skip


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Path:
    """One detector trained a step on coco_tiny's 80 val images (its own project dir and store); its run dir."""
    workdir = tmp_path_factory.mktemp("eval-predict")
    project_dir(workdir, _migrated_store)
    run_main("train", *TRAIN, cwd=workdir, check=True)
    (run_dir,) = run_dirs(workdir)
    return run_dir


def _workdir(run_dir: Path) -> Path:
    return run_dir.parents[3]  # <workdir>/outputs/train/runs/<run>


def _subset(path: Path, count: int) -> set[int]:
    """Write the first `count` images of coco_tiny's val file (with their annotations) to `path`; their ids."""
    coco = json.loads(VAL_JSON.read_text())
    images = sorted(coco["images"], key=lambda i: i["id"])[:count]
    ids = {i["id"] for i in images}
    coco |= {"images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    path.write_text(json.dumps(coco))
    return ids


def test_eval_with_plain_data_overrides_scores_the_given_files(detector: Path, tmp_path: Path):
    subset = tmp_path / "subset.json"
    ids = _subset(subset, 12)
    workdir = _workdir(detector)
    run_main("eval", f"ckpt_path={detector}", f"data.val.images={VAL_IMAGES}", f"data.val.annotations={subset}",
             "data.batch_size=4", "trainer.accelerator=cpu", cwd=workdir, check=True)  # fmt: skip
    (eval_dir,) = run_dirs(workdir, "eval")
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} == ids  # the 12 images of the given file, each with detections
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    reference = pycocotools_stats(subset, eval_dir / "predictions.json")
    assert [metrics[f"val/{key}"] for key in COCO_STATS] == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.val.imagse=x"], "Unknown config key 'data.val.imagse': the checkpoint's data config "
                                "(pipeline.data.datamodule.CocoDataModule) has no 'imagse' under data.val. Its keys "
                                "there: annotations, images."),
        (["data.bach_size=2"], "Unknown config key 'data.bach_size'"),
        (["data.bach_size=2"], "Did you mean 'batch_size'?"),
        (["data=coco"], "data=coco: pipeline-eval evaluates with the checkpoint's own data config "
                        "(pipeline.data.datamodule.CocoDataModule), which a data group cannot replace."),
        (["data=voc", "data.root=x"], f"its files now: data.train.images={VAL_IMAGES}"),
        (["+data=yolo"], f"data.val.annotations={VAL_JSON}"),
    ],
)  # fmt: skip
def test_eval_refuses_misspelt_data_keys_and_data_groups_naming_the_keys_to_use(
    detector: Path, overrides: list[str], message: str
):
    proc = run_main("eval", f"ckpt_path={detector}", *overrides, "trainer.accelerator=cpu", cwd=_workdir(detector))
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_predict_in_batches_writes_what_one_image_at_a_time_writes(detector: Path, tmp_path: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(VAL_IMAGES.iterdir())[:9]:
        (folder / path.name).write_bytes(path.read_bytes())
    sizes = {Image.open(p).size for p in folder.iterdir()}
    assert len(sizes) >= 3  # letterboxed to one square, whatever their size
    workdir = _workdir(detector)
    outputs = []
    for batch_size in (1, 4):
        proc = run_main("predict", f"ckpt_path={detector}", f"input={folder}", "device=cpu", "min_score=0.0",
                        f"batch_size={batch_size}", cwd=workdir, check=True)  # fmt: skip
        assert "Predicting" in proc.stdout and "9/9" in proc.stdout  # the progress bar, counting images
        outputs.append(json.loads((run_dirs(workdir, "predict")[-1] / "predictions.json").read_text()))
    one, batched = outputs
    assert len({r["file_name"] for r in one}) == 9 and len(one) == len(batched)
    for a, b in zip(one, batched, strict=True):
        assert (a["image_id"], a["file_name"], a["category_id"]) == (b["image_id"], b["file_name"], b["category_id"])
        # A batch sums its convolutions in another order: float32 rounding, 6e-5 px at 640 px.
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)


def test_predict_refuses_a_batch_size_below_one(detector: Path):
    proc = run_main("predict", f"ckpt_path={detector}", f"input={VAL_IMAGES}", "device=cpu", "batch_size=0",
                    cwd=_workdir(detector))  # fmt: skip
    assert proc.returncode == 1 and "batch_size=0: give a whole number of images, 1 or more." in proc.stderr


BCCD = SHARED / "datasets" / "bccd" / "BCCD"


def test_eval_split_test_scores_a_voc_roots_test_list_and_formats_without_one_say_what_to_give(
    detector: Path, tmp_path: Path, _migrated_store: Path
):
    project_dir(tmp_path, _migrated_store)
    run_main("train", "debug=fast", "data=bccd", "model=yolo", f"data.root={BCCD}",
             "model.postprocess.score_threshold=0.0", cwd=tmp_path, check=True)  # fmt: skip
    (run_dir,) = run_dirs(tmp_path)
    run_main("eval", f"ckpt_path={run_dir}", "split=test", "trainer.accelerator=cpu", cwd=tmp_path, check=True)
    (eval_dir,) = run_dirs(tmp_path, "eval")
    record = json.loads((eval_dir / "metrics.json").read_text())
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    test_list = (BCCD / "ImageSets" / "Main" / "test.txt").read_text().split()
    # Every image of test.txt (72; val.txt has 87) has detections at score threshold 0.
    assert record["split"] == "test" and len({p["image_id"] for p in predictions}) == len(test_list) == 72

    coco = run_main("eval", f"ckpt_path={detector}", "split=test", "trainer.accelerator=cpu", cwd=_workdir(detector))
    assert coco.returncode == 1 and "Traceback" not in coco.stderr
    assert "split=test: CocoDataModule data has no named test split. Evaluate your test files with " \
           "data.val.images=… data.val.annotations=… instead." in coco.stderr  # fmt: skip
