"""LightningDataModules over COCO files: semantic masks, boxes or instance masks; letterboxed multi-scale batches.

The task decides what a sample carries (`targets`): "semantic" gives {"image": [3, S, S] float in 0..1,
"mask": [S, S] long}; "boxes" gives the image with its boxes in letterboxed pixels plus what evaluation in
original pixels needs (see `BoxSamples`); "instances" adds one mask per box.
"""

from __future__ import annotations

import multiprocessing.queues
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.coco import CocoBoxSource, CocoInstanceSource, CocoSemanticSource
from pipeline.data.formats import voc_box_dataset, voc_ids, voc_instance_dataset, yolo_dataset
from pipeline.data.mask_folders import MaskFolderSource, _files
from pipeline.data.samplers import MultiScaleBatchSampler, SampleKey, ShardedSampler
from pipeline.data.shapes import ShapesSpec, ensure_shapes
from pipeline.data.transforms import Mosaic, apply, apply_boxes, compose, letterbox, reseed
from pipeline.errors import ConfigError
from pipeline.ops.boxes import letterbox_scale

TARGETS = ("semantic", "boxes", "instances")


def _key(key: int | tuple[int, int] | SampleKey, size: int) -> SampleKey:
    """A sampler's key as it is; an index or an (index, size) pair: augmentation seeded by the index."""
    if isinstance(key, SampleKey):
        return key
    index, size = key if isinstance(key, tuple) else (key, size)
    return SampleKey(index, size, index)


