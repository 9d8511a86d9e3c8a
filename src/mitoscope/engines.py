"""Running a frozen backbone for feature extraction: PyTorch, or its ONNX export on the CPU.

On a CPU OpenVINO runs the exported EfficientNet fastest, then ONNX Runtime, then PyTorch
eager (measured by ``benchmarks/speed.py``, see README, Speed), so ``engine="auto"`` tries, on
the CPU, OpenVINO, then ONNX Runtime, then PyTorch; on a GPU it picks PyTorch.

The backbone is exported once to ONNX (its ``forward_features`` and its pooled vector, with
dynamic batch, height and width) into ``$XDG_CACHE_HOME/mitoscope/onnx`` (or ``folder``),
under a name that holds the backbone's name, the sha256 of its weights and the torch
version. Before an engine first runs an export, its feature map is checked against
PyTorch's on a probe image, and the verdict (the relative error, or why the runtime failed)
is remembered in a small JSON file beside the export, keyed by the engine's runtime, the
runtime's version and the precision it computes in: each engine passes or fails on its own,
once. A rejected engine makes ``auto`` try the next one (one logged warning) and an
explicitly named engine raise :class:`~mitoscope.errors.InputError` with its error. A saved
model whose backbone already has a checked export runs from it without PyTorch at all (see
:func:`served_engine` and :mod:`mitoscope.inference`).

Every engine computes in float32 by default, OpenVINO included (it would pick bfloat16 on
CPUs that have it), so the features of the engines agree to float32 rounding and the
feature cache does not key on the engine; its provenance records it. ``openvino-bf16``
computes in bfloat16 when asked: faster where the CPU has bf16, further from PyTorch (its
own probe tolerance), and its features are cached under their own key.

The exported runners take and return numpy arrays; :class:`TorchRunner` takes and returns
tensors. Nothing here imports PyTorch until a PyTorch runner, an export or a check is made.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .atomic import atomic_path, atomic_write_json
from .defaults import cache_home
from .errors import InputError, one_line

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone

__all__ = ["AUTO_ENGINES", "ENGINES", "EXPORTED_ENGINES", "PRECISIONS", "PROBE_TOLERANCE", "BackboneRunner",
           "NeedsPyTorch", "OnnxRunner", "OpenVinoRunner", "TorchRunner", "Verdict", "available_cpus",
           "check_export", "default_onnx_dir", "engine_precision", "export_onnx", "make_runner", "onnx_path",
           "open_exported", "remembered_verdict", "resolve_engine", "served_engine", "verdict_path"]

logger = logging.getLogger(__name__)

AUTO_ENGINES = ("openvino", "onnxruntime")  # what "auto" tries on the CPU, in this order
EXPORTED_ENGINES = (*AUTO_ENGINES, "openvino-bf16")
ENGINES = ("auto", "torch", *EXPORTED_ENGINES)
# engine -> (the Python package that runs it, the precision it computes in)
_RUNTIMES = {"openvino": ("openvino", "f32"), "onnxruntime": ("onnxruntime", "f32"),
             "openvino-bf16": ("openvino", "bf16")}
PRECISIONS = ("f32", "bf16")
OPSET = 17
# Largest difference allowed between an engine and PyTorch's feature map on the probe, relative
# to its largest value, per precision. bf16 keeps 8 bits of mantissa; its bound comes from the
# error measured on the default backbone (README, "Speed"), with a margin.
PROBE_TOLERANCE = {"f32": 1e-3, "bf16": 0.15}


class NeedsPyTorch(InputError):
    """An export cannot run here without PyTorch: an engine still has to be checked against
    it, or under ``auto`` every exported engine was rejected. Says which."""


class BackboneRunner(Protocol):
    name: str

    def pooled(self, images: Any) -> Any:
        """(B, 3, H, W) normalised images -> (B, D) pooled feature vectors."""

    def feature_map(self, images: Any) -> Any:
        """(B, 3, H, W) normalised images -> the final feature map (B, C, h, w)."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TorchRunner:
    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model

    def pooled(self, images: "torch.Tensor") -> "torch.Tensor":
        return self.model(images)

    def feature_map(self, images: "torch.Tensor") -> "torch.Tensor":
        return self.model.forward_features(images)


def default_onnx_dir() -> Path:
    return cache_home() / "onnx"


def _torch_version() -> str:
    try:  # from the installed metadata: naming an export must not import torch
        return version("torch").split("+")[0]
    except PackageNotFoundError:
        return "none"


