"""User-facing errors: one line, naming the file and what was expected versus what was got."""


class MitoscopeError(Exception):
    """Base class for every error that is meant to be shown to a user."""


class InputError(MitoscopeError, ValueError):
    """A bad image, label file or option."""


class ModelError(MitoscopeError):
    """A saved model that is missing, tampered with, truncated or incompatible."""


class WeightsUnavailableError(MitoscopeError):
    """Pretrained weights were asked for but cannot be had (offline, unknown name, bad file)."""


class NotServable(Exception):
    """This model (or this input) needs the full PyTorch/scikit-learn pipeline; says why.

    Not a user error: :func:`mitoscope.predictions.predict` catches it and uses the full pipeline."""
