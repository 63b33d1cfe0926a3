"""JSON that every parser reads: NaN and +/-Inf become null (json.dumps would write NaN)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps with allow_nan=False; a value holding NaN/Inf is sanitised, then written.

    The first try is the plain C encoder, so clean data (nearly all of it) costs one pass;
    only a value that holds a non-finite float pays for the copy.
    """
    kwargs["allow_nan"] = False
    try:
        return json.dumps(value, **kwargs)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise  # a circular reference: not ours to mend
        return json.dumps(finite_or_none(value), **kwargs)
