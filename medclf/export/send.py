"""Sending written DICOM objects (SRs, explain's DICOM maps) to a PACS or viewer with a C-STORE.

pynetdicom does the networking: one association for all files, a presentation context per SOP class
and transfer syntax the files use, then one C-STORE each. Nothing here deletes or rewrites a file:
when a peer is absent, refuses the association or answers a store with a failure status, the objects
stay on disk and a one-line MedclfError says what happened (never a patient identifier or a UID).
"""

from __future__ import annotations

import socket
from pathlib import Path

from medclf.errors import MedclfError

__all__ = ["parse_address", "send_files"]

#: seconds to wait for a TCP connection, for the association (A-ASSOCIATE/A-RELEASE) and for each C-STORE answer
CONNECT_TIMEOUT = 10.0
ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 60.0

#: C-STORE warning statuses (PS3.4 B.2.3): the peer kept the object, perhaps coerced
_WARNINGS = {0xB000, 0xB006, 0xB007}


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6-address]:PORT`` too) -> (host, port); a MedclfError saying what is wrong otherwise."""
    text = (value or "").strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port:
        raise MedclfError(f"--send {value!r}: expected HOST:PORT (e.g. pacs.example.org:11112)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MedclfError(f"--send {value!r}: port must be a number from 1 to 65535")
    return host, int(port)


def _check_aet(aet: str, what: str) -> str:
    """An AE title as DICOM allows it (1-16 characters of printable ASCII, not only spaces, no backslash)."""
    s = str(aet or "")
    if not s.strip() or len(s) > 16 or "\\" in s or not all(32 <= ord(c) < 127 for c in s):
        raise MedclfError(f"{what} {aet!r}: an AE title is 1 to 16 printable ASCII characters (no backslash)")
    return s.strip()


def send_files(paths: list[str | Path], host: str, port: int, called_aet: str, calling_aet: str = "MEDCLF") -> int:
    """C-STORE each DICOM file to ``called_aet`` at ``host:port`` over one association; returns how many were stored.

    Raises MedclfError (one line) when a file cannot be read, no peer answers, the association is
    refused or aborted, or a store fails; files already sent stay sent, and every file stays on disk."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.presentation import build_context
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    called, calling = _check_aet(called_aet, "--aet"), _check_aet(calling_aet, "calling AE title")
    where = f"{host}:{port}"
    datasets = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p)
            sop_class = str(ds.SOPClassUID)
            str(ds.SOPInstanceUID)  # a file without one cannot be stored: refused here, before connecting
        except Exception as e:
            raise MedclfError(f"cannot read the DICOM file to send ({type(e).__name__})", p) from None
        datasets.append((Path(p), ds, sop_class))
    if not datasets:
        return 0

    # one context per (SOP class, the file's own transfer syntax + the two uncompressed ones)
    syntaxes: dict[str, list[str]] = {}
    for _, ds, sop_class in datasets:
        ts = str(getattr(ds.file_meta, "TransferSyntaxUID", ExplicitVRLittleEndian))
        got = syntaxes.setdefault(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if ts not in got:
            got.insert(0, ts)
    if len(syntaxes) > 128:
        raise MedclfError(f"{len(syntaxes)} SOP classes to send: one association holds at most 128")

    # pynetdicom reports a refused or timed-out TCP connection as an aborted association, with the reason
    # only in its log: a plain connect first tells "nobody listens" from "a peer that said no"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        why = e.strerror or ("timed out" if isinstance(e, TimeoutError) else type(e).__name__)
        raise MedclfError(f"no DICOM peer at {where} ({why}); nothing was sent") from None

    ae = AE(ae_title=calling)
    ae.connection_timeout = CONNECT_TIMEOUT
    ae.acse_timeout = ACSE_TIMEOUT
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.network_timeout = DIMSE_TIMEOUT
    contexts = [build_context(c, ts) for c, ts in syntaxes.items()]
    try:
        assoc = ae.associate(host, port, contexts=contexts, ae_title=called)
    except Exception as e:  # an unresolvable host name, a bad address family
        raise MedclfError(f"cannot reach DICOM peer {where} ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if not assoc.is_established:
        if assoc.is_rejected:
            raise MedclfError(f"DICOM peer {where} rejected the association (called AE {called!r}, calling AE "
                              f"{calling!r}); nothing was sent")
        if assoc.is_aborted:
            raise MedclfError(f"DICOM peer {where} aborted the association request; nothing was sent")
        raise MedclfError(f"no DICOM peer at {where} (connection refused or timed out); nothing was sent")
    sent = 0
    try:
        for path, ds, _ in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # no accepted presentation context for this SOP class / transfer syntax
                raise MedclfError(f"DICOM peer {where} accepts no presentation context for this object's SOP class; "
                                  f"{sent} of {len(datasets)} sent", path) from None
            code = int(status.get("Status", -1)) if status else None
            if code is None:
                raise MedclfError(f"DICOM peer {where} did not answer the C-STORE (connection lost); "
                                  f"{sent} of {len(datasets)} sent", path)
            if code != 0x0000 and code not in _WARNINGS:
                raise MedclfError(f"DICOM peer {where} refused the object (C-STORE status 0x{code:04X}); "
                                  f"{sent} of {len(datasets)} sent", path)
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent
