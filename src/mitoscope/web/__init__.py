"""``mitoscope serve``: a one-page web app and a JSON API over a saved model (optional extra ``[web]``).

:func:`create_app` loads the model once and returns a FastAPI application; :mod:`.analysis`
turns one uploaded image into the answer (label, probability, count, instances, heatmap,
CSV and GeoJSON), :mod:`.limits` keeps hostile uploads from hurting the server.
"""

from __future__ import annotations

from ..errors import InputError

try:
    from .app import ServeSettings, create_app
except ImportError as error:  # the optional extra is absent
    raise InputError(f"mitoscope serve needs the web extra ({error.name} is missing): pip install -e '.[web]'") from None

__all__ = ["ServeSettings", "create_app"]
