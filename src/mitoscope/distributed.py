"""Fill the feature cache on its own, on one device or many: ``mitoscope extract``.

``mitoscope train`` extracts window features as it goes; on a large data set that is most of
the time. ``extract`` does only that part, with the same cache keys as ``train`` (image bytes,
backbone and weights hash, tiling, extraction mode, reading options), so a ``train`` run
afterwards with the same backbone, tiling and reading options finds every image cached and
goes straight to the head. With a fixed-grid head (``--head ensemble|dense|forest``, the
default ``ensemble``) it also caches, as ``train`` would, the images whose size is not the most
common one resized to that size.

It runs through Lightning's distributed predict loop: a ``LightningModule`` whose
``predict_step`` extracts one image and writes its cache entry, a ``DataLoader`` over the
images still to do, and ``Trainer(strategy="ddp", devices=N, num_nodes=M).predict(...)``.
Lightning gives each rank its share of that loader through a distributed sampler that never
repeats an item (a plain ``DistributedSampler`` pads the last round with repeats, which would
extract some images twice). How it keeps every entry written exactly once:

- images already cached are found before distributing: each rank hashes a strided share of
  the files, the shares are gathered, and every rank builds the same list of what is left;
- each remaining image belongs to one rank, which alone reads it, extracts it and writes its
  entry (atomically: a temporary file in the same folder, then ``os.replace``);
- each entry records in its provenance the rank and world size that wrote it, and the run
  reports how many entries each rank wrote.

A file that cannot be read does not stop the other ranks: every failure is gathered and the
run ends with an error naming the files (the entries of the other images are kept).

Two GPUs on one machine (Lightning starts the second process itself by running the same
command again with ``LOCAL_RANK=1``)::

    mitoscope extract scenes/ --labels scenes/labels.csv --devices 2 --accelerator gpu

A SLURM cluster, 2 nodes x 4 GPUs (Lightning recognises SLURM from its environment:
``SLURM_NTASKS``, ``SLURM_PROCID``, ...; ``--devices`` must equal ``--ntasks-per-node`` and
``--num-nodes`` ``--nodes``). The cache folder must be on a filesystem every node sees::

    #!/bin/bash
    #SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8
    srun mitoscope extract scenes/ --labels scenes/labels.csv --cache-dir /shared/cache \\
        --devices 4 --num-nodes 2 --accelerator gpu --workers 6

then, on any one machine: ``mitoscope train scenes/ --labels scenes/labels.csv --out model/
--cache-dir /shared/cache``. From Python, call :func:`extract_to_cache` from a script, not a
notebook (with ``devices > 1`` Lightning re-runs the script for the other ranks).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from .errors import InputError, MitoscopeError
from .engines import ENGINES, EXPORTED_ENGINES
from .features import EXTRACTION_MODES, FeatureCache, FeatureExtractor, cache_settings, default_cache_dir, file_sha256
from .io import DEFAULT_MAX_PIXELS, ReadOptions, load_labelled_images, read_image
from .lightning_setup import check_accelerator, import_lightning, loader_workers, on_gpu, parse_devices
from .lightning_setup import make_trainer as make_lightning_trainer
from .lightning_setup import quiet_lightning, strategy
from .options import HEAD_NAMES, check_choice, check_file
# Heads whose input is every window concatenated in grid order: train resizes odd-sized images
# to the most common size, so their resized features are cached too.
from .heads.registry import FIXED_GRID_HEADS
from .tiling import validate_tiling

logger = logging.getLogger(__name__)

MAX_LISTED_ERRORS = 5


@dataclass(frozen=True)
class ExtractConfig:
    """What ``mitoscope extract`` can be told; the extraction options mirror ``TrainConfig``'s."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    pretrained: bool = True
    window: int = 224
    overlap: float = 0.5
    extraction: str = "windows"
    engine: str = "auto"
    channels: tuple[int, int, int] | None = None
    seed: int = 0
    positive: str | None = None
    head: str = "ensemble"
    batch_size: int = 32
    accelerator: str = "auto"
    devices: str | int = 1
    num_nodes: int = 1
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> "ExtractConfig":
        validate_tiling(self.window, self.overlap)
        check_choice("--extraction", self.extraction, EXTRACTION_MODES)
        check_choice("--engine", self.engine, ENGINES)
        if self.engine in EXPORTED_ENGINES and self.accelerator == "gpu":
            raise InputError(f"--engine {self.engine} runs on the CPU only; use --engine torch (or auto) with --accelerator gpu")
        check_choice("--head", self.head, HEAD_NAMES)
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_nodes < 1:
            raise InputError(f"--num-nodes must be at least 1, got {self.num_nodes}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers must be 0 or more, got {self.workers}")
        check_accelerator(self.accelerator)
        check_file(self.weights, "weights file")
        _ = self.read_options  # validates channels and max_pixels
        return replace(self, devices=parse_devices(self.devices))

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(channels=self.channels, max_pixels=self.max_pixels)

    @property
    def on_gpu(self) -> bool:
        return on_gpu(self)

    @property
    def strategy(self) -> str:
        return strategy(self)


