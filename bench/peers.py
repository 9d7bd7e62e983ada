"""Side by side with the peers (issue 26.4): our detector against Ultralytics' smallest YOLO on BCCD, our
segmentation net against segmentation_models_pytorch's U-Net on ISBI, each side trained from scratch for the same
wall budget on the same cores, and every prediction scored by one evaluation here.

- BCCD boxes. Ours: `pipeline-train experiment=bccd_yolo +trainer.max_time=<budget>`, then `pipeline-eval` of its
  checkpoint, whose predictions.json is in COCO results format with the image and category ids of the project's
  VOC -> COCO conversion (`pipeline.data.formats.voc_box_dataset`). Peer: Ultralytics `YOLO("yolo26n.yaml")`
  (YOLO26n, the smallest detector of the installed 8.4 and its default model; 2.6 M parameters, 6.1 GFLOPs at
  640) from scratch (pretrained=False) with its defaults otherwise, on the same train/val split written as YOLO txt
  labels beside links to the same images, imgsz = our `data.val_size` (416), device=cpu, `time=` the budget in
  hours (it fits its schedule to it), then `predict(conf=0.001, max_det=100)` on the val images. Both sides'
  results are scored against one ground-truth json (the val split converted once) by pycocotools COCOeval (bbox):
  mAP@[.5:.95], mAP@0.5 and AP per class.
- ISBI membranes. Ours: `pipeline-train experiment=isbi_fcn +trainer.max_time=<budget>` (with `--encoder NAME`
  also `model/backbone=timm model.net.backbone.name=NAME`), then `pipeline-predict` over the held-out val images
  (index masks at the original resolution). Peer: `smp.Unet(encoder_name="tu-NAME", encoder_weights=None,
  classes=2)` (smp's default encoder resnet34 without --encoder; `--peer-encoder` names another) trained by a plain
  PyTorch loop below: the same 24/6 split (`data.holdout`, drawn by the project's own DataModule), batch size,
  input size (`data.val_size`, the images' own 512 px), the data config's kinds of augmentation (flips, quarter
  turns, brightness/contrast), cross-entropy, AdamW with our lr and weight decay, a cosine over the wall budget,
  validation every epoch, stopped at the same budget. Both sides' masks (argmax per pixel, original resolution)
  go through one confusion matrix here against the labels as the project reads them: mIoU, pixel accuracy,
  IoU per class.

Each side runs alone, one after the other (the order turned at each run), in its own process pinned to the same
cores (`--cores`, default this process's) with OMP_NUM_THREADS and torch's intra-op threads = that many cores.
Ultralytics resets torch's threads to cpu_count - 1 when it selects the device: a callback sets them back at the
start of training (its prediction afterwards runs on its own choice; prediction is not timed); its MLflow callback
(on because mlflow is importable) is switched off in its scratch settings. Ultralytics
always trains with 0 loader workers on CPU (it sets workers=0 itself); ours and the smp loop use the data config's
workers ("auto": cores - 1). Ours runs on CPU too (`trainer.accelerator=cpu` first; overrides after `--` win).

Speed, each side by the same rules: training images/s = training images / seconds of the training batches with
their data loading, validation excluded (ours: MLflow `summary/images_per_s`; Ultralytics: callbacks around its
epoch loop; the smp loop: timed directly); s/epoch = wall seconds of the fit (validation included, start-up and
final evaluation not) / epochs started. Wall = the side's whole process(es): start-up, training, final
evaluation and prediction. Under the tables each side's own validation figures are printed as a check of the
scoring here (ours: best/<metric> of its run and pipeline-eval's mAP; the peers' own).

Checkpoints: `--checkpoint best` (default) scores each side's best-on-val checkpoint (ours best.ckpt, Ultralytics
best.pt by its fitness, the smp loop's best val mIoU), `last` the last ones. Both select on the val split that is
also scored here, alike for both sides.

Schedules: both experiments use `model/sched=warmup_cosine`, which ends annealed when `+trainer.max_time` is
spent (Ultralytics fits its schedule to `time=` itself, the smp loop anneals over the budget); their max_epochs
are upper bounds.

The peers come from the optional extra `pip install -e ".[peers]"` (the package never imports them, an
import-linter contract in pyproject.toml; Ultralytics is AGPL-3.0, bench use only). `--peer-python` runs the peer
sides with another interpreter that has them (default: $PEERS_PYTHON, else this one); those processes import
neither `pipeline` nor anything of this repository but this file. Ultralytics runs offline (YOLO_OFFLINE=1, its
font put in a scratch YOLO_CONFIG_DIR from matplotlib's DejaVuSans).

    python bench/peers.py                                   # both datasets, 20 then 10 minutes a side (~2.5 h)
    python bench/peers.py --budget-min 20 --only bccd       # one dataset, one budget
    python bench/peers.py --only isbi --encoder resnet18    # the same timm encoder on both sides
    python bench/peers.py --smoke --peer-encoder tu-resnet18  # 1 minute a side: checks the script end to end
    python bench/peers.py --only bccd -- data.batch_size=16 # Hydra overrides for our runs after --
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

SHARED = harness.ROOT.parent / "shared"
DATASETS = ("bccd", "isbi")
EXPERIMENTS = {"bccd": "bccd_yolo", "isbi": "isbi_fcn"}
YOLO_MODEL = "yolo26n.yaml"  # Ultralytics 8.4's default and smallest current detector (yolo26.yaml at scale n)
SMP_DEFAULT_ENCODER = "resnet34"  # smp.Unet's own default encoder_name
SMOKE_MINUTES = 1.0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- the bench side (project venv): data, our runs, scoring -----------------------------------------------------



@contextlib.contextmanager
def cwd(path: Path):
    """Run inside `path`: the configs' `${paths.root_dir}` is the current directory (`../shared/datasets/…`)."""
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


