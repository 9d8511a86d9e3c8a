"""What a Lightning run asks of this machine, its ``Trainer`` and its quiet: shared by
``mitoscope extract`` (:mod:`mitoscope.distributed`) and ``mitoscope finetune``
(:mod:`mitoscope.finetune`).

A configuration that runs on Lightning has the fields of :class:`Hardware` (``accelerator``,
``devices``, ``num_nodes``, ``workers``; fine-tuning also ``precision``); the functions here
read them from any such object:

- :func:`check_accelerator`: a known ``--accelerator``, and a CUDA GPU when one is asked for;
  :func:`parse_devices`: Lightning's forms of ``--devices``;
- :func:`on_gpu`, :func:`strategy` (DDP for more than one device or node),
  :func:`loader_workers` (data-loader processes: a few on a GPU, none on the CPU) and
  :func:`resolve_precision`;
- :func:`make_trainer`: a ``Trainer`` with those settings, no logger and no model summary; a
  setting this machine cannot honour (more ``--devices`` than it has) is an
  :class:`~mitoscope.errors.InputError`;
- :func:`quiet_lightning`: Lightning's start-up chatter, tips and needless hints silenced.

Lightning is imported when a trainer is made or quieted, not when this module is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from .errors import InputError, one_line
from .options import ACCELERATORS, check_choice

__all__ = ["Hardware", "check_accelerator", "import_lightning", "loader_workers", "make_trainer", "on_gpu",
           "parse_devices", "quiet_lightning", "resolve_precision", "strategy"]


class Hardware(Protocol):
    """The fields of a configuration that say where and how a Lightning run goes."""

    accelerator: str  # one of options.ACCELERATORS
    devices: str | int  # Lightning's: a count, -1, "auto" or a list "0,1"
    num_nodes: int
    workers: int | None  # data-loader processes; None: chosen by loader_workers


def import_lightning() -> Any:
    """Lightning itself, imported on first use (it takes seconds)."""
    import lightning as L

    return L


def check_accelerator(accelerator: str) -> None:
    """Refuse an unknown ``--accelerator``, and a GPU one where no CUDA GPU is visible."""
    check_choice("--accelerator", accelerator, ACCELERATORS)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise InputError(f"--accelerator {accelerator}: no CUDA GPU is visible here; use --accelerator cpu")


def parse_devices(value: str | int) -> str | int:
    """``"auto"``, a device count, or a comma-separated list of device indices (Lightning's forms)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1 and value != -1:
            raise InputError(f"--devices expects a positive count, -1, 'auto' or a list like 0,1; got {value}")
        return value
    text = str(value).strip()
    if text == "auto":
        return text
    if text.lstrip("-").isdigit():
        return parse_devices(int(text))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts):
        return ",".join(parts) + ("," if len(parts) == 1 else "")
    raise InputError(f"--devices expects a positive count, -1, 'auto' or a list like 0,1; got {value!r}")


def on_gpu(hardware: Hardware) -> bool:
    """Whether the run goes to a GPU: asked for, or ``auto`` with a CUDA GPU visible."""
    if hardware.accelerator == "cpu":
        return False
    return hardware.accelerator in ("gpu", "cuda") or torch.cuda.is_available()


def strategy(hardware: Hardware) -> str:
    """Lightning's ``ddp`` for more than one device or node, else ``auto``."""
    devices = hardware.devices
    several = (isinstance(devices, int) and (devices > 1 or devices == -1)) or (
        isinstance(devices, str) and devices != "auto" and len([d for d in devices.split(",") if d]) > 1)
    return "ddp" if several or hardware.num_nodes > 1 else "auto"


def loader_workers(hardware: Hardware) -> int:
    """``workers`` when given; else up to 4 loader processes on a GPU (one core left), none on the CPU."""
    if hardware.workers is not None:
        return int(hardware.workers)
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if on_gpu(hardware) else 0


def resolve_precision(hardware: Any) -> str:
    """Lightning's precision of ``hardware.precision``: bf16/16-bit mixed on GPU ("auto" picks),
    32-bit on CPU."""
    precision = str(hardware.precision)
    gpu = on_gpu(hardware)
    if precision == "auto":
        if not gpu:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if precision in ("32", "32-true"):
        return "32-true"
    if not gpu:
        raise InputError(f"--precision {precision} needs a GPU; on CPU use --precision 32 (or auto)")
    return precision


def make_trainer(hardware: Hardware, doing: str, precision: str, progress_bar: bool, callbacks: Sequence[Any],
                 root: Path, **options: Any) -> Any:
    """A Lightning ``Trainer`` on ``hardware``, with no logger and no model summary; ``options``
    are more of its arguments. A setting this machine cannot honour raises InputError
    ``cannot <doing> with --accelerator ... here: <Lightning's reason>``."""
    L = import_lightning()
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(
            accelerator=hardware.accelerator,
            devices=hardware.devices,
            num_nodes=hardware.num_nodes,
            strategy=strategy(hardware),
            precision=precision,
            logger=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            callbacks=list(callbacks),
            default_root_dir=root,
            **options,
        )
    except MisconfigurationException as exc:  # e.g. more --devices than this machine has
        raise InputError(
            f"cannot {doing} with --accelerator {hardware.accelerator} --devices {hardware.devices} "
            f"--num-nodes {hardware.num_nodes} here: {one_line(exc, 300)}"
        ) from None


@contextlib.contextmanager
def quiet_lightning(quiet: bool, ignore: Sequence[str] = ()) -> Iterator[None]:
    """Silence Lightning's start-up chatter (devices found, tips), its data-loader hints and the
    warnings matching the ``ignore`` patterns."""
    import_lightning()  # its first import sets its loggers to INFO: import first, then lower them
    names = ("lightning.pytorch", "lightning.fabric")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        if quiet:
            for name in names:
                logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")
            # Fine-tuning's frozen parts are in eval mode on purpose (see finetune.module.FineTuneModule.train).
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
            warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
            for pattern in ignore:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
