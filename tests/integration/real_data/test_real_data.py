"""Real annotated data from ../shared/datasets through the format's DataModule: check, train a few steps,
evaluate, with the dataset's own ids in predictions.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from pycocotools.coco import COCO

from tests.helpers import SHARED, requires_shared, run_dirs, run_main, tracking_uri

pytestmark = [requires_shared, pytest.mark.slow]

COCO_TINY = SHARED / "datasets" / "coco_tiny"
COCO_FILES = [f"data.train.images={COCO_TINY / 'train2017'}",
              f"data.train.annotations={COCO_TINY / 'annotations' / 'instances_train2017.json'}",
              f"data.val.images={COCO_TINY / 'val2017'}",
              f"data.val.annotations={COCO_TINY / 'annotations' / 'instances_val2017.json'}"]  # fmt: skip
SMALL = ["data.train_sizes=[128]", "data.val_size=128", "data.batch_size=4", "data.num_workers=0",
         "model.net.backbone.width=8", "trainer.accelerator=cpu", "trainer.max_epochs=1",
         "trainer.limit_train_batches=2", "callbacks.model_summary.max_depth=0"]  # fmt: skip


def test_check_data_summarises_coco_tiny_and_shows_instances(tmp_path: Path) -> None:
    proc = run_main("check_data", "model=instance", "data=coco", *COCO_FILES, "show=4", cwd=tmp_path, check=True)
    assert "Data OK for instances targets: 80 training and 80 validation images." in proc.stdout
    assert "person 209" in proc.stdout and "11 crowd regions" in proc.stdout  # the val file's summary
    (run,) = run_dirs(tmp_path, "check_data")
    grid = Image.open(run / "samples.png")
    assert grid.size[0] >= 2 * 320 and grid.size[1] >= 2 * 320  # 2 x 2 samples of at least 320 px


def test_yolo_trains_and_evaluates_on_coco_tiny_with_the_files_ids(workdir: Path) -> None:
    # Nearly untrained: keep every detection (the checkpoint carries it to eval) so predictions.json is not empty.
    run_main("train", "model=yolo", "data=coco", *COCO_FILES, *SMALL, "model.net.neck_width=32",
             "model.postprocess.score_threshold=0.0", cwd=workdir, check=True)  # fmt: skip
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/summary.json", "data/box_sizes.png"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "data/summary.json", str(workdir))
    summary = json.loads(Path(local).read_text())
    assert summary["train"]["images"] == 80 and summary["val"]["instances_per_class"]["person"] == 209

    (run_dir,) = run_dirs(workdir)
    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", cwd=workdir, check=True)
    (eval_dir,) = run_dirs(workdir, "eval")
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    gt = COCO(str(COCO_TINY / "annotations" / "instances_val2017.json"))
    assert predictions and {p["image_id"] for p in predictions} <= set(gt.getImgIds())
    assert {p["category_id"] for p in predictions} <= set(gt.getCatIds())  # the file's ids (1..90, with gaps)
    assert len(gt.loadRes(str(eval_dir / "predictions.json")).getAnnIds()) == len(predictions)

    run_main("predict", f"ckpt_path={run_dir}", f"input={COCO_TINY / 'val2017'}", "device=cpu", "min_score=0.0",
            cwd=workdir, check=True)  # fmt: skip
    (predict_dir,) = run_dirs(workdir, "predict")
    drawn = sorted((predict_dir / "boxes").glob("*.jpg")) + sorted((predict_dir / "boxes").glob("*.png"))
    assert len(drawn) == 80
    results = json.loads((predict_dir / "predictions.json").read_text())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())


COCO128 = SHARED / "datasets" / "coco128-seg"
YOLO_FILES = [f"data.yaml={COCO128 / 'coco128-seg.yaml'}", f"data.root={COCO128}"]


def test_check_data_reports_the_coco128_seg_quirks_as_warnings(tmp_path: Path) -> None:
    proc = run_main("check_data", "model=instance", "data=yolo", *YOLO_FILES, cwd=tmp_path, check=True)
    assert "Data OK for instances targets: 128 training and 128 validation images." in proc.stdout
    (run,) = run_dirs(tmp_path, "check_data")
    warnings = json.loads((run / "summary.json").read_text())["train"]["repairs"]
    assert warnings["image without a label file (background image)"] == {
        "count": 2,
        "first": ["images/train2017/000000000250.jpg", "images/train2017/000000000508.jpg"],
    }
    assert warnings["label file without an image"] == {
        "count": 2, "first": ["labels/train2017/000000000656.txt", "labels/train2017/000000000659.txt"]}  # fmt: skip


def test_instance_model_trains_and_evaluates_on_yolo_polygons(workdir: Path) -> None:
    run_main("train", "experiment=shapes_instance", "data=yolo", *YOLO_FILES, *SMALL, "model.net.neck_width=32",
             "model.postprocess.score_threshold=0.0", "trainer.limit_val_batches=2", cwd=workdir,
             check=True)  # fmt: skip
    (run_dir,) = run_dirs(workdir)
    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", "+trainer.limit_val_batches=2", cwd=workdir,
             check=True)  # fmt: skip
    (eval_dir,) = run_dirs(workdir, "eval")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["val/segm_map"] <= 1.0
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= set(range(80))  # YOLO class ids
    assert all(isinstance(p["segmentation"]["counts"], str) for p in predictions)
    image = COCO128 / "images" / "train2017" / "000000000009.jpg"
    run_main(
        "predict", f"ckpt_path={run_dir}", f"input={image}", "device=cpu", "min_score=0.0", cwd=workdir, check=True
    )
    (predict_dir,) = run_dirs(workdir, "predict")
    assert Image.open(predict_dir / "overlays" / "000000000009.png").size == Image.open(image).size


ISBI = SHARED / "datasets" / "isbi_membrane" / "train"
MASK_FILES = [f"data.{split}.{key}={ISBI / folder}" for split in ("train", "val")
              for key, folder in (("images", "image"), ("masks", "label"))]  # fmt: skip


def test_fcn_trains_and_evaluates_on_isbi_mask_folders(workdir: Path) -> None:
    binary = ["data.values={0:0,255:1}", "data.class_names=[membrane,cell]", "data.num_classes=2"]
    assert run_main("check_data", "data=masks", *MASK_FILES, *binary, cwd=workdir).returncode == 0
    (check,) = run_dirs(workdir, "check_data")
    assert json.loads((check / "summary.json").read_text())["train"]["images"] == 30
    run_main("train", "data=masks", *MASK_FILES, *binary, *SMALL, "data.val_size=128", cwd=workdir, check=True)
    (run_dir,) = run_dirs(workdir)
    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", cwd=workdir, check=True)
    (eval_dir,) = run_dirs(workdir, "eval")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["val/mIoU"] <= 1.0 and "val/IoU/cell" in metrics
    run_main("predict", f"ckpt_path={run_dir}", f"input={ISBI / 'image'}", "device=cpu", cwd=workdir, check=True)
    (predict_dir,) = run_dirs(workdir, "predict")
    masks = sorted((predict_dir / "masks").glob("*.png"))
    assert len(masks) == 30 and Image.open(masks[0]).size == (512, 512)


BCCD = SHARED / "datasets" / "bccd" / "BCCD"
LABELME_VOC = SHARED / "datasets" / "labelme_voc_examples" / "data_dataset_voc"


def test_yolo_trains_and_evaluates_on_bccd_voc_boxes(workdir: Path) -> None:
    voc = ["data=voc", f"data.root={BCCD}", "data.class_names=[background,RBC,WBC,Platelets]"]
    assert run_main("check_data", "model=yolo", *voc, cwd=workdir).returncode == 0
    (check,) = run_dirs(workdir, "check_data")
    summary = json.loads((check / "summary.json").read_text())
    assert summary["train"]["images"] == 205 and summary["val"]["instances_per_class"]["WBC"] == 87
    run_main("train", "model=yolo", *voc, *SMALL, "model.net.neck_width=32", "model.postprocess.score_threshold=0.0",
             "trainer.limit_val_batches=2", cwd=workdir, check=True)  # fmt: skip
    (run_dir,) = run_dirs(workdir)
    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", "+trainer.limit_val_batches=2", cwd=workdir,
             check=True)  # fmt: skip
    (eval_dir,) = run_dirs(workdir, "eval")
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= {1, 2, 3}
    image = BCCD / "JPEGImages" / "BloodImage_00000.jpg"
    run_main(
        "predict", f"ckpt_path={run_dir}", f"input={image}", "device=cpu", "min_score=0.0", cwd=workdir, check=True
    )
    (predict_dir,) = run_dirs(workdir, "predict")
    assert Image.open(predict_dir / "boxes" / "BloodImage_00000.png").size == (640, 480)


def test_fcn_trains_and_evaluates_on_voc_palette_masks(workdir: Path) -> None:
    assert run_main("check_data", "data=voc", f"data.root={LABELME_VOC}", cwd=workdir).returncode == 0
    (check,) = run_dirs(workdir, "check_data")
    summary = json.loads((check / "summary.json").read_text())["train"]
    assert summary["images"] == 3 and summary["instances_per_class"]["person"] == 2  # images containing a person
    run_main("train", "data=voc", f"data.root={LABELME_VOC}", *SMALL, cwd=workdir, check=True)
    (run_dir,) = run_dirs(workdir)
    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", cwd=workdir, check=True)
    (eval_dir,) = run_dirs(workdir, "eval")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["val/mIoU"] <= 1.0 and "val/IoU/person" in metrics
    image = LABELME_VOC / "JPEGImages" / "2011_000003.jpg"
    run_main("predict", f"ckpt_path={run_dir}", f"input={image}", "device=cpu", cwd=workdir, check=True)
    (predict_dir,) = run_dirs(workdir, "predict")
    assert Image.open(predict_dir / "masks" / "2011_000003.png").size == Image.open(image).size


def test_voc_instances_come_from_segmentation_object_pngs(tmp_path: Path) -> None:
    from pipeline.data.formats import VOC_CLASSES, voc_instance_dataset

    _, data = voc_instance_dataset(LABELME_VOC, "train", ["background", *VOC_CLASSES])
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_class = sorted(names[a["category_id"]] for a in data["annotations"])
    assert len(data["images"]) == 3 and per_class.count("person") == 6 and "bus" in per_class
    assert all(a["area"] > 0 and a["segmentation"]["size"] == [data["images"][a["image_id"] - 1]["height"],
                                                              data["images"][a["image_id"] - 1]["width"]]
               for a in data["annotations"])  # fmt: skip
