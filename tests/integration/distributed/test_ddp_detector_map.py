"""Two gloo processes on CPU: detector mAP over the whole val set (FCN mIoU: tests/integration/test_exact_resume.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, run_cli, run_dirs, run_main, tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize(
    ("experiment", "keys"),
    # The instance task is the detector plus its mask branch: box and mask states are gathered alike.
    [("shapes_instance", ["val/map", "val/map_50", "val/mar_100", "val/segm_map", "val/segm_map_50",
                          "val/segm_mar_100"])],
)  # fmt: skip
def test_two_process_ddp_detector_map_equals_single_process_eval(workdir: Path, experiment: str, keys: list[str]):
    # The COCO metric gathers every rank's detections (and masks): the logged mAP must equal one process scoring
    # all images, although the ranks hold 4 and 3 of them.
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.spec.num_val=7"]
    run_cli("train", f"experiment={experiment}", *TINY, "model.net.neck_width=32", *ddp, cwd=workdir, timeout=900)
    (run_dir,) = run_dirs(workdir)
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED" and len(run.data.params["anchors"].split()) == 9

    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", "trainer.devices=1", cwd=workdir, check=True)
    (eval_dir,) = run_dirs(workdir, "eval")
    single = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    for key in keys:
        assert run.data.metrics[key] == pytest.approx(single[key], abs=1e-6), key

    # Eval on two processes writes every rank's detections to predictions.json, as one process does.
    run_cli("eval", f"ckpt_path={run_dir}", *ddp[:3], cwd=workdir)
    one, two = (json.loads((d / "predictions.json").read_text()) for d in run_dirs(workdir, "eval"))
    per_image = [Counter(p["image_id"] for p in predictions) for predictions in (one, two)]
    assert len(per_image[0]) == 7 and per_image[0] == per_image[1]