def onnx_path(name: str, weights_id: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """Where the export of backbone ``name`` with weights sha256 ``weights_id`` lives."""
    folder = Path(folder) if folder is not None else default_onnx_dir()
    return folder / f"{name}-{weights_id[:16]}-torch{_torch_version()}-opset{OPSET}.onnx"


def engine_precision(engine: str) -> str:
    """The precision ``engine`` computes in: "bf16" for openvino-bf16, else "f32" (torch included)."""
    return _RUNTIMES[engine][1] if engine in _RUNTIMES else "f32"


def _installed(engine: str) -> bool:
    return find_spec(_RUNTIMES[engine][0]) is not None


def _runtime_version(engine: str) -> str:
    runtime = _RUNTIMES[engine][0]
    try:  # the installed metadata: cheap, no import
        return version(runtime)
    except PackageNotFoundError:  # installed under another distribution name (onnxruntime-gpu...)
        pass
    try:
        return str(import_module(runtime).__version__)
    except ImportError:
        raise InputError(f"engine {engine} needs the Python package {runtime}, which is not installed") from None


@dataclass(frozen=True)
class Verdict:
    """How ``engine`` (at ``runtime_version``) ran an export on the probe image, against PyTorch.

    ``relative_error`` is the largest difference between the feature maps relative to
    PyTorch's largest value; None when the runtime failed on the probe (``failure`` says how).
    Whether it passed is decided against today's :data:`PROBE_TOLERANCE`, so a changed
    tolerance needs no new check.
    """

    engine: str
    runtime_version: str
    relative_error: float | None
    failure: str = ""
    path: Path | None = None  # where it is remembered

    @property
    def tolerance(self) -> float:
        return PROBE_TOLERANCE[engine_precision(self.engine)]

    @property
    def passed(self) -> bool:
        return self.relative_error is not None and self.relative_error <= self.tolerance

    def describe(self) -> str:
        """Why it was rejected (or what it measured), and where the verdict lies."""
        if self.relative_error is None:
            what = f"it failed on a probe image ({self.failure})"
        else:
            what = (f"its features differ from PyTorch's on a probe image: relative error {self.relative_error:.2g}, "
                    f"expected at most {self.tolerance:g}")
        where = f"; verdict in {self.path}, delete it to check again" if self.path is not None else ""
        return f"{what} ({_RUNTIMES[self.engine][0]} {self.runtime_version}{where})"


def verdict_path(export: str | os.PathLike[str], engine: str) -> Path:
    """Where the verdict of ``engine`` (its runtime, that runtime's version and its precision) on ``export`` lives."""
    runtime, precision = _RUNTIMES[engine]
    export = Path(export)
    return export.with_name(f"{export.stem}.{runtime}-{_runtime_version(engine)}-{precision}.json")


def remembered_verdict(export: str | os.PathLike[str], engine: str) -> Verdict | None:
    """The verdict of an earlier check of ``engine`` on ``export``; None if there is none (or it is unreadable)."""
    path = verdict_path(export, engine)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        error = record["relative_error"]
        return Verdict(engine, str(record["runtime_version"]), None if error is None else float(error),
                       str(record.get("failure", "")), path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # damaged: check again, and overwrite it
        logger.info("ignoring the unreadable verdict %s (%s)", path, exc)
        return None


def export_onnx(backbone: "Backbone", folder: str | os.PathLike[str] | None = None) -> Path:
    """The backbone's ONNX file: exported now, unless an export of the same weights exists.
    A failed export leaves no file behind. Each engine checks it on its own (:func:`check_export`)."""
    path = onnx_path(backbone.name, backbone.weights_id, folder)
    if path.is_file():
        return path
    if backbone.model is None:
        raise NeedsPyTorch(f"no ONNX export of {backbone.name} (weights {backbone.weights_id[:12]}) at {path}, "
                           "and no model to export it from")
    import torch
    from torch import nn

    class FeaturesAndPooled(nn.Module):
        """What is exported: the feature map and the backbone's own pooling of it."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = self.model.forward_features(images)
            return maps, self.model.forward_head(maps, pre_logits=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    model = FeaturesAndPooled(backbone.model).eval().cpu()
    probe = torch.zeros(1, 3, backbone.input_size, backbone.input_size)
    with atomic_path(path) as temp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(
                model, (probe,), str(temp), input_names=["images"], output_names=["maps", "pooled"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}}, opset_version=OPSET, dynamo=False,
            )
    logger.info("exported %s to %s", backbone.name, path)
    return path


class OnnxRunner:
    """An exported backbone in an ONNX Runtime CPU session with ``threads`` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or available_cpus())
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _run(self, images: np.ndarray, output: str) -> np.ndarray:
        return self.session.run([output], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]

    def pooled(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "pooled")

    def feature_map(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "maps")


class OpenVinoRunner:
    """An exported backbone compiled by OpenVINO for the CPU, one static input shape at a time.

    A static shape compiles quickly and its first run is much faster than a dynamic-shape
    model's (see README, Speed). Batches run ``batch`` images at a time (8 was fastest here;
    larger batches fall out of the cache), a short last batch is padded to the compiled shape
    rather than compiled again, and compiled shapes are kept (the last ``keep``) and cached on
    disk under ``cache_dir``, so a shape seen before compiles faster (see README, Speed). Each
    cached shape takes megabytes of disk, so only the ``keep_on_disk`` most recently compiled
    stay there (whole-image passes over images of many sizes would otherwise fill the disk).

    ``precision`` ("f32" or "bf16") is what OpenVINO computes in. It is always set: left to
    itself OpenVINO picks bf16 on CPUs that have it, too far from PyTorch for the probe check.

    ``throughput``: many small inputs (cell crops) run as several batches at once, one per
    OpenVINO stream (its THROUGHPUT hint chooses how many), instead of each batch on every thread
    in turn; the same numbers, and faster where one small batch cannot keep the cores busy
    (README, Speed). One large input (a whole-image pass) is better served without it.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, batch: int = 8,
                 cache_dir: str | os.PathLike[str] | None = None, keep: int = 4, keep_on_disk: int = 16,
                 precision: str = "f32", throughput: bool = False) -> None:
        import openvino as ov

        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.name = "openvino" if precision == "f32" else f"openvino-{precision}"
        self._precision_type = getattr(ov.Type, precision)
        self.path = Path(path)
        self.core = ov.Core()
        self.threads = int(threads or available_cpus())
        self.batch = int(batch)
        self.keep = int(keep)
        self.keep_on_disk = int(keep_on_disk)
        cache = Path(cache_dir) if cache_dir is not None else cache_home() / "openvino"
        self.cache_dir: Path | None = cache
        try:
            cache.mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache)})
        except OSError as exc:  # a read-only cache costs compile time, never the result
            logger.warning("cannot use %s for compiled models (%s)", cache, exc)
            self.cache_dir = None
        self.throughput = bool(throughput)
        self.model = self.core.read_model(str(self.path))
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def _request(self, shape: tuple[int, ...]) -> Any:
        """The compiled model's infer request for ``shape`` (throughput: a queue of them)."""
        import openvino as ov

        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        model = self.model.clone()
        model.reshape({"images": list(shape)})
        compiled = self.core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT" if self.throughput
                                                          else "LATENCY",
                                                          "INFERENCE_NUM_THREADS": self.threads,
                                                          "INFERENCE_PRECISION_HINT": self._precision_type})
        self._compiled[shape] = (ov.AsyncInferQueue(compiled, int(compiled.get_property(
            "OPTIMAL_NUMBER_OF_INFER_REQUESTS"))) if self.throughput else compiled.create_infer_request())
        while len(self._compiled) > self.keep:
            self._compiled.popitem(last=False)
        self._prune_disk_cache()
        return self._compiled[shape]

    def _prune_disk_cache(self) -> None:
        if self.cache_dir is None:
            return
        blobs = []
        for blob in self.cache_dir.glob("*.blob"):
            try:
                blobs.append((blob.stat().st_mtime, blob))
            except OSError:  # removed meanwhile by another process
                continue
        for _, blob in sorted(blobs, reverse=True)[self.keep_on_disk:]:
            blob.unlink(missing_ok=True)  # another process that wanted it compiles again

    def warm_up(self, shape: tuple[int, ...]) -> None:
        """Compile now for inputs of ``shape`` (the first batch of a run), e.g. while other work waits."""
        self._request((min(int(shape[0]), self.batch), *(int(v) for v in shape[1:])))

    def _run(self, images: np.ndarray, output: str) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        count = len(images)
        step = self.batch if count > self.batch else count
        chunks = []
        for start in range(0, count, step):
            chunk = images[start : start + step]
            if len(chunk) < step:  # pad the short last batch: one compiled shape per size
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            chunks.append(chunk)
        if self.throughput:
            out: list[Any] = [None] * len(chunks)
            queue = self._request(chunks[0].shape)

            def keep(request: Any, index: int) -> None:
                out[index] = np.array(request.get_tensor(output).data)

            queue.set_callback(keep)
            for index, chunk in enumerate(chunks):
                queue.start_async({"images": chunk}, index)
            queue.wait_all()
            if any(part is None for part in out):  # a callback failed: OpenVINO does not raise it here
                raise RuntimeError(f"OpenVINO returned no {output!r} output for some batches of {self.path.name}")
        else:
            out = [np.asarray(self._request(chunk.shape).infer({"images": chunk})[output]) for chunk in chunks]
        out[-1] = out[-1][: count - step * (len(chunks) - 1)]
        return np.concatenate(out) if len(out) > 1 else out[0]

    def pooled(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "pooled")

    def feature_map(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "maps")


