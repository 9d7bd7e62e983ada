"""Every debug config trains with every data config: `pipeline-train debug=<d> data=<data>` on real files (the
shared datasets; shapes generates its own) trains, validates, checkpoints and ends FINISHED."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.helpers import SHARED, conf_options, requires_shared, run_dirs, run_main, tracking_uri

pytestmark = pytest.mark.slow

DATASETS = SHARED / "datasets"
COCO_TINY = DATASETS / "coco_tiny"
# Real files for every data option, small enough for a debug run (shapes generates its own).
DATA_FILES = {
    "coco": [f"data.{split}.{key}={COCO_TINY / value}" for split in ("train", "val")
             for key, value in (("images", "val2017"), ("annotations", "annotations/instances_val2017.json"))],
    "voc": [f"data.root={DATASETS / 'labelme_voc_examples' / 'data_dataset_voc'}"],
    "yolo": [f"data.yaml={DATASETS / 'coco128-seg' / 'coco128-seg.yaml'}", f"data.root={DATASETS / 'coco128-seg'}"],
    "masks": [f"data.train.images={DATASETS / 'isbi_membrane' / 'train' / 'image'}",
              f"data.train.masks={DATASETS / 'isbi_membrane' / 'train' / 'label'}", "data.val=null",
              "data.holdout=0.2", "data.values={0:0,255:1}", "data.class_names=[membrane,cell]"],
    "shapes": [],
    # The shared datasets' own configs name their files from the project root (paths.root_dir): here the test's cwd.
    "bccd": [f"data.root={DATASETS / 'bccd' / 'BCCD'}"],
    "coco128seg": [f"data.yaml={DATASETS / 'coco128-seg' / 'coco128-seg.yaml'}",
                   f"data.root={DATASETS / 'coco128-seg'}"],
    "isbi": [f"data.train.{key}={DATASETS / 'isbi_membrane' / 'train' / folder}"
             for key, folder in (("images", "image"), ("masks", "label"))],
}  # fmt: skip


@pytest.mark.parametrize(
    "data", [pytest.param(d, marks=[] if d == "shapes" else [requires_shared]) for d in conf_options("data")]
)
@pytest.mark.parametrize("debug", conf_options("debug"))
def test_every_debug_config_trains_on_every_data_config(workdir: Path, debug: str, data: str):
    """`pipeline-train debug=<d> data=<data>` on real files: it trains, validates, checkpoints and ends FINISHED."""
    import torch

    model, metric = ("yolo", "val/map") if data == "bccd" else ("fcn8s", "val/mIoU")  # BCCD has boxes only
    run_main("train", f"debug={debug}", f"data={data}", f"model={model}", *DATA_FILES[data], cwd=workdir, check=True)
    (run_dir,) = run_dirs(workdir)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # Two batches of 4 (data=voc: the 3 labelme images make one batch).
    assert checkpoint["global_step"] == (1 if data == "voc" else 2)
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED" and 0.0 <= run.data.metrics[metric] <= 1.0
    # Tagged as composed: this data and model, none of the default experiment's labels.
    tags = run.data.tags
    assert (tags["pipeline.data"], tags["pipeline.task"]) == (data, "DetectionTask" if model == "yolo" else
                                                              "SegmentationTask")  # fmt: skip
    assert not [t for t in tags if t.startswith("pipeline.tag.")]
    if data == "shapes":  # debug=fast generated its 16 + 8 images of 64 px, not the default 512 + 64 of 128 px
        images = sorted((workdir / "data" / "shapes" / "images" / "train").iterdir())
        assert len(images) == 16 and Image.open(images[0]).size == (64, 64)
