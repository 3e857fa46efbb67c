"""Pseudonymous ids: what stands in for patient, study and file identifiers everywhere."""

from __future__ import annotations

import hashlib

# A fixed namespace so ids are stable across runs and machines (the same scan always gets the same
# id) but cannot be matched to the raw UID without knowing it is medclf that hashed it.
_NAMESPACE = "medclf-v1"


def pseudonym(*parts: object, length: int = 16) -> str:
    """A stable hex pseudonym of the given identifying parts (never store the parts themselves)."""
    h = hashlib.sha256(_NAMESPACE.encode())
    for p in parts:
        h.update(b"\x00" + str(p).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:length]