def our_overrides(name: str, budget_min: float, args) -> list[str]:
    """Everything after `experiment=…` on our command line for this dataset and budget."""
    overrides = ["trainer.accelerator=cpu", f"+trainer.max_time={harness.max_time(budget_min * 60)}"]
    if name == "isbi" and args.encoder:
        overrides += ["model/backbone=timm", f"model.net.backbone.name={args.encoder}"]
    user = list(args.overrides)
    return overrides + user


def run_logged(cmd: list[str], cwd_: Path, env: dict, log: Path, cores: list[int]) -> tuple[int, float]:
    """One process pinned to `cores`, its output appended to `log`: (exit status, wall seconds)."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd_, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
                              preexec_fn=lambda: os.sched_setaffinity(0, cores))  # fmt: skip
    return proc.returncode, time.perf_counter() - start


def pinned_env(base: dict, cores: list[int]) -> dict:
    """`base` with every thread pool sized to the cores."""
    n = str(len(cores))
    return {**base, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def train_ours(project: Path, experiment: str, overrides: list[str], cores: list[int]) -> dict:
    """pipeline-train in a fresh project; its run dir and the speed figures its MLflow run holds."""
    place = harness.Project(project)
    cmd = [*harness.TRAIN, f"experiment={experiment}", *overrides]
    rc, wall = run_logged(cmd, project, pinned_env(place.env, cores), project / "ours.log", cores)
    result = {"cmd": cmd, "rc": rc, "wall_s": wall, "log": str(project / "ours.log")}
    if rc != 0:
        return result
    run = harness.latest_run(place.uri)
    metrics = run.data.metrics
    epochs = [m.value for m in harness.history(place.uri, run.info.run_id, "epoch")]
    (run_dir,) = (project / "outputs" / "train" / "runs").iterdir()
    result.update(
        run_dir=str(run_dir),
        params=metrics.get("summary/params"),
        images_per_s=metrics.get("summary/images_per_s"),
        train_time_s=metrics.get("summary/train_time_s"),
        fit_wall_s=metrics.get("summary/wall_time_s"),
        epochs=int(max(epochs)) + 1 if epochs else 0,
        logged={k: v for k, v in metrics.items() if k.startswith(("val/", "best/"))},
    )
    # What its own validation logged, beside the bench's scores: the best epoch's monitored value, the last epoch's
    result["own_metrics"] = {k: v for k, v in result["logged"].items() if k.startswith("best/val/")}
    result["s_per_epoch"] = result["fit_wall_s"] / result["epochs"] if result["epochs"] else None
    return result


def peer_process(args, project: Path, kind: str, spec: dict, cores: list[int], env: dict) -> dict:
    """This file's worker under the peer interpreter: it writes its result json, read back here."""
    spec_file, out_file = project / f"{kind}_spec.json", project / f"{kind}_result.json"
    spec_file.write_text(json.dumps({**spec, "out": str(out_file), "threads": len(cores)}, indent=1))
    cmd = [args.peer_python, str(Path(__file__).resolve()), "_worker", kind, str(spec_file)]
    rc, wall = run_logged(cmd, project, pinned_env(env, cores), project / "peer.log", cores)
    result = {"cmd": cmd, "rc": rc, "wall_s": wall, "log": str(project / "peer.log")}
    if rc == 0:
        result.update(json.loads(out_file.read_text()))
        fit, epochs = result.get("fit_wall_s"), result.get("epochs")
        result["s_per_epoch"] = fit / epochs if fit and epochs else None
    return result


def yolo_config_dir(base: Path) -> Path:
    """A YOLO_CONFIG_DIR whose Ultralytics/Arial.ttf exists, so that no dataset check downloads it."""
    from matplotlib import font_manager

    folder = base / "yolo_config"
    font = folder / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(font_manager.findfont("DejaVu Sans"), font)
    return folder


# -- BCCD


