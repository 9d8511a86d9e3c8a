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


def one_line(error: BaseException | str, limit: int | None = 300, typed: bool = False) -> str:
    """``error``'s message on one line (runs of whitespace, newlines included, made one space),
    cut to ``limit`` characters (None: whole), for quoting inside a one-line error message.

    ``typed`` puts the exception's class name first (``ValueError: ...``). An exception with an
    empty message gives its class name.
    """
    text = " ".join(str(error).split())
    if isinstance(error, BaseException):
        name = type(error).__name__
        text = (f"{name}: {text}" if text else name) if typed else (text or name)
    return text if limit is None else text[:limit]
