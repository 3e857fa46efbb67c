"""The one in-memory image type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: intensity kinds: "hu" (CT, Hounsfield units), "mono" (any other grey image), "rgb"
INTENSITY_KINDS = ("hu", "mono", "rgb")


@dataclass
class ImageData:
    """Pixels plus the geometry and acquisition facts medclf keeps.

    ``array`` is float32 ``(S, H, W, C)``: S slices (1 for a 2-D image), C = 1 or 3 channels, each
    slice in display orientation (rows top->bottom, columns left->right as a viewer shows them).
    ``meta`` holds only non-identifying facts (modality, spacing, orientation, transfer syntax...):
    readers whitelist what they copy, so patient identifiers never leave the reader.
    """

    array: np.ndarray
    kind: str
    meta: dict = field(default_factory=dict)
    #: 4x4 voxel (row, col, slice) -> patient RAS+ mm affine, for images with known patient geometry:
    #: NIfTI, and DICOM with ImagePositionPatient/ImageOrientationPatient/PixelSpacing -- a single file
    #: and the same file read as a one-file series get the same one. None otherwise (PNG/JPEG, DICOM
    #: without positions): map writers then use a plain affine at the origin (``export.maps._plain_affine``)
    affine: np.ndarray | None = None
    #: pseudonymous grouping key (hash of patient/study), for splits; never the raw identifier
    group: str | None = None

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])