class SegmentationSamples(Dataset):
    """Augmented, letterboxed samples of a source; a key is a `SampleKey` from the sampler, an index or (index, size).

    The augmentation is seeded per sample by its key, so a sample's pixels do not depend on which loader worker
    made it, nor on what that worker made before. A sample: "image" [3, S, S], "mask" [S, S] long (letterboxed,
    padding void); with `keep_original` (validation) also "orig_mask" [H, W]: the mask at the image's own size, which
    the FCN paper's protocol scores predictions against.
    """

    def __init__(self, source: CocoSemanticSource, augment: A.Compose, size: int, ignore_index: int) -> None:
        self.source, self.augment, self.size, self.ignore_index = source, augment, size, ignore_index
        self.keep_original = False  # set for the validation split by the DataModule

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int] | SampleKey) -> dict[str, torch.Tensor]:
        index, size, seed = _key(key, self.size)
        image, mask = self.source.load(index)
        reseed(self.augment, seed)
        image, mask = apply(self.augment, image, mask)
        original = mask
        image, mask = apply(letterbox(size, self.ignore_index), image, mask)
        sample = {"image": _to_tensor(image), "mask": torch.from_numpy(np.ascontiguousarray(mask)).long()}
        if self.keep_original:
            sample["orig_mask"] = torch.from_numpy(np.ascontiguousarray(original)).long()
        return sample

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Images and letterboxed masks stacked ([B, 3, S, S], [B, S, S]); original masks (sizes differ) a list."""
        batch = torch.utils.data.default_collate([{k: v for k, v in s.items() if k != "orig_mask"} for s in samples])
        if samples and "orig_mask" in samples[0]:
            batch["orig_mask"] = [s["orig_mask"] for s in samples]
        return batch


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    """Boxes [N, 4] x, y, w, h -> x1, y1, x2, y2."""
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float [3, H, W] in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


class BoxSamples(Dataset):
    """Augmented, letterboxed samples with boxes; keys as for `SegmentationSamples`.

    A sample: "image" [3, S, S]; "boxes" [N, 4] (x1, y1, x2, y2 letterboxed pixels), "labels" [N] (1..K) and
    "iscrowd" [N] after augmentation; "image_id" and "scale" (sx, sy), "orig_size" (H, W) to map predictions
    back; "gt": the image's annotations untouched (boxes xywh in original pixels, labels, iscrowd, area), the
    ground truth COCO evaluation compares against. From a `CocoInstanceSource` a sample also has "masks" uint8
    [N, S, S] (letterboxed, one per box) and "gt" has "masks" bool [N, H, W] (original pixels).

    With `mosaic` (set for the training split by the DataModule; box targets only) a share `mosaic.p` of the samples
    starts as a mosaic of the image and `mosaic.others` more, S x S, before the augmentation; whether, which images
    and the mosaic's own draws all come from the sample's seed. Its "gt", "scale" and "orig_size" stay the primary
    image's / the mosaic's (only validation samples are evaluated).
    """

    def __init__(self, source: CocoBoxSource | CocoInstanceSource, augment: A.Compose, size: int) -> None:
        self.source, self.augment, self.size = source, augment, size
        self.mosaic: Mosaic | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _mosaic_partners(self, index: int, seed: int) -> list[int]:
        """The other images of sample `index`'s mosaic, drawn from its seed (a stream of its own); [] for none."""
        draw = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        if self.mosaic is None or draw.random() >= self.mosaic.p:
            return []
        others = np.delete(np.arange(len(self)), index)
        return draw.choice(others, self.mosaic.others, replace=len(others) < self.mosaic.others).tolist()

    def __getitem__(self, key: int | tuple[int, int] | SampleKey) -> dict:
        index, size, seed = _key(key, self.size)
        image, ann = self.source.load(index)
        xyxy = _xyxy(ann["boxes"])
        fields = {"labels": ann["labels"], "iscrowd": ann["iscrowd"]}
        masks = ann.get("masks")
        partners = self._mosaic_partners(index, seed)
        if partners:  # the mosaic's size is the batch's: the letterbox below leaves it as it is
            loaded = [self.source.load(i) for i in partners]
            images = [image, *(other for other, _ in loaded)]
            boxes = [xyxy, *(_xyxy(other["boxes"]) for _, other in loaded)]
            out = self.mosaic(size, seed, images, boxes, **{
                name: [values, *(other[name] for _, other in loaded)] for name, values in fields.items()
            })  # fmt: skip
            image, xyxy, fields = out["image"], out["boxes"], {name: out[name] for name in fields}
        reseed(self.augment, seed)
        out = apply_boxes(self.augment, image, xyxy, masks, **fields)
        height, width = out["image"].shape[:2]
        out = apply_boxes(letterbox(size, 0, boxes=True), out["image"], out["boxes"], out.get("masks"), **{
            k: out[k] for k in ("labels", "iscrowd")
        })  # fmt: skip
        sample = {
            "image": _to_tensor(out["image"]),
            "boxes": torch.from_numpy(out["boxes"]),
            "labels": torch.from_numpy(out["labels"]),
            "iscrowd": torch.from_numpy(out["iscrowd"]).bool(),
            "image_id": ann["image_id"],
            "scale": letterbox_scale(height, width, size),
            "orig_size": (height, width),
            "gt": {k: torch.from_numpy(ann[k]) for k in ("boxes", "labels", "iscrowd", "area")},
        }
        if masks is not None:
            sample["masks"] = torch.from_numpy(np.ascontiguousarray(out["masks"]))
            sample["gt"]["masks"] = torch.from_numpy(masks).bool()
        return sample

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Stack the images [B, 3, S, S]; every other field becomes a list of B per-image values."""
        batch = {key: [s[key] for s in samples] for key in samples[0]}
        batch["image"] = torch.stack(batch["image"])
        return batch


def _exit_on_send_error(error: BaseException, obj: object) -> None:
    """A batch this worker cannot send ends the worker, so the loader raises in the main process, never hangs.

    multiprocessing's queue feeder thread only prints such errors (pickling, or sharing a tensor's file descriptor
    through a socket in $TMPDIR) and drops the batch; the main process would then wait for it forever.
    """
    traceback.print_exception(error)
    hint = " Set TMPDIR to a shorter directory." if "AF_UNIX path too long" in str(error) else ""
    print(f"DataLoader worker {os.getpid()} could not send a batch ({type(error).__name__}: {error}); exiting.{hint}",
          file=sys.stderr, flush=True)  # fmt: skip
    os._exit(1)


def _worker_init(_: int) -> None:
    # This worker process's queue: turn a batch it cannot send into a dead worker the loader reports.
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_exit_on_send_error)
    # OpenCV's own thread pool inside every loader worker would oversubscribe the cores.
    cv2.setNumThreads(0)
    # A SIGTERM to the whole process group (scancel, systemd) is the training process's to handle: it stops at the
    # next batch and shuts its workers down; a worker killed by it first would fail the run instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a cgroup)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_num_workers(processes: int = 1) -> int:
    """Loader workers per training process: the cores left after one per training process, at most 4."""
    return max(0, min(4, usable_cores() // max(1, processes) - 1))


class CocoDataModule(pl.LightningDataModule):
    """COCO instances files (train/val image folder + annotation json) as semantic masks, boxes or instances.

    `targets` is set by the task ("semantic", "boxes" or "instances"), not by the data config; `bbox_params`
    filters boxes (and their masks) after augmentation (albumentations' min_visibility, min_area, ...); `mosaic`
    ({"p": share of training samples, further `A.Mosaic` settings}, box targets only; None: off) makes mosaics of
    training images before `train_transforms` (`pipeline.data.transforms.Mosaic`, `BoxSamples`);
    `check_cache`: the folder where image checks that passed are remembered by a fingerprint of the files
    (`pipeline.data.check_cache`), None to decode every image on every run.
    """

    def __init__(
        self,
        train: dict,
        val: dict,
        num_classes: int,
        class_names: Sequence[str],
        ignore_index: int = 255,
        batch_size: int = 16,
        num_workers: int | str = "auto",
        train_sizes: Sequence[int] = (128,),
        size_every: int = 10,
        val_size: int = 128,
        train_transforms: Sequence[A.BasicTransform] = (),
        val_transforms: Sequence[A.BasicTransform] = (),
        bbox_params: dict | None = None,
        mosaic: dict | None = None,
        seed: int = 0,
        targets: str = "semantic",
        parallel_jobs: int = 1,
        check_cache: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if targets not in TARGETS:
            raise ValueError(f"targets={targets!r}: choose one of {', '.join(TARGETS)}")
        if len(class_names) != num_classes:
            raise ValueError(f"data.class_names has {len(class_names)} names but data.num_classes is {num_classes}")
        self.train_files, self.val_files = dict(train), dict(val)
        self.num_classes, self.class_names, self.ignore_index = num_classes, list(class_names), ignore_index
        self.batch_size, self.num_workers, self.parallel_jobs = batch_size, num_workers, parallel_jobs
        self.train_sizes, self.size_every, self.val_size = list(train_sizes), size_every, val_size
        moving = [type(t).__name__ for t in val_transforms if not isinstance(t, A.ImageOnlyTransform)]
        if targets != "semantic" and moving:
            raise ConfigError(
                f"data.val_transforms has {', '.join(moving)}, which move(s) pixels: detection is scored against the "
                "annotation file's boxes in original pixels, so validation allows only colour transforms."
            )
        boxes = (bbox_params or {}) if targets != "semantic" else None
        # Seeded per sample by the sampler's keys (from `seed`, the epoch and the index), not here.
        self.train_augment = compose(train_transforms, bbox_params=boxes)
        self.val_augment = compose(val_transforms, bbox_params=boxes)
        if mosaic is not None and targets != "boxes":
            raise ConfigError(
                f"data.mosaic is set, but this model trains on {targets} targets: mosaics are made for box targets "
                "only (albumentations' Mosaic, 2.0.8, assembles one mask per image, not one per instance). Set "
                "data.mosaic=null."
            )
        self.mosaic = Mosaic(bbox_params=boxes, **mosaic) if mosaic is not None else None
        self.seed, self.targets, self.check_cache = seed, targets, check_cache
        self.train_set: SegmentationSamples | BoxSamples | None = None
        self.val_set: SegmentationSamples | BoxSamples | None = None
        self._reported = False  # the data check's summary is printed once
        self._resume: tuple[int, int] | None = None  # (epoch, batches trained) from a mid-epoch checkpoint

    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch (saved in every checkpoint): a resume continues at the next batch.

        Lightning restores a plain DataLoader at the start of its epoch; the batches the checkpoint had trained
        come from Lightning's own count, which includes the batch whose end wrote the checkpoint.
        """
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Remember a checkpoint's position; the training loader made next starts its epoch there."""
        if state:
            self._resume = (state["epoch"], state["batches"])
            # True for a plain DataLoader, not for ours: its sampler skips the batches already trained.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def _samples(self, files: dict, augment: A.Compose, size: int) -> SegmentationSamples | BoxSamples:
        """The samples of one split, in the form `targets` asks for; the file's categories must fit num_classes."""
        images, annotations = self._annotations(files)
        if self.targets != "semantic":
            kind = CocoInstanceSource if self.targets == "instances" else CocoBoxSource
            source = kind(images, annotations, self.check_cache)
            samples = BoxSamples(source, augment, size)
        else:
            source = CocoSemanticSource(images, annotations, self.ignore_index, self.check_cache)
            samples = SegmentationSamples(source, augment, size, self.ignore_index)
        if len(source.label_of) + 1 != self.num_classes:
            raise ConfigError(
                f"{source.report.name} has {len(source.label_of)} categories, so data.num_classes must be "
                f"{len(source.label_of) + 1} (background + categories), not {self.num_classes}."
            )
        names = [source.coco.cats[c]["name"] for c in source.category_ids]
        if names != self.class_names[1:]:
            raise ConfigError(f"{source.report.name} names its categories (in id order) {names}, but "
                              f"data.class_names[1:] is {self.class_names[1:]}: labels would be misnamed.")  # fmt: skip
        return samples

    def _annotations(self, files: dict) -> tuple[Path, str | Path | dict]:
        """A split's image folder and its COCO annotations (a file, or a dataset dict converted from another format)."""
        return Path(files["images"]), files["annotations"]

    def setup(self, stage: str | None = None) -> None:
        """Read the annotation files (every rank); train and val must share one label space."""
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._samples(self.train_files, self.train_augment, max(self.train_sizes))
            if self.mosaic is not None:  # box targets only (checked in __init__)
                if len(self.train_set) < 2:
                    raise ConfigError(
                        f"data.mosaic is set, but {self.train_set.source.report.name} has {len(self.train_set)} "
                        "training image(s): a mosaic needs at least 2. Set data.mosaic=null."
                    )
                self.train_set.mosaic = self.mosaic
        if self.val_set is None:
            self.val_set = self._samples(self.val_files, self.val_augment, self.val_size)
            if isinstance(self.val_set, SegmentationSamples):  # scored at each image's own resolution
                self.val_set.keep_original = True
        if self._rank_world()[0] == 0 and not self._reported:
            for samples in (self.train_set, self.val_set):
                if samples is not None:
                    samples.source.report.print()
            self._reported = True
        if self.train_set is not None:
            train, val = self.train_set.source.category_ids, self.val_set.source.category_ids
            if train != val:
                raise ConfigError(
                    f"{self.train_set.source.report.name} has category ids {train} but "
                    f"{self.val_set.source.report.name} has {val}: labels 1..K would mean different classes in "
                    "training and validation."
                )

    def train_box_sizes(self, size: int) -> np.ndarray:
        """(w, h) [N, 2] of the training boxes letterboxed to `size`: what anchor k-means clusters."""
        if self.train_set is None or self.targets == "semantic":
            raise RuntimeError("train_box_sizes needs box targets and setup('fit') first")
        return self.train_set.source.box_sizes(size)

    @property
    def category_ids(self) -> list[int]:
        """The annotation file's category id of each label 1..K (index label - 1): for COCO results files."""
        return (self.val_set or self.train_set).source.category_ids

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, batch_sampler: torch.utils.data.Sampler) -> DataLoader:
        processes = self._rank_world()[1] * self.parallel_jobs  # training processes sharing this machine
        workers = auto_num_workers(processes) if self.num_workers == "auto" else int(self.num_workers)
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
            # The platform's default start method, named: inside a joblib (loky) sweep worker the process default
            # is loky's, which cannot start loader workers (hydra #964).
            multiprocessing_context=multiprocessing.get_all_start_methods()[0] if workers > 0 else None,
            collate_fn=dataset.collate,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ShardedSampler(len(self.train_set), shuffle=True, seed=self.seed, rank=rank, world_size=world)
        drop_last = len(sampler) >= self.batch_size
        batches = MultiScaleBatchSampler(sampler, self.batch_size, self.train_sizes, self.size_every, drop_last)
        if self._resume is not None:
            epoch, done = self._resume
            if done >= len(batches):  # saved at the end of its epoch: training resumes with the next one
                epoch, done = epoch + 1, 0
            # Lightning makes (and prefetches from) the loader's first iterator before it calls set_epoch.
            sampler.set_epoch(epoch)
            batches.resume_at(epoch, done)
        return self._loader(self.train_set, batches)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if len(self.val_set) < world:
            raise ConfigError(
                f"The validation set has {len(self.val_set)} images for {world} processes: every process needs one."
            )
        # No padding: each val image is scored exactly once across ranks, so synced metrics equal one process's.
        sampler = ShardedSampler(
            len(self.val_set), shuffle=False, seed=self.seed, rank=rank, world_size=world, pad=False
        )
        batches = MultiScaleBatchSampler(sampler, self.batch_size, [self.val_size], 1, drop_last=False)
        return self._loader(self.val_set, batches)


