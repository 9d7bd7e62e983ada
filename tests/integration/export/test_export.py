"""pipeline-export: ONNX and TorchScript files of each family agree with the trained task in PyTorch at two input
sizes, the caller's NMS step reproduces the task's detections, and every file lands in the checkpoint's MLflow run."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import onnxruntime
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from pipeline.cli import CONF_DIR
from pipeline.cli.export import graphs
from pipeline.errors import ConfigError
from pipeline.ops.boxes import decode, flatten_levels
from pipeline.training.loading import load_task
from tests.helpers import TINY, project_dir, run_cli, run_dirs, run_main

pytestmark = pytest.mark.slow

FAMILIES = {
    "fcn": ["experiment=shapes_fcn"],
    "yolo": ["experiment=shapes_yolo", "model.net.neck_width=32"],
    "instance": ["experiment=shapes_instance", "model.net.neck_width=32", "model.net.mask_width=16"],
}
FORMATS = ("onnx", "torchscript")
SIZES = ((2, 64, 64), (1, 96, 128))  # (batch, height, width): two sizes, neither the other's shape
FILES = {
    "onnx": ["last.onnx", "last.onnx.json"],
    "torchscript": ["last.torchscript.pt", "last.torchscript.pt.json"],
}
MASK_FILES = {"onnx": "last.masks.onnx", "torchscript": "last.torchscript.masks.pt"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> dict[str, Path]:
    """One tiny training per family (two steps), each in its own project dir and store, exported in both formats
    through the real console entry point: a family is exported here while the others still train."""
    dirs = {}
    for family in FAMILIES:
        dirs[family] = tmp_path_factory.mktemp(f"export-{family}")
        project_dir(dirs[family], _migrated_store)
    fast = [*TINY, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    with ThreadPoolExecutor(len(FAMILIES)) as pool:
        jobs = {pool.submit(run_cli, "train", *FAMILIES[f], *fast, cwd=dirs[f]): f for f in FAMILIES}
        for job in as_completed(jobs):
            job.result()
            workdir = dirs[jobs[job]]
            for fmt in FORMATS:  # in this thread only: run_main sets the process's argv, cwd and environment
                run_main("export", f"ckpt_path={run_dirs(workdir)[0]}", f"format={fmt}", cwd=workdir, check=True)
    return dirs


@pytest.fixture(scope="module")
def exported(trained: dict[str, Path]) -> dict[tuple[str, str], Path]:
    """The checkpoint folder each family's export went into, by (family, format)."""
    return {
        (family, fmt): run_dirs(workdir)[0] / "checkpoints" for family, workdir in trained.items() for fmt in FORMATS
    }


def _run(path: Path, fmt: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The exported file's outputs, read by onnxruntime or torch.jit.load."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == list(inputs)
        return [torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in inputs.items()})]
    with torch.no_grad():
        out = torch.jit.load(str(path))(*inputs.values())
    return list(out) if isinstance(out, tuple) else [out]


