"""Validation of raw resources with the fhir.resources R4B models, remembered by content.

Validating one Observation costs some 25 times more than parsing its JSON, and an EHR sends the same results
every time a chart is opened (a ward round opens each chart several times a day, each with the same labs and the
temperatures since). The verdict is a pure function of the resource's content, so it is kept per process, keyed
by a digest of the resource's JSON: a resource seen before costs a serialisation and a hash, not a validation.
The memo is bounded (least recently used verdicts go first) and holds verdicts only, never resource content.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson

#: Verdicts kept per process; each costs about 150 bytes (a 16-byte digest, the model name and the verdict).
MEMO_SIZE = 32_768


def validate(model: type[Any], resource: Mapping[str, Any]) -> str | None:
    """Why ``resource`` is not a valid ``model`` (a fhir.resources R4B class), or None when it is."""
    try:
        model.model_validate(resource)
    except Exception as error:  # noqa: BLE001 - untrusted input; pydantic raises several kinds
        errors = getattr(error, "errors", None)
        details = errors() if callable(errors) else None
        first = details[0] if isinstance(details, list) and details else None
        if isinstance(first, Mapping):
            where = ".".join(str(part) for part in first.get("loc", ())) or "resource"
            return f"{where}: {first.get('msg', 'invalid')}"[:200]
        return f"invalid {model.__name__}"
    return None


class VerdictMemo:
    """A bounded, thread-safe map from (model, resource digest) to the validation verdict."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._size = size
        self._verdicts: OrderedDict[tuple[str, bytes], str | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._verdicts)

    def validation_error(self, model: type[Any], resource: Mapping[str, Any]) -> str | None:
        """The verdict of :func:`validate`, from the memo when this content was validated before."""
        try:
            content = orjson.dumps(resource)
        except TypeError:  # not plain JSON (an integer beyond 64 bits, read by the standard library): no memo
            return validate(model, resource)
        key = (model.__name__, hashlib.blake2b(content, digest_size=16).digest())
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                return self._verdicts[key]
        verdict = validate(model, resource)
        with self._lock:
            self._verdicts[key] = verdict
            while len(self._verdicts) > self._size:
                self._verdicts.popitem(last=False)
        return verdict

    def clear(self) -> None:
        """Forget every verdict (the benchmark measures the first sight of every resource this way)."""
        with self._lock:
            self._verdicts.clear()


#: This process's memo.
MEMO = VerdictMemo()


def validation_error(model: type[Any], resource: Mapping[str, Any]) -> str | None:
    """Why ``resource`` is not a valid ``model`` (a fhir.resources R4B class), or None; remembered by content."""
    return MEMO.validation_error(model, resource)
