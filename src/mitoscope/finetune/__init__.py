"""End-to-end fine-tuning of a pretrained CNN on whole images (the write-up's Round-2 classifier).

The SOFTEC AIC'24 Round-2 model is an ImageNet EfficientNet-B4 fine-tuned on the whole
images resized to 512 x 512, in two phases: a new head on the frozen base, then the base
(all of it or its last N blocks) with the head at a lower learning rate. One module per job:

- :mod:`.config` - :class:`FineTuneConfig`, its checks, what it asks of this machine
- :mod:`.data` - :class:`ImageStore` (images and tiles resized, cached on disk), datasets,
  :func:`validation_split`, the pre-training tiles
- :mod:`.network` - :class:`FineTuneNetwork` (backbone + avg or attention pooling),
  :func:`build_network`, :func:`set_trainable`
- :mod:`.trunk` - the frozen-trunk cache (:class:`TrunkSplit`, :class:`TrunkCache`, views)
- :mod:`.inference` - probabilities and per-position maps of resized images, TTA
- :mod:`.module` - the LightningModule and LightningDataModule of one phase (imports
  Lightning: loaded only when a phase runs)
- :mod:`.training` - :func:`fit_phase`, the Trainer, and :class:`FineTuner` (both phases)
- :mod:`.model` - :class:`FineTunedModel`, the saved model
- :mod:`.history` - the history CSV and training curves
- :mod:`.workflow` - :func:`finetune`, the whole procedure

**Augmentation** (:mod:`mitoscope.augment`): flips, quarter turns, small zoom, brightness and
contrast, and H&E stain jitter in HED space (on by default; switch it off for fluorescence).
Class imbalance: ``balance="pos_weight"`` weights the positive class's loss by
negatives/positives, ``"sampler"`` draws balanced batches instead.

Two GPUs on one machine::

    mitoscope finetune scenes/ --labels scenes/labels.csv --out model/ --devices 2

Lightning starts the second process itself by running the same command again (with
``LOCAL_RANK=1``): every process reads the images and trains its share of each batch; only
rank 0 writes the model. From Python, run the training from a script (not a notebook) for
the same reason.

A SLURM cluster (2 nodes x 4 GPUs); Lightning recognises SLURM from its environment
(``SLURM_NTASKS``, ``SLURM_PROCID``, ...) and takes the ranks and the main address from it::

    #!/bin/bash
    #SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8
    srun mitoscope finetune scenes/ --labels scenes/labels.csv --out /shared/model \\
        --devices 4 --num-nodes 2 --workers 6 --cache-dir /shared/cache

``--devices`` must equal ``--ntasks-per-node`` and ``--num-nodes`` ``--nodes``. The
checkpoints live in a work folder next to ``--out`` (``.NAME.finetune-work``, removed at the
end), which every rank reads: ``--out`` must be on a filesystem all nodes share.

Python API::

    from mitoscope.finetune import FineTuneConfig, finetune, FineTunedModel
    result = finetune("scenes/", "scenes/labels.csv", "model/", FineTuneConfig(size=512, pool="attention"))
    model = FineTunedModel.load("model/")
    pred = model.predict_paths(["new.png"], with_window_scores=True)
"""

from __future__ import annotations

# Every name the single-module finetune.py had, for `from mitoscope.finetune import X`.
from ..progress import Progress  # noqa: F401
from ..lightning_setup import parse_devices, quiet_lightning, resolve_precision  # noqa: F401
from .config import WARMUP_FRACTION, FineTuneConfig, parse_unfreeze  # noqa: F401
from .data import ImageStore, _load_pretrain_set, tile_boxes, validation_split  # noqa: F401
from .history import HISTORY_COLUMNS, history_csv, plot_history  # noqa: F401
from .inference import TTA_TRANSFORMS, forward_images, position_boxes, predict_arrays  # noqa: F401
from .model import HEAD_NAME, NETWORK_FILE, FineTunedModel  # noqa: F401
from .network import AveragePoolHead, FineTuneNetwork, build_network, check_input_size  # noqa: F401
from .network import set_trainable, unfrozen_parameter_names  # noqa: F401
from .training import FineTuner, Phase, PhaseResult, fit_phase, make_trainer  # noqa: F401
from .trunk import TrunkCache, TrunkSplit, TrunkView, _TrunkDataset, backbone_chain, build_trunk_cache  # noqa: F401
from .trunk import check_trunk_budget, plan_trunk_views, predict_trunk_cache, resolve_trunk_split  # noqa: F401
from .trunk import trunk_map_shape, trunk_split  # noqa: F401
from .workflow import FineTuneResult, finetune  # noqa: F401

__all__ = [
    "FineTuneConfig",
    "FineTuneNetwork",
    "FineTuneResult",
    "FineTunedModel",
    "FineTuner",
    "ImageStore",
    "TrunkCache",
    "TrunkSplit",
    "TrunkView",
    "build_trunk_cache",
    "finetune",
    "fit_phase",
    "plan_trunk_views",
    "position_boxes",
    "resolve_trunk_split",
    "set_trainable",
    "tile_boxes",
    "trunk_split",
    "validation_split",
]