def bccd_data(base: Path, overrides: list[str]) -> dict:
    """The BCCD splits as our data config reads them: ground-truth json of the val split (written once), and the
    train/val splits as YOLO txt labels beside links to the images, with a dataset yaml for Ultralytics."""
    from pipeline.data.formats import voc_box_dataset

    with cwd(base / "project"):
        data = harness.train_config(f"experiment={EXPERIMENTS['bccd']}", *overrides).data
        root, names = Path(data.root), list(data.class_names)
        splits = {split: voc_box_dataset(root, data[f"{split}_split"], names) for split in ("train", "val")}
        info = {"val_size": int(data.val_size), "batch_size": int(data.batch_size), "workers": data.num_workers}
    folder = base / "bccd_yolo_data"
    categories = splits["val"][1]["categories"]
    category_ids = [c["id"] for c in categories]
    crowd = 0
    for split, (images_dir, dataset) in splits.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
        lines: dict[int, list[str]] = {image["id"]: [] for image in dataset["images"]}
        sizes = {image["id"]: (image["width"], image["height"]) for image in dataset["images"]}
        for ann in dataset["annotations"]:
            if ann["iscrowd"]:  # VOC `difficult`: ignored by the evaluation, not a training box
                crowd += 1
                continue
            (x, y, w, h), (width, height) = ann["bbox"], sizes[ann["image_id"]]
            cls = category_ids.index(ann["category_id"])
            lines[ann["image_id"]].append(
                f"{cls} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}"
            )
        for image in dataset["images"]:
            link = folder / "images" / split / image["file_name"]
            if not link.exists():
                link.symlink_to((images_dir / image["file_name"]).resolve())
            (folder / "labels" / split / f"{Path(image['file_name']).stem}.txt").write_text(
                "\n".join(lines[image["id"]]) + ("\n" if lines[image["id"]] else "")
            )
    names = "".join(f"  {i}: {json.dumps(c['name'])}\n" for i, c in enumerate(categories))
    (folder / "data.yaml").write_text(f"path: {json.dumps(str(folder))}\ntrain: images/train\nval: images/val\n"
                                      f"names:\n{names}")  # fmt: skip
    val = splits["val"][1]
    truth = {"info": {"description": f"BCCD {data.val_split} split ({root})"},
             "images": val["images"], "categories": categories,
             "annotations": [{k: v for k, v in a.items() if k != "origin"} for a in val["annotations"]]}  # fmt: skip
    gt_file = base / "bccd_val_gt.json"
    gt_file.write_text(json.dumps(truth))
    return {**info, "gt": str(gt_file), "yaml": str(folder / "data.yaml"), "category_ids": category_ids,
            "class_names": [c["name"] for c in categories], "crowd_boxes": crowd,
            "val_images": [str(folder / "images" / "val" / i["file_name"]) for i in val["images"]],
            "image_ids": {i["file_name"]: i["id"] for i in val["images"]},
            "train_images": len(splits["train"][1]["images"])}  # fmt: skip


def coco_scores(gt_file: str, results: list[dict]) -> dict:
    """pycocotools COCOeval (bbox) of COCO results against the ground-truth json: mAP@[.5:.95], mAP@0.5, and AP and
    AP50 per class."""
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    finite = [r for r in results if all(math.isfinite(v) for v in [*r["bbox"], r["score"]])]
    if len(finite) != len(results):
        raise ValueError(f"{len(results) - len(finite)} non-finite predictions (pycocotools would count them right)")
    if not finite:  # loadRes crashes on an empty list
        return {"map": 0.0, "map_50": 0.0, **{f"AP/{n}": 0.0 for n in names.values()},
                **{f"AP50/{n}": 0.0 for n in names.values()}, "detections": 0}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in finite])  # loadRes mutates its input
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall, class, area, max dets]
    scores = {"map": float(evaluator.stats[0]), "map_50": float(evaluator.stats[1]), "detections": len(finite)}
    for k, cat_id in enumerate(evaluator.params.catIds):
        for key, p in (("AP", precision[:, :, k, 0, -1]), ("AP50", precision[0, :, k, 0, -1])):
            valid = p[p > -1]
            scores[f"{key}/{names[cat_id]}"] = float(np.mean(valid)) if valid.size else float("nan")
    return scores