class ShapesDataModule(CocoDataModule):
    """The embedded shapes dataset: generated under `root` on first use, then read as COCO files."""

    def __init__(self, root: str, spec: dict, **kwargs) -> None:
        self.root = Path(root)
        self.spec = ShapesSpec(**spec)
        files = {
            split: {
                "images": self.root / "images" / split,
                "annotations": self.root / "annotations" / f"instances_{split}.json",
            }
            for split in ("train", "val")
        }
        super().__init__(train=files["train"], val=files["val"], **kwargs)

    def prepare_data(self) -> None:
        """Generate (or reuse) the dataset once per node, before any rank reads it."""
        ensure_shapes(self.root, self.spec)


class YoloDataModule(CocoDataModule):
    """An ultralytics dataset (dataset yaml, `images/…` and `labels/….txt` with boxes or polygons) read unchanged.

    `yaml`: the dataset yaml (`path`, `train`, `val`, `names`); `root` overrides its `path`; `val_split` names the
    yaml entry validated on (`test` for `pipeline-eval split=test`). Class ids are the category ids (predictions
    are written with them); see `pipeline.data.formats.yolo_dataset`.
    """

    def __init__(self, yaml: str, root: str | None = None, val_split: str = "val", **kwargs) -> None:
        self.yaml, self.root = yaml, root
        super().__init__(train={"split": "train"}, val={"split": val_split}, **kwargs)

    def _annotations(self, files: dict) -> tuple[Path, dict]:
        return yolo_dataset(self.yaml, files["split"], self.root)