@dataclass
class ExtractResult:
    """What a run did; every rank gets the same numbers (``is_main`` tells rank 0)."""

    n_images: int
    n_cached: int  # images whose entry was already there
    n_extracted: int  # entries written by this run at the size read
    n_resized: int  # entries written resized to ``train_size`` (fixed-grid heads)
    train_size: tuple[int, int] | None  # (H, W) the fixed-grid heads will use
    written_per_rank: list[int] = field(default_factory=list)
    cache_dir: Path = Path()
    is_main: bool = True

    @property
    def world_size(self) -> int:
        return len(self.written_per_rank)


def global_rank() -> int:
    """This process's rank once a process group is up (0 otherwise, or before)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def failure_message(errors: Sequence[str], n_total: int, what: str) -> str:
    shown = "; ".join(errors[:MAX_LISTED_ERRORS])
    more = f"; and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    return f"{len(errors)} of {n_total} images could not be {what}: {shown}{more}"


# --------------------------------------------------------------------------------------------
# What is left to do (decided before distributing, the same on every rank)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    index: int  # position in the data set
    key: str  # cache key of the entry to write
    resize_to: tuple[int, int] | None


class ExtractionPlan:
    """The images, their cache keys and which entries exist; shared by the driver and the data module."""

    def __init__(self, paths: Sequence[Path], cache: FeatureCache, fingerprint: dict[str, Any],
                 read_options: ReadOptions) -> None:
        self.paths = [Path(p) for p in paths]
        self.cache = cache
        self.fingerprint = fingerprint
        self.read_options = read_options
        self.shas: list[str] | None = None
        self.train_size: tuple[int, int] | None = None
        self.n_cached = 0

    def key(self, index: int, resize_to: tuple[int, int] | None = None) -> str:
        assert self.shas is not None
        return FeatureCache.key(self.shas[index], cache_settings(self.fingerprint, self.read_options, resize_to))

    def jobs(self, rank: int, world_size: int, resized: bool) -> list[Job]:
        """Images still to extract; each rank scans a strided share and the shares are gathered."""
        return self.resized_jobs(rank, world_size) if resized else self.as_read_jobs(rank, world_size)

    def as_read_jobs(self, rank: int, world_size: int) -> list[Job]:
        settings = cache_settings(self.fingerprint, self.read_options, None)
        mine = []
        for index in range(rank, len(self.paths), world_size):
            try:
                sha = file_sha256(self.paths[index])
            except OSError as exc:
                mine.append((index, None, False, f"{self.paths[index]}: cannot read the file ({exc.strerror or exc})"))
                continue
            cached = self.cache.load(FeatureCache.key(sha, settings)) is not None
            mine.append((index, sha, cached, None))
        scanned = sorted(item for share in gather(mine) for item in share)
        errors = [error for *_, error in scanned if error]
        if errors:
            raise InputError(failure_message(errors, len(self.paths), "read"))
        self.shas = [sha for _, sha, _, _ in scanned]
        self.n_cached = sum(cached for _, _, cached, _ in scanned)
        return [Job(index, self.key(index), None) for index, _, cached, _ in scanned if not cached]

    def resized_jobs(self, rank: int, world_size: int) -> list[Job]:
        """Images not of the most common size, resized to it (what ``train`` does for fixed-grid heads)."""
        mine = []
        for index in range(rank, len(self.paths), world_size):
            entry = self.cache.load(self.key(index))
            if entry is None:  # written by this run, so only a cache that this node does not see lacks it
                mine.append((index, None, f"{self.paths[index]}: its feature entry is missing from {self.cache.root} "
                                          f"after extraction (with --num-nodes > 1 the cache folder must be shared)"))
            else:
                mine.append((index, tuple(int(v) for v in entry.image_size), None))
        scanned = sorted(item for share in gather(mine) for item in share)
        errors = [error for *_, error in scanned if error]
        if errors:
            raise InputError(failure_message(errors, len(self.paths), "found in the cache"))
        sizes = [size for _, size, _ in scanned]
        # Counter keeps first-seen order among ties: the same choice as pipeline.modal_size over the same order.
        self.train_size = collections.Counter(sizes).most_common(1)[0][0]
        odd = [index for index, size in enumerate(sizes) if size != self.train_size]
        mine_odd = [(index, self.cache.load(self.key(index, self.train_size)) is not None)
                    for index in odd[rank::world_size]]
        cached = dict(item for share in gather(mine_odd) for item in share)
        return [Job(index, self.key(index, self.train_size), self.train_size) for index in odd if not cached[index]]


NO_OP = Job(index=-1, key="", resize_to=None)


class JobImages(Dataset):
    """One decoded image per job; a file that cannot be read becomes an error to report, not a crash."""

    def __init__(self, jobs: Sequence[Job], paths: Sequence[Path], read_options: ReadOptions) -> None:
        self.jobs = list(jobs)
        self.paths = list(paths)
        self.read_options = read_options

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, position: int) -> dict[str, Any]:
        job = self.jobs[position]
        if job == NO_OP:
            return {"job": job, "image": None, "error": None}
        try:
            return {"job": job, "image": read_image(self.paths[job.index], self.read_options), "error": None}
        except MitoscopeError as exc:
            return {"job": job, "image": None, "error": str(exc)}


def first_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for one image per step (images differ in size and stay numpy arrays)."""
    return items[0]


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