def bench_bccd(base: Path, tag: str, budget_min: float, args, data: dict, order: list[str]) -> dict:
    """Ours and Ultralytics on BCCD for one budget: training, predictions on the val split, pycocotools scores."""
    overrides = our_overrides("bccd", budget_min, args)
    sides: dict[str, dict] = {}
    for side in order:
        project = base / f"{tag}-{side}"
        project.mkdir()
        if side == "ours":
            print(f"[{tag}] ours: pipeline-train experiment={EXPERIMENTS['bccd']} {' '.join(overrides)}", flush=True)
            result = train_ours(project, EXPERIMENTS["bccd"], overrides, args.cores)
            if result["rc"] == 0:
                ckpt = Path(result["run_dir"]) / "checkpoints" / f"{args.checkpoint}.ckpt"
                cmd = [sys.executable, "-m", "pipeline.cli.eval", f"ckpt_path={ckpt}", "trainer.accelerator=cpu"]
                env = pinned_env(harness.Project(project).env, args.cores)
                rc, wall = run_logged(cmd, project, env, project / "ours.log", args.cores)
                result["rc"], result["wall_s"] = rc, result["wall_s"] + wall
                if rc == 0:
                    (eval_dir,) = (project / "outputs" / "eval" / "runs").iterdir()
                    result["results"] = json.loads((eval_dir / "predictions.json").read_text())
                    own = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
                    result["own_metrics"] = {f"pipeline-eval {k}": v for k, v in own.items()
                                             if k in ("val/map", "val/map_50") or k.startswith("val/AP/")}  # fmt: skip
        else:
            print(f"[{tag}] peer: Ultralytics {YOLO_MODEL} imgsz={data['val_size']} time={budget_min / 60:.4f} h",
                  flush=True)  # fmt: skip
            spec = {"model": YOLO_MODEL, "data": data["yaml"], "imgsz": data["val_size"], "budget_h": budget_min / 60,
                    "workers": data["workers"], "project": str(project / "runs"), "checkpoint": args.checkpoint,
                    "val_images": data["val_images"], "image_ids": data["image_ids"],
                    "category_ids": data["category_ids"], "train_images": data["train_images"]}  # fmt: skip
            env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(yolo_config_dir(base))}
            result = peer_process(args, project, "yolo", spec, args.cores, env)
        if result["rc"] == 0:
            result["scores"] = coco_scores(data["gt"], result.pop("results"))
        print(f"[{tag}] {side}: exit {result['rc']} after {result['wall_s']:.0f} s, log {result['log']}", flush=True)
        sides[side] = result
    return sides


# -- ISBI


def isbi_data(base: Path, overrides: list[str]) -> dict:
    """The ISBI split our data config makes (the DataModule's own holdout) and what the peer loop copies from it."""
    from hydra.utils import instantiate

    with cwd(base / "project"):
        cfg = harness.train_config(f"experiment={EXPERIMENTS['isbi']}", *overrides)
        module = instantiate(cfg.data, targets="semantic")
        data = cfg.data
        train, val = module.train_files, module.val_files
        if val.get("stems") is None:
            raise SystemExit("bench/peers.py expects the ISBI data config's holdout split (data.val=null).")
        images, masks = Path(train["images"]).resolve(), Path(train["masks"]).resolve()
        values = {int(k): int(v) for k, v in (data["values"] or {}).items()}
        info = {
            "images": str(images), "masks": str(masks), "values": values,
            "suffixes": {p.stem: p.name for p in images.iterdir()},
            "mask_suffixes": {p.stem: p.name for p in masks.iterdir()},
            "train_stems": list(train["stems"]), "val_stems": list(val["stems"]),
            "num_classes": int(data.num_classes), "class_names": list(data.class_names),
            "ignore_index": int(data.ignore_index), "batch_size": int(data.batch_size), "size": int(data.val_size),
            "workers": data.num_workers, "seed": int(cfg.seed),
            "lr": float(cfg.model.optimizer.lr), "weight_decay": float(cfg.model.optimizer.weight_decay),
            "eta_min": float(cfg.model.scheduler.get("eta_min", 0.0) or 0.0),
        }  # fmt: skip
    folder = base / "isbi_val_images"  # pipeline-predict's input: the held-out images only
    folder.mkdir(exist_ok=True)
    for stem in info["val_stems"]:
        link = folder / info["suffixes"][stem]
        if not link.exists():
            link.symlink_to(images / info["suffixes"][stem])
    info["val_folder"] = str(folder)
    return info


def truth_masks(data: dict) -> dict:
    """The val labels as the project reads them (MaskFolderSource: value mapping and checks), by stem."""
    from pipeline.data.mask_folders import MaskFolderSource

    source = MaskFolderSource(data["images"], data["masks"], data["num_classes"], data["ignore_index"],
                              data["values"], data["class_names"], data["val_stems"])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        return {image.stem: source.load(i)[1] for i, (image, _) in enumerate(source.pairs)}


def mask_scores(truth: dict, folder: Path, num_classes: int, ignore_index: int, class_names: list[str]) -> dict:
    """One confusion matrix over every val image (predicted index PNGs in `folder`, by stem): mIoU, pixel accuracy
    and IoU per class, void pixels excluded."""
    import numpy as np
    from PIL import Image

    confmat = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: true class, columns: predicted
    for stem, labels in truth.items():
        pred = np.asarray(Image.open(folder / f"{stem}.png")).astype(np.int64)
        if pred.shape != labels.shape:
            raise ValueError(f"{folder / stem}.png is {pred.shape}, its label {labels.shape}")
        keep = labels != ignore_index
        confmat += np.bincount(labels[keep].astype(np.int64) * num_classes + pred[keep],
                               minlength=num_classes**2).reshape(num_classes, num_classes)  # fmt: skip
    diag = np.diag(confmat).astype(np.float64)
    union = confmat.sum(0) + confmat.sum(1) - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, diag / union, np.nan)
    scores = {"mIoU": float(np.nanmean(iou)), "pixel_acc": float(diag.sum() / max(confmat.sum(), 1))}
    scores.update({f"IoU/{name}": float(v) for name, v in zip(class_names, iou, strict=True)})
    return scores