# The hold-out permutation's seed: fixed, not the run's `seed`, so every run, sweep trial and DDP rank holds out the
# same images and validation numbers of different runs compare.
HOLDOUT_SEED = 0


def holdout_split(stems: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held out) stems: round(fraction * N) of the sorted stems picked by a permutation of HOLDOUT_SEED."""
    ordered = sorted(stems)
    count = round(fraction * len(ordered))
    if not 0 < count < len(ordered):
        raise ConfigError(
            f"data.holdout={fraction} of {len(ordered)} images holds out {count} and trains on "
            f"{len(ordered) - count}: training and validation each need at least one image."
        )
    held = set(np.random.default_rng(HOLDOUT_SEED).permutation(len(ordered))[:count].tolist())
    return ([s for i, s in enumerate(ordered) if i not in held], [s for i, s in enumerate(ordered) if i in held])


class MaskFolderDataModule(CocoDataModule):
    """Semantic segmentation from two folders per split, images and masks matched by file stem.

    `train`/`val`: {"images": folder, "masks": folder}; `values` maps mask pixel values to labels (e.g. {0: 0,
    255: 1}); see `MaskFolderSource`. Semantic targets only. `holdout` (a fraction, with `val` None) validates on
    that share of the train folder's images instead, the same ones in every run (`holdout_split`).
    """

    def __init__(
        self,
        train: dict,
        val: dict | None = None,
        values: dict[int, int] | None = None,
        holdout: float | None = None,
        **kwargs,
    ) -> None:
        train = dict(train)
        if holdout is not None:
            if val is not None:
                raise ConfigError(
                    "data.val and data.holdout are both set: validate on the val folders (data.holdout=null) or on "
                    "a held-out share of the train folder (data.val=null)."
                )
            if not 0.0 < float(holdout) < 1.0:
                raise ConfigError(f"data.holdout={holdout}: the held-out share must lie between 0 and 1.")
            stems = sorted(_files(Path(train["images"])))
            kept, held = holdout_split(stems, float(holdout))
            val = {**train, "stems": held}
            train["stems"] = kept
        elif val is None:
            raise ConfigError("data.val is null: give its folders (data.val.images, data.val.masks) or data.holdout.")
        super().__init__(train=train, val=val, **kwargs)
        if self.targets != "semantic":
            raise ConfigError("data=masks holds semantic masks only: use it with a segmentation model (model=fcn8s, …)")
        self.values, self.holdout = values, holdout

    def _samples(self, files: dict, augment: A.Compose, size: int) -> SegmentationSamples:
        stems = list(files["stems"]) if files.get("stems") is not None else None
        source = MaskFolderSource(files["images"], files["masks"], self.num_classes, self.ignore_index,
                                  self.values, self.class_names, stems)  # fmt: skip
        return SegmentationSamples(source, augment, size, self.ignore_index)


class VocDataModule(CocoDataModule):
    """A VOCdevkit-style root: boxes from Annotations/*.xml (ImageSets/Main), semantic masks from the palette
    SegmentationClass PNGs and instances from SegmentationObject (ImageSets/Segmentation); 255 is void.

    Splits are `train_split` / `val_split` (ImageSets file names); without ImageSets every file is used.
    """

    def __init__(self, root: str, train_split: str = "train", val_split: str = "val", **kwargs) -> None:
        self.root = Path(root)
        super().__init__(train={"split": train_split}, val={"split": val_split}, **kwargs)

    def _annotations(self, files: dict) -> tuple[Path, dict]:
        convert = voc_instance_dataset if self.targets == "instances" else voc_box_dataset
        return convert(self.root, files["split"], self.class_names)

    def _samples(self, files: dict, augment: A.Compose, size: int) -> SegmentationSamples | BoxSamples:
        if self.targets != "semantic":
            return super()._samples(files, augment, size)
        stems = voc_ids(self.root, "Segmentation", files["split"], "SegmentationClass", ".png")
        source = MaskFolderSource(self.root / "JPEGImages", self.root / "SegmentationClass", self.num_classes,
                                  self.ignore_index, None, self.class_names, stems)  # fmt: skip
        return SegmentationSamples(source, augment, size, self.ignore_index)