def make_lightning_classes() -> tuple[type, type]:
    """The data module and the module; built on demand so that importing mitoscope stays light."""
    L = import_lightning()

    class ExtractionJobs(L.LightningDataModule):
        """The images left to do, decided in ``setup`` once every rank has joined the process group."""

        allow_zero_length_dataloader_with_multiple_devices = True  # fewer images left than ranks

        def __init__(self, plan: ExtractionPlan, resized: bool, workers: int) -> None:
            super().__init__()
            self.plan = plan
            self.resized = resized
            self.workers = workers
            self.jobs: list[Job] = []

        def setup(self, stage: str) -> None:
            world_size = self.trainer.world_size
            self.jobs = self.plan.jobs(self.trainer.global_rank, world_size, self.resized)
            if 0 < len(self.jobs) < world_size:
                # Lightning's unrepeated sampler wants an item on every rank once there is any:
                # the ranks without an image get one that does nothing.
                self.jobs += [NO_OP] * (world_size - len(self.jobs))

        def predict_dataloader(self) -> DataLoader:
            # Lightning swaps the sequential sampler for its distributed one (no repeats when predicting).
            return DataLoader(JobImages(self.jobs, self.plan.paths, self.plan.read_options), batch_size=1,
                              shuffle=False, num_workers=self.workers, collate_fn=first_item)

    class CacheWriter(L.LightningModule):
        """``predict_step``: extract one image's window features and write its cache entry."""

        allow_zero_length_dataloader_with_multiple_devices = True

        def __init__(self, backbone: Backbone, plan: ExtractionPlan, config: ExtractConfig) -> None:
            super().__init__()
            self.network = backbone.model  # a sub-module, so that Lightning moves it to this rank's device
            self.backbone = backbone
            self.plan = plan
            self.config = config
            self.extractor: FeatureExtractor | None = None
            self.written: list[int] = []
            self.errors: list[str] = []

        def on_predict_start(self) -> None:
            # Built here, not in __init__: only now is the network on this rank's device.
            config = self.config
            if self.extractor is None or self.extractor.device != self.device:
                self.extractor = FeatureExtractor(self.backbone, config.window, config.overlap, config.batch_size,
                                                  str(self.device), mode=config.extraction, engine=config.engine)

        def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
            return batch  # a numpy image: the extractor moves each batch of windows itself

        def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
            job: Job = batch["job"]
            if job == NO_OP:
                return None
            path = self.plan.paths[job.index]
            if batch["error"]:
                self.errors.append(batch["error"])
                return None
            assert self.extractor is not None
            try:
                feats = self.extractor.extract(batch["image"], resize_to=job.resize_to)
            except MitoscopeError as exc:
                self.errors.append(f"{path}: {exc}")
                return None
            provenance = {
                "image": str(path),
                "mitoscope": __version__,
                **cache_settings(self.plan.fingerprint, self.plan.read_options, job.resize_to),
                "engine": self.extractor.engine,
                "writer": "mitoscope extract",
                "rank": self.global_rank,
                "world_size": self.trainer.world_size,
            }
            try:
                self.plan.cache.save(job.key, feats, provenance)
            except OSError as exc:  # filling the cache is this command's whole job: a failed write is an error
                self.errors.append(f"{path}: cannot write its feature entry under {self.plan.cache.root} ({exc})")
                return None
            self.written.append(job.index)
            return None

    return ExtractionJobs, CacheWriter