def bench_isbi(base: Path, tag: str, budget_min: float, args, data: dict, order: list[str]) -> dict:
    """Ours and the smp U-Net on ISBI for one budget: training, val masks, one confusion matrix."""
    overrides = our_overrides("isbi", budget_min, args)
    truth = truth_masks(data)
    encoder = args.peer_encoder or (f"tu-{args.encoder}" if args.encoder else SMP_DEFAULT_ENCODER)
    sides: dict[str, dict] = {}
    for side in order:
        project = base / f"{tag}-{side}"
        project.mkdir()
        if side == "ours":
            print(f"[{tag}] ours: pipeline-train experiment={EXPERIMENTS['isbi']} {' '.join(overrides)}", flush=True)
            result = train_ours(project, EXPERIMENTS["isbi"], overrides, args.cores)
            if result["rc"] == 0:
                ckpt = Path(result["run_dir"]) / "checkpoints" / f"{args.checkpoint}.ckpt"
                cmd = [sys.executable, "-m", "pipeline.cli.predict", f"ckpt_path={ckpt}", f"input={data['val_folder']}",
                       "device=cpu"]  # fmt: skip
                env = pinned_env(harness.Project(project).env, args.cores)
                rc, wall = run_logged(cmd, project, env, project / "ours.log", args.cores)
                result["rc"], result["wall_s"] = rc, result["wall_s"] + wall
                if rc == 0:
                    (predict_dir,) = (project / "outputs" / "predict" / "runs").iterdir()
                    result["masks"] = str(predict_dir / "masks")
        else:
            print(f"[{tag}] peer: smp.Unet(encoder_name={encoder!r}), budget {budget_min:g} min", flush=True)
            spec = {**data, "encoder": encoder, "budget_s": budget_min * 60, "checkpoint": args.checkpoint,
                    "masks_out": str(project / "masks")}  # fmt: skip
            if args.peer_lr:
                spec["lr"] = args.peer_lr
            result = peer_process(args, project, "smp", spec, args.cores, dict(os.environ))
        if result["rc"] == 0:
            result["scores"] = mask_scores(truth, Path(result["masks"]), data["num_classes"], data["ignore_index"],
                                           data["class_names"])  # fmt: skip
        print(f"[{tag}] {side}: exit {result['rc']} after {result['wall_s']:.0f} s, log {result['log']}", flush=True)
        sides[side] = result
    return sides


# -- report


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ratio(ours, peer) -> str:
    if ours is None or peer is None or not peer or any(isinstance(v, float) and math.isnan(v) for v in (ours, peer)):
        return "–"
    return f"{ours / peer:.3f}"


def table(name: str, budget_min: float, sides: dict, metrics: list[tuple[str, str]]) -> str:
    """A markdown table: each metric for ours and the peer and the ratio ours / peer."""
    ours, peer = sides.get("ours", {}), sides.get("peer", {})
    if ours.get("rc") != 0 or peer.get("rc") != 0:
        return (f"{name}, {budget_min:g} min: failed (ours exit {ours.get('rc')}, peer exit {peer.get('rc')}); "
                f"logs {ours.get('log')} {peer.get('log')}")  # fmt: skip
    rows = [(label, ours["scores"].get(key), peer["scores"].get(key), 4) for key, label in metrics]
    rows += [
        ("training images/s", ours.get("images_per_s"), peer.get("images_per_s"), 2),
        ("s/epoch (fit wall / epochs)", ours.get("s_per_epoch"), peer.get("s_per_epoch"), 1),
        ("epochs started", ours.get("epochs"), peer.get("epochs"), 0),
        ("training s (batches + loading)", ours.get("train_time_s"), peer.get("train_time_s"), 0),
        ("wall s (whole side)", ours.get("wall_s"), peer.get("wall_s"), 0),
        ("parameters (M)", (ours.get("params") or 0) / 1e6, (peer.get("params") or 0) / 1e6, 2),
    ]
    lines = [f"| {name}, {budget_min:g} min | ours | peer | ours / peer |", "|---|---:|---:|---:|"]
    for label, o, p, digits in rows:
        o_s, p_s = (_fmt(float(v), digits) if isinstance(v, int | float) else _fmt(v) for v in (o, p))
        lines.append(f"| {label} | {o_s} | {p_s} | {_ratio(o, p)} |")
    return "\n".join(lines)


