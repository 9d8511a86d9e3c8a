"""The cell model, ``mitoscope train``'s default: instances are the cells of the image.

A field of cells with one label per image and no boxes: the cells are found by classical image
analysis, each is cut out at the image's own resolution, and a pretrained network fine-tuned
from the image labels alone (multiple-instance learning) scores them. The image's probability
is its best cell's; the cells over the threshold are its mitotic count and their boxes say where.
One module per job, in the order the data flows:

- :mod:`.proposals` - :func:`find_cells` (threshold + watershed) and :func:`cut_crops`
- :mod:`.config` - :class:`CellTrainConfig` (no PyTorch)
- :mod:`.network` - :class:`CellNetwork`, the frozen trunk and the trained top
- :mod:`.bootstrap` - a first guess of each Mitosis image's mitotic cell (few features, linear)
- :mod:`.training` - the multiple-instance fine-tuning on cached trunk maps
- :mod:`.model` - :class:`CellModel`, the saved model, served through ONNX (OpenVINO / ONNX Runtime)
- :mod:`.workflow` - :func:`train_cells`, the whole procedure
"""