def _reference(task: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """What the exported model should output, by the task's own code: its net's heads, SlotGrid.build and decode."""
    with torch.no_grad():
        if task.TARGETS == "semantic":
            return [task(images)]
        outputs, levels = task.net.outputs(images)
        grid = task.net.slots.grid(outputs, tuple(images.shape[-2:]))
        pred = flatten_levels(outputs)
        scores = torch.sigmoid(pred[..., 4:5]) * torch.sigmoid(pred[..., 5:])
        out = [decode(pred[..., :4], grid), scores]
        if task.TARGETS == "instances":
            out += [lateral(level) for lateral, level in zip(task.net.mask_lateral, levels, strict=True)]
        return out


def _images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(height * width + batch))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_model_matches_the_task_at_two_input_sizes(exported, family: str, fmt: str) -> None:
    folder = exported[family, fmt]
    task, _, _ = load_task(folder / "last.ckpt")
    for batch, height, width in SIZES:
        images = _images(batch, height, width)
        expected = _reference(task, images)
        got = _run(folder / FILES[fmt][0], fmt, {"images": images})
        assert len(got) == len(expected)
        for out, ref in zip(got, expected, strict=True):
            assert out.shape == ref.shape
            assert float((out - ref).abs().max()) <= 1e-4
        if family != "fcn":  # P slots of 3 anchors at strides 8, 16, 32
            slots = 3 * sum((height // s) * (width // s) for s in (8, 16, 32))
            assert got[0].shape == (batch, slots, 4) and got[1].shape == (batch, slots, 3)


def _caller_nms(boxes: torch.Tensor, scores: torch.Tensor, postprocess: dict) -> dict[str, torch.Tensor]:
    """The NMS step pipeline.export's docstring gives the caller, for one image's boxes [P, 4] and scores [P, K-1]."""
    slot, label = torch.nonzero(scores > postprocess["score_threshold"], as_tuple=True)
    if len(slot) > postprocess["pre_nms_top_k"]:
        top = scores[slot, label].topk(postprocess["pre_nms_top_k"]).indices
        slot, label = slot[top], label[top]
    keep = torchvision.ops.batched_nms(boxes[slot], scores[slot, label], label, postprocess["iou_threshold"])
    keep = keep[: postprocess["max_detections"]]
    return {"boxes": boxes[slot[keep]], "scores": scores[slot[keep], label[keep]], "labels": label[keep] + 1}


@pytest.mark.parametrize("family", ["yolo", "instance"])
def test_the_documented_nms_on_the_export_gives_the_tasks_detections(exported, family: str) -> None:
    folder = exported[family, "torchscript"]
    task, _, _ = load_task(folder / "last.ckpt")
    postprocess = json.loads((folder / "last.torchscript.pt.json").read_text())["postprocess"]
    assert postprocess == task.hparams.postprocess
    images = _images(2, 96, 128)
    boxes, scores, *_ = _run(folder / FILES["torchscript"][0], "torchscript", {"images": images})
    with torch.no_grad():
        detections = task.detect(images)
    for b, det in enumerate(detections):
        ours = _caller_nms(boxes[b], scores[b], postprocess)
        assert len(det["boxes"]) > 0 and torch.equal(ours["labels"], det["labels"])
        assert torch.allclose(ours["boxes"], det["boxes"], atol=1e-4) and torch.allclose(ours["scores"], det["scores"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_mask_graph_gives_the_tasks_masks_for_its_detections(exported, fmt: str) -> None:
    folder = exported["instance", fmt]
    task, _, _ = load_task(folder / "last.ckpt")
    sidecar = json.loads((folder / FILES[fmt][1]).read_text())
    assert sidecar["masks"] == {**task.hparams.masks, "roi_size": 14}
    for batch, height, width in SIZES:
        images = _images(batch, height, width)
        features = _reference(task, images)[2:]
        with torch.no_grad():
            detections = task.detect(images)
        rois = torch.cat([torch.cat([d["boxes"].new_full((len(d["boxes"]), 1), b), d["boxes"]], 1)
                          for b, d in enumerate(detections)])  # fmt: skip
        labels = torch.cat([d["labels"] for d in detections])
        inputs = dict(zip(["mask_features_8", "mask_features_16", "mask_features_32"], features, strict=True))
        (masks,) = _run(folder / MASK_FILES[fmt], fmt, {**inputs, "rois": rois, "labels": labels})
        expected = torch.cat([d["masks"] for d in detections])
        assert len(rois) > batch and masks.shape == expected.shape == (len(rois), 28, 28)
        assert float((masks - expected).abs().max()) <= 1e-4


def test_every_exported_file_is_logged_to_the_checkpoints_run(exported, trained: dict[str, Path],
                                                              tmp_path: Path) -> None:  # fmt: skip
    for family, workdir in trained.items():
        checkpoint = torch.load(exported[family, "onnx"] / "last.ckpt", map_location="cpu", weights_only=True)
        client = MlflowClient(checkpoint["pipeline"]["tracking_uri"])
        logged = {Path(a.path).name for a in client.list_artifacts(checkpoint["pipeline"]["mlflow_run_id"], "export")}
        expected = {name for fmt in FORMATS for name in FILES[fmt]}
        if family == "instance":
            expected |= set(MASK_FILES.values())
        assert logged == expected, family
        assert str(workdir) in checkpoint["pipeline"]["tracking_uri"]
        on_disk = {p.name for p in exported[family, "onnx"].iterdir()} - {"best.ckpt", "last.ckpt"}
        assert on_disk == expected  # nothing beside them: the ONNX weights are inside the file, no last.onnx.data
    # the logged copy alone is a whole model (downloaded into a folder of its own)
    run_id = torch.load(exported["yolo", "onnx"] / "last.ckpt", weights_only=True)["pipeline"]["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{trained['yolo'] / 'outputs' / 'mlflow.db'}")
    copy = Path(client.download_artifacts(run_id, "export/last.onnx", str(tmp_path)))
    task, _, _ = load_task(exported["yolo", "onnx"] / "last.ckpt")
    images = _images(1, 64, 96)
    for out, ref in zip(_run(copy, "onnx", {"images": images}), _reference(task, images), strict=True):
        assert float((out - ref).abs().max()) <= 1e-4


def test_a_torchscript_detector_refuses_sizes_that_are_not_multiples_of_32(exported) -> None:
    model = torch.jit.load(str(exported["yolo", "torchscript"] / "last.torchscript.pt"))
    with pytest.raises(torch.jit.Error, match="multiples of 32"):
        model(torch.rand(1, 3, 50, 70))


def test_an_unreachable_store_leaves_the_export_written_and_says_so(exported, trained: dict[str, Path],
                                                                    tmp_path: Path) -> None:  # fmt: skip
    workdir = trained["fcn"]
    store = workdir / "outputs" / "mlflow.db"
    away = tmp_path / "mlflow.db"
    store.rename(away)
    try:
        output = tmp_path / "fcn.pt"
        proc = run_main("export", f"ckpt_path={run_dirs(workdir)[0]}", "format=torchscript", f"output={output}",
                        cwd=workdir)  # fmt: skip
        assert not store.exists()  # MLflow was not let to create an empty store there
    finally:
        away.rename(store)
    assert proc.returncode == 0 and output.is_file() and (tmp_path / "fcn.pt.json").is_file()
    assert "not logged to MLflow run" in proc.stderr and f"{store} does not exist" in proc.stderr


def test_user_errors_end_in_one_message(trained: dict[str, Path]) -> None:
    workdir = trained["fcn"]
    proc = run_main("export", f"ckpt_path={run_dirs(workdir)[0]}", "format=tflite", cwd=workdir)
    assert proc.returncode == 1 and "format=tflite: choose one of onnx, torchscript" in proc.stderr
    proc = run_main("export", cwd=workdir)
    assert proc.returncode == 1 and "Missing mandatory value(s): ckpt_path" in proc.stderr
    proc = run_main("export", f"ckpt_path={workdir / 'nope.ckpt'}", cwd=workdir)
    assert proc.returncode == 1 and "nope.ckpt does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchvision_mask_rcnn_is_refused_with_the_reason() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=shapes_instance", "model=torchvision_maskrcnn", "data.val_size=64"])
    with pytest.raises(ConfigError, match="not TorchvisionMaskRCNN .model=torchvision_maskrcnn.: torchvision's"):
        graphs(instantiate(cfg.model), 64)