def open_exported(path: str | os.PathLike[str], engine: str, threads: int | None = None,
                  throughput: bool = False) -> OnnxRunner | OpenVinoRunner:
    """A runner for an ONNX file in ``engine`` (one of :data:`EXPORTED_ENGINES`), unchecked;
    ``throughput``: many small inputs at once (OpenVINO; see :class:`OpenVinoRunner`)."""
    if engine in ("openvino", "openvino-bf16"):
        return OpenVinoRunner(path, threads, precision=engine_precision(engine), throughput=throughput)
    if engine == "onnxruntime":
        return OnnxRunner(path, threads)
    raise InputError(f"unknown exported engine {engine!r}: expected one of {', '.join(EXPORTED_ENGINES)}")


def _probe_error(runner: OnnxRunner | OpenVinoRunner, backbone: "Backbone") -> float:
    """The largest difference between ``runner``'s and PyTorch's feature maps of a probe batch,
    relative to PyTorch's largest value."""
    import torch

    size = backbone.input_size
    probe = torch.randn(2, 3, size, size + 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = backbone.model.forward_features(probe.contiguous(memory_format=torch.channels_last)).float().numpy()
    got = np.asarray(runner.feature_map(probe.numpy()))
    if got.shape != expected.shape:
        raise InputError(f"expected a feature map of shape {expected.shape} (PyTorch's), got {got.shape}")
    return float(np.abs(got - expected).max()) / (float(np.abs(expected).max()) or 1.0)


def check_export(export: str | os.PathLike[str], engine: str, backbone: "Backbone",
                 threads: int | None = None) -> tuple[Verdict, OnnxRunner | OpenVinoRunner | None]:
    """Check ``engine`` on ``export`` against ``backbone``'s PyTorch model and remember the verdict.

    Returns the verdict and, when the runtime ran, its runner (to be used if the verdict passed).
    """
    if backbone.model is None:
        raise NeedsPyTorch(f"engine {engine} has not been checked against PyTorch on {Path(export).name} yet, "
                           f"and backbone {backbone.name} has no model here to check it with")
    runtime_version = _runtime_version(engine)
    runner = None
    try:
        runner = open_exported(export, engine, threads)
        error, failure = _probe_error(runner, backbone), ""
    except Exception as exc:  # the runtime cannot read, compile or run the export: rejected too
        error, failure, runner = None, one_line(exc, 300, typed=True), None
    path = verdict_path(export, engine)
    atomic_write_json(path, {"engine": engine, "runtime": _RUNTIMES[engine][0], "runtime_version": runtime_version,
                             "precision": engine_precision(engine), "relative_error": error, "failure": failure})
    verdict = Verdict(engine, runtime_version, error, failure, path)
    logger.info("checked %s on %s against PyTorch: %s", engine, Path(export).name,
                "passed" if verdict.passed else "rejected, " + verdict.describe())
    return verdict, runner


def resolve_engine(engine: str, device: Any) -> str:
    """The engine ``engine`` means on ``device`` (a torch.device or its name): for ``auto`` the
    first it will try (see :func:`make_runner` for what follows when that one is rejected)."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    if engine in EXPORTED_ENGINES and device_type != "cpu":
        raise InputError(f"engine {engine} runs on the CPU only, but the device is {device}; use engine torch")
    if engine != "auto":
        return engine
    if device_type != "cpu":
        return "torch"
    candidates = auto_candidates()
    return candidates[0] if candidates else "torch"


def auto_candidates() -> list[str]:
    """The exported engines ``auto`` tries on the CPU, in order. Found, not imported: cheap;
    onnx is what the exporter needs."""
    return [engine for engine in AUTO_ENGINES if find_spec("onnx") and _installed(engine)]


def _reason(exc: BaseException) -> str:
    return one_line(exc, 600)


def served_engine(export: str | os.PathLike[str], engine: str = "auto") -> str:
    """The exported engine that runs ``export`` with no PyTorch at hand, from the verdicts
    remembered beside it: ``engine`` itself, or under ``auto`` the first engine that was not
    rejected (a skipped one is logged, once).

    Raises InputError when the named ``engine`` was rejected, and :class:`NeedsPyTorch` when
    the engine to use has not been checked yet or every engine was rejected.
    """
    if engine not in ("auto", *EXPORTED_ENGINES):
        raise InputError(f"unknown exported engine {engine!r}: expected auto or one of {', '.join(EXPORTED_ENGINES)}")
    name = Path(export).name
    skipped = []
    for candidate in auto_candidates() if engine == "auto" else [engine]:
        verdict = remembered_verdict(export, candidate)
        if verdict is None:
            raise NeedsPyTorch(f"engine {candidate} has not been checked against PyTorch on {name} yet")
        if verdict.passed:
            if skipped:
                logger.warning("%s; using %s", "; ".join(skipped), candidate)
            return candidate
        if engine != "auto":
            raise InputError(f"engine {candidate} cannot run {name}: {verdict.describe()}")
        skipped.append(f"{candidate} cannot run {name}: {verdict.describe()}")
    raise NeedsPyTorch("; ".join(skipped) or "no exported engine is installed")


def _checked_runner(export: Path, engine: str, backbone: "Backbone") -> OnnxRunner | OpenVinoRunner:
    """``engine``'s runner for ``export``, checked now unless a verdict is remembered; raises
    InputError with the engine's error when it was rejected."""
    verdict, runner = remembered_verdict(export, engine), None
    if verdict is None:
        verdict, runner = check_export(export, engine, backbone)
    if not verdict.passed:
        raise InputError(verdict.describe())
    return runner if runner is not None else open_exported(export, engine)


def make_runner(backbone: "Backbone", device: Any, engine: str = "auto",
                folder: str | os.PathLike[str] | None = None) -> BackboneRunner:
    """The runner for ``engine`` (see the module docstring for the checks and ``auto``'s order).

    An engine that was named and cannot run (no export, rejected by its check, a runtime
    error) raises InputError naming it; under ``auto`` the next engine is tried, and PyTorch
    last. A model-less backbone (:func:`mitoscope.backbones.described_backbone`) runs only
    from an export that its engine passed; where a PyTorch model would settle it (a check
    still to make, every engine rejected), this raises :class:`NeedsPyTorch`.
    """
    chosen = resolve_engine(engine, device)
    if chosen == "torch":
        if backbone.model is None:
            raise InputError(f"backbone {backbone.name} is only described here (no model): it can run only "
                             "from its ONNX export")
        return TorchRunner(backbone.model)
    failures: list[str] = []
    try:
        made = not onnx_path(backbone.name, backbone.weights_id, folder).is_file()
        export = export_onnx(backbone, folder)
        candidates = auto_candidates() if engine == "auto" else [chosen]
        if made:  # check every engine auto may use now, while the model is here: serving needs no PyTorch later
            for candidate in auto_candidates():
                check_export(export, candidate, backbone)
    except NeedsPyTorch:
        raise
    except Exception as exc:  # no export: no exported engine can run
        if engine != "auto":
            raise InputError(f"engine {chosen} cannot run {backbone.name}: {_reason(exc)}") from None
        failures.append(f"cannot export {backbone.name} to ONNX ({_reason(exc)})")
        candidates = []
    for candidate in candidates:
        try:
            runner = _checked_runner(export, candidate, backbone)
        except NeedsPyTorch:
            raise
        except Exception as exc:  # rejected by its check, or runtime trouble: say what, then go on or stop
            if engine != "auto":
                raise InputError(f"engine {candidate} cannot run {backbone.name}: {_reason(exc)}") from None
            failures.append(f"{candidate} cannot run {backbone.name}: {_reason(exc)}")
            continue
        if failures:
            logger.warning("%s; using %s", "; ".join(failures), candidate)
        return runner
    if backbone.model is None:
        raise NeedsPyTorch("; ".join(failures))
    logger.warning("%s; using PyTorch", "; ".join(failures))
    return TorchRunner(backbone.model)
