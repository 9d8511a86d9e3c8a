"""The cell model, ``mitoscope train``'s default: instances are the cells of the image.

A field of cells with one label per image and no boxes: the cells are found by classical image
analysis, each is cut out at the image's own resolution, and a scorer learnt from the image
labels alone scores them: the network self-trained on the pseudo-labels of a linear
multiple-instance model on few frozen features, on augmented crops (the default), or that linear
model alone. The image's probability
is its best cell's; the cells over the threshold are its mitotic count and their boxes say where.
One module per job, in the order the data flows:

- :mod:`.proposals` - :func:`find_cells` (threshold + watershed) and :func:`cut_crops`
- :mod:`.config` - :class:`CellTrainConfig` (no PyTorch)
- :mod:`.network` - :class:`CellNetwork`, and which of its layers the fine-tuned scorer trains
- :mod:`.views` - the eight flipped/turned views of a crop (numpy)
- :mod:`.export` - the network's ONNX export and its features outside PyTorch (numpy around an engine)
- :mod:`.bootstrap` - the linear multiple-instance scorer on few features (and the teacher of the next)
- :mod:`.training` - training either scorer; the self-training of the network on augmented crops
- :mod:`.model` - :class:`CellModel`, the saved model, served through ONNX (OpenVINO / ONNX Runtime)
- :mod:`.workflow` - :func:`train_cells`, the whole procedure
"""