def main() -> None:
    parser = harness.arguments(__doc__, summary=False)
    parser.add_argument("--budget-min", type=float, nargs="+", default=[20.0, 10.0],
                        help="training budgets in minutes, each side each (default: 20 10)")  # fmt: skip
    parser.add_argument("--only", choices=DATASETS, action="append", help="run only this dataset (repeatable)")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_MINUTES:g}-minute budgets: a quick check")
    parser.add_argument("--encoder", help="timm encoder of both ISBI sides (ours: model/backbone=timm)")
    parser.add_argument("--peer-encoder", help=f"smp encoder_name of the peer U-Net (default: tu-<--encoder>, "
                        f"without --encoder smp's default {SMP_DEFAULT_ENCODER})")  # fmt: skip
    parser.add_argument("--peer-lr", type=float, help="the smp loop's AdamW lr (default: our optimizer's)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint is scored")
    parser.add_argument("--cores", help="cores every side runs on, e.g. 0,1 (default: this process's)")
    parser.add_argument("--peer-python", default=os.environ.get("PEERS_PYTHON", sys.executable),
                        help="interpreter with ultralytics and segmentation_models_pytorch (default: $PEERS_PYTHON, "
                        "else this one)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep every run, log and prediction here (a new folder)")
    parser.add_argument("--table", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of our runs (after --)")
    args = harness.parse(parser)
    args.cores = (sorted(int(c) for c in args.cores.split(",")) if args.cores
                  else sorted(os.sched_getaffinity(0)))  # fmt: skip
    budgets = [SMOKE_MINUTES] if args.smoke else args.budget_min
    names = [n for n in DATASETS if n in (args.only or DATASETS)]
    if not (SHARED / "datasets").is_dir():
        sys.exit(f"{SHARED / 'datasets'} is absent: this benchmark needs the real datasets beside the repository.")
    probe = subprocess.run([args.peer_python, "-c", "import ultralytics, segmentation_models_pytorch as s, torch; "
                            "print(ultralytics.__version__, s.__version__, torch.__version__)"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if probe.returncode != 0:
        sys.exit(f"{args.peer_python} cannot import the peers: pip install -e '.[peers]' or give --peer-python.\n"
                 f"{probe.stderr[-2000:]}")  # fmt: skip
    versions = dict(zip(("ultralytics", "segmentation_models_pytorch", "torch (peers)"), probe.stdout.split(),
                        strict=False))  # fmt: skip
    print(f"peers: {versions}; cores {args.cores}; budgets {budgets} min; checkpoint {args.checkpoint}", flush=True)

    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        base = args.workdir.resolve() if args.workdir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        if any(base.glob("*-ours")) or any(base.glob("*-peer")):
            sys.exit(f"{base} holds earlier runs: give --workdir a new or empty folder.")
        if not (base / "shared").exists():
            (base / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)  # ${paths.root_dir}/../shared
        (base / "project").mkdir(exist_ok=True)  # where the configs are composed (../shared beside it)
        data = {}
        if "bccd" in names:
            data["bccd"] = bccd_data(base, list(args.overrides))
        if "isbi" in names:
            isbi_extra = ["model/backbone=timm", f"model.net.backbone.name={args.encoder}"] if args.encoder else []
            data["isbi"] = isbi_data(base, [*isbi_extra, *args.overrides])
        for name in data:  # "auto" loader workers as ours gets them on these cores
            if data[name]["workers"] == "auto":
                data[name]["workers"] = max(0, min(4, len(args.cores) - 1))
            data[name]["workers"] = int(data[name]["workers"])

        results, tables, turn = [], [], 0
        for budget in budgets:
            for name in names:
                tag = f"{name}-{budget:g}m"
                order = harness.turned(["ours", "peer"], turn)
                turn += 1
                if name == "bccd":
                    sides = bench_bccd(base, tag, budget, args, data["bccd"], order)
                    classes = data["bccd"]["class_names"]
                    metrics = [("map", "mAP@[.5:.95]"), ("map_50", "mAP@0.5"),
                               *((f"AP/{c}", f"AP {c}") for c in classes),
                               *((f"AP50/{c}", f"AP50 {c}") for c in classes)]  # fmt: skip
                else:
                    sides = bench_isbi(base, tag, budget, args, data["isbi"], order)
                    metrics = [("mIoU", "mIoU"), ("pixel_acc", "pixel accuracy"),
                               *((f"IoU/{c}", f"IoU {c}") for c in data["isbi"]["class_names"])]  # fmt: skip
                results.append({"dataset": name, "budget_min": budget, "order": order, "sides": sides})
                tables.append(table(name, budget, sides, metrics))
                print("\n" + tables[-1] + "\n", flush=True)
                (base / "results.json").write_text(json.dumps(results, indent=1, default=str))

        print(f"\nOurs against the peers, each trained alone for the budget on cores {args.cores} "
              f"({args.checkpoint} checkpoints; peers {versions})\n")  # fmt: skip
        text = "\n\n".join(tables)
        print(text)
        for result in results:
            for side, r in result["sides"].items():
                own = r.get("own_metrics") or r.get("own_val")
                if r.get("torch_threads_in_training"):
                    print(f"{result['dataset']} {result['budget_min']:g} min {side}: torch threads in training "
                          f"{r['torch_threads_in_training']}")  # fmt: skip
                if own:
                    print(
                        f"{result['dataset']} {result['budget_min']:g} min {side}, "
                        f"{r.get('own_note', 'its own validation')}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in sorted(own.items()) if isinstance(v, float))
                    )
        if args.table:
            args.table.write_text(text + "\n")
        print(f"\nresults: {base / 'results.json'}" + ("" if args.workdir else " (temporary: --workdir keeps it)"))
    if any(r["rc"] != 0 for result in results for r in result["sides"].values()):
        sys.exit(1)


# ---- the peer side (peer interpreter): nothing of the repository is imported here ------------------------------


def worker_yolo(spec: dict) -> dict:
    """Ultralytics YOLO from its yaml, trained with its defaults for the budget, then its val predictions as COCO
    results with the ground truth's ids; its speed measured by callbacks."""
    import torch
    from ultralytics import YOLO, settings

    # Its MLflow callback (on when mlflow is importable, as here through the project's deps; a plain
    # `pip install ultralytics` has no mlflow) would log into a store in the working folder: off, in the scratch
    # YOLO_CONFIG_DIR's settings only.
    settings.update({"mlflow": False})
    threads = spec["threads"]
    torch.set_num_threads(threads)
    clock = time.perf_counter
    stats = {"train_time_s": 0.0, "images": 0, "epochs": 0, "fits": 0, "fit_start": None, "fit_end": None,
             "threads": set()}  # fmt: skip
    state = {"tic": 0.0, "batches": 0}

    def on_pretrain_routine_start(trainer) -> None:  # after select_device set its own thread count
        torch.set_num_threads(threads)

    def on_train_start(trainer) -> None:
        torch.set_num_threads(threads)
        stats["fit_start"] = clock()

    def on_train_epoch_start(trainer) -> None:
        state["tic"], state["batches"] = clock(), 0

    def on_train_batch_start(trainer) -> None:  # the batch that meets the time limit ends the loop before its end
        state["batches"] += 1

    def on_train_epoch_end(trainer) -> None:  # before the epoch's validation
        stats["train_time_s"] += clock() - state["tic"]
        loader = trainer.train_loader
        full = state["batches"] >= len(loader)
        stats["images"] += len(loader.dataset) if full else state["batches"] * trainer.batch_size
        stats["epochs"] += 1
        stats["threads"].add(torch.get_num_threads())

    def on_fit_epoch_end(trainer) -> None:  # after each epoch's validation; final_eval calls it once more
        if stats["fits"] < stats["epochs"]:
            stats["fits"] += 1
            stats["fit_end"] = clock()

    model = YOLO(spec["model"])
    hooks = (on_pretrain_routine_start, on_train_start, on_train_epoch_start, on_train_batch_start, on_train_epoch_end,
             on_fit_epoch_end)  # fmt: skip
    for hook in hooks:
        model.add_callback(hook.__name__, hook)
    params = sum(p.numel() for p in model.model.parameters())
    metrics = model.train(data=spec["data"], imgsz=spec["imgsz"], device="cpu", time=spec["budget_h"],
                          workers=spec["workers"], project=spec["project"], name="train", exist_ok=True,
                          pretrained=False)  # fmt: skip
    trainer = model.trainer
    weights = trainer.best if spec["checkpoint"] == "best" and trainer.best.exists() else trainer.last
    net = YOLO(weights)
    results = []
    for r in net.predict(source=spec["val_images"], imgsz=spec["imgsz"], conf=0.001, max_det=100, device="cpu",
                         stream=True, verbose=False):  # fmt: skip
        image_id = spec["image_ids"][Path(r.path).name]
        boxes = r.boxes
        for (x1, y1, x2, y2), score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(),
                                                strict=True):  # fmt: skip
            results.append({"image_id": image_id, "category_id": spec["category_ids"][int(cls)],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})  # fmt: skip
    own = getattr(metrics, "results_dict", None) or {}
    fit = stats["fit_end"] - stats["fit_start"] if stats["fit_end"] and stats["fit_start"] else None
    return {"results": results, "params": params, "weights": str(weights), "epochs": stats["epochs"],
            "train_time_s": stats["train_time_s"], "images": stats["images"], "fit_wall_s": fit,
            "images_per_s": stats["images"] / stats["train_time_s"] if stats["train_time_s"] else None,
            "torch_threads_in_training": sorted(stats["threads"]),
            "own_note": "its final validation of best.pt (max_det 300)",
            "own_val": {k: float(v) for k, v in own.items()}}  # fmt: skip


def worker_smp(spec: dict) -> dict:
    """smp's U-Net trained by a plain PyTorch loop for the budget (cosine over the wall time, validation every
    epoch), then index masks of the val images at their own resolution."""
    import numpy as np
    import segmentation_models_pytorch as smp
    import torch
    import torch.nn.functional as F
    from PIL import Image

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    num_classes, ignore, values = spec["num_classes"], spec["ignore_index"], spec["values"]
    lut = None
    if values:
        lut = np.full(max(int(k) for k in values) + 1, ignore, dtype=np.int64)
        for k, v in values.items():
            lut[int(k)] = v
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def read(stem: str) -> tuple[np.ndarray, np.ndarray]:
        rgb = np.asarray(Image.open(Path(spec["images"]) / spec["suffixes"][stem]).convert("RGB"))
        raw = np.asarray(Image.open(Path(spec["masks"]) / spec["mask_suffixes"][stem])).astype(np.int64)
        return rgb, (lut[raw] if lut is not None else raw)

    def tensor(rgb: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255 - mean) / std

    class Train(torch.utils.data.Dataset):
        """The training images with the data config's kinds of augmentation (torch's RNG: seeded per loader worker
        and epoch)."""

        def __len__(self) -> int:
            return len(spec["train_stems"])

        def __getitem__(self, index: int):
            rgb, labels = read(spec["train_stems"][index])
            r = torch.rand(6).tolist()
            if r[0] < 0.5:
                rgb, labels = rgb[:, ::-1], labels[:, ::-1]
            if r[1] < 0.5:
                rgb, labels = rgb[::-1], labels[::-1]
            if r[2] < 0.5:
                k = int(r[3] * 4)
                rgb, labels = np.rot90(rgb, k), np.rot90(labels, k)
            if r[4] < 0.5:  # brightness and contrast +-0.2
                alpha, beta = 1 + (torch.rand(1).item() - 0.5) * 0.4, (r[5] - 0.5) * 0.4 * 255
                rgb = np.clip(rgb.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
            return tensor(rgb), torch.from_numpy(np.ascontiguousarray(labels))

    def padded(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """x [B, 3, H, W] padded to multiples of 32 (the encoder's stride) and its H, W."""
        h, w = x.shape[-2:]
        return F.pad(x, (0, -w % 32, 0, -h % 32), mode="reflect"), h, w

    size = spec["size"]
    workers = spec["workers"]
    loader = torch.utils.data.DataLoader(Train(), batch_size=spec["batch_size"], shuffle=True, drop_last=False,
                                         num_workers=workers, persistent_workers=workers > 0)  # fmt: skip
    val = [read(stem) for stem in spec["val_stems"]]
    if any(rgb.shape[:2] != (size, size) for rgb, _ in val):
        print(f"note: val images are not {size} px square; the U-Net sees them at their own size (padded to 32)")
    model = smp.Unet(encoder_name=spec["encoder"], encoder_weights=None, classes=num_classes)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    budget, lr0, eta_min = spec["budget_s"], spec["lr"], spec["eta_min"]

    def predict(rgb: np.ndarray) -> np.ndarray:
        x, h, w = padded(tensor(rgb)[None])
        return model(x)[0, :, :h, :w].argmax(0).numpy().astype(np.uint8)

    clock = time.perf_counter
    start = clock()
    train_time, images, epochs, best, best_state, history = 0.0, 0, 0, -1.0, None, []
    stop = False
    while not stop:
        model.train()
        tic = clock()
        for x, y in loader:
            fraction = min(1.0, (clock() - start) / budget)
            for group in optimizer.param_groups:
                group["lr"] = eta_min + (lr0 - eta_min) * 0.5 * (1 + math.cos(math.pi * fraction))
            x, h, w = padded(x)
            loss = F.cross_entropy(model(x)[:, :, :h, :w], y, ignore_index=ignore)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(y)
            now = clock()
            train_time += now - tic
            tic = now
            if now - start >= budget:
                stop = True
                break
        epochs += 1
        model.eval()
        confmat = np.zeros((num_classes, num_classes), dtype=np.int64)
        with torch.inference_mode():
            for rgb, labels in val:
                keep = labels != ignore
                confmat += np.bincount(labels[keep] * num_classes + predict(rgb)[keep],
                                       minlength=num_classes**2).reshape(num_classes, num_classes)  # fmt: skip
        diag = np.diag(confmat)
        union = confmat.sum(0) + confmat.sum(1) - diag
        miou = float(np.mean(diag[union > 0] / union[union > 0]))
        history.append(round(miou, 4))
        if miou > best:
            best = miou
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stop = stop or clock() - start >= budget
    fit_wall = clock() - start
    if spec["checkpoint"] == "best" and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    out = Path(spec["masks_out"])
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for stem, (rgb, _) in zip(spec["val_stems"], val, strict=True):
            Image.fromarray(predict(rgb)).save(out / f"{stem}.png")
    print(f"smp loop: {epochs} epochs, val mIoU per epoch {history}")
    return {"masks": str(out), "params": params, "epochs": epochs, "train_time_s": train_time, "images": images,
            "images_per_s": images / train_time if train_time else None, "fit_wall_s": fit_wall,
            "torch_threads_in_training": [torch.get_num_threads()],
            "own_val": {"best val mIoU": best, "last val mIoU": history[-1] if history else float("nan")}}  # fmt: skip


def worker(kind: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = {"yolo": worker_yolo, "smp": worker_smp}[kind](spec)
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