def make_trainer(config: ExtractConfig, root: Path, progress_bar: bool, callbacks: Sequence[Any] = ()) -> Any:
    # 32-bit: the extractor picks bf16 autocast on GPU itself, as in train
    return make_lightning_trainer(config, "extract", "32-true", progress_bar, callbacks, root, enable_checkpointing=False)


def extract_to_cache(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    config: ExtractConfig = ExtractConfig(),
    cache_dir: str | Path | None = None,
    progress_bar: bool = False,
    callbacks: Sequence[Any] = (),
) -> ExtractResult:
    """Write the feature-cache entry of every image of ``data_dir`` that lacks one.

    ``config.devices``/``num_nodes``/``accelerator`` are Lightning's; more than one device or
    node runs DDP (see the module docstring). ``progress_bar`` shows Lightning's bar;
    ``callbacks`` are more Lightning callbacks (e.g. progress lines for a log). Returns the same
    :class:`ExtractResult` on every rank. Raises :class:`InputError` naming the files that could
    not be read or extracted.
    """
    config = config.validate()
    data = load_labelled_images(data_dir, labels_csv, config.positive)
    data.refuse_slides("extract")
    cache = FeatureCache(Path(cache_dir) if cache_dir else default_cache_dir())
    # The same seeded creation as pipeline.train: random-init weights (and so the cache keys,
    # which hold the weights hash) are the same on every rank and in a later `train`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = create_backbone(config.backbone, weights=config.weights, pretrained=config.pretrained)
    fingerprint = FeatureExtractor(backbone, config.window, config.overlap, config.batch_size, "cpu",
                                   mode=config.extraction, engine=config.engine).fingerprint()
    plan = ExtractionPlan(data.paths, cache, fingerprint, config.read_options)
    workers = loader_workers(config)
    ExtractionJobs, CacheWriter = make_lightning_classes()
    module = CacheWriter(backbone, plan, config)
    written = collections.Counter()
    n_extracted = n_resized = 0
    with quiet_lightning_for_extract(True):
        trainer = make_trainer(config, cache.root, progress_bar, callbacks)
        passes = [False, True] if config.head in FIXED_GRID_HEADS else [False]
        for resized in passes:
            # Reset here: a rank with nothing to do in a pass never reaches the module's predict hooks.
            module.written, module.errors = [], []
            trainer.predict(module, datamodule=ExtractionJobs(plan, resized, workers), return_predictions=False)
            # Every rank has finished writing once this returns: the gather is a synchronisation point.
            shares = gather((module.global_rank, len(module.written), module.errors))
            errors = [error for _, _, errs in shares for error in errs]
            if errors:
                raise InputError(failure_message(errors, len(plan.paths), "extracted"))
            for rank, count, _ in shares:
                written[rank] += count
            total = sum(count for _, count, _ in shares)
            if resized:
                n_resized = total
            else:
                n_extracted = total
    world_size = int(trainer.world_size)
    is_main = bool(trainer.is_global_zero)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tear the process group down before the interpreter exits: gloo's threads left running
        # at exit make the process abort now and then ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return ExtractResult(
        n_images=len(plan.paths),
        n_cached=plan.n_cached,
        n_extracted=n_extracted,
        n_resized=n_resized,
        train_size=plan.train_size,
        written_per_rank=[written[rank] for rank in range(world_size)],
        cache_dir=cache.root,
        is_main=is_main,
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def quiet_lightning_for_extract(quiet: bool) -> Any:
    """Lightning's chatter silenced, plus the hints that do not apply to one image per step."""
    return quiet_lightning(quiet, ignore=(r".*across ranks is zero.*", r".*predict returned None.*",
                                          r".*overridden `transfer_batch_to_device`.*"))
