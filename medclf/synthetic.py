"""Deterministic look-alike medical data for the demo, the tests and benchmarks.

Real datasets (RSNA ICH, ISIC) cannot ship with the repo, so this module fakes
their on-disk layout closely (file naming, CSV quirks, DICOM storage variants,
NIfTI orientations) while putting a simple, *learnable* signal in the pixels:
hyperdense blobs in head CT phantoms, irregular multicoloured lesions for
melanoma.  Every function is driven by a seeded ``numpy.random.Generator`` and
writes no timestamps, so two runs with the same seed give byte-identical files.
"""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, RLELossless

RSNA_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
BLEED_TYPES = RSNA_SUBTYPES[:5]
CORRUPT_RSNA_ID = "ID_6431af929"  # the real dataset's known unreadable file
ISIC_2019_CLASSES = ("MEL", "NV", "BKL", "BCC", "AK", "DF", "VASC", "SCC", "UNK")
_FOV_MM = 230.0


# --------------------------------------------------------------------------- head CT phantom
@dataclass(frozen=True)
class HeadAnatomy:
    """Per-patient geometry, drawn once so all slices of a series agree."""

    cx: float
    cy: float
    theta: float
    ax: float
    by: float
    skull_t: float
    bone_hu: float
    brain_hu: float
    vent_dx: float
    vent_dy: float
    bleed_hu: float
    bleed_phi: float
    bleed_r0: float
    bleed_rad: float
    bleed_extent: float
    bleed_depth: float


def draw_anatomy(rng: np.random.Generator) -> HeadAnatomy:
    """Random head shape/pose (normalised units: image half-width = 1)."""
    u = rng.uniform
    return HeadAnatomy(
        cx=u(-0.05, 0.05), cy=u(-0.05, 0.05), theta=u(-0.2, 0.2), ax=u(0.68, 0.78), by=u(0.80, 0.88),
        skull_t=u(0.05, 0.07), bone_hu=u(900, 1100), brain_hu=u(30, 38), vent_dx=u(0.09, 0.14),
        vent_dy=u(-0.08, 0.0), bleed_hu=u(62, 85), bleed_phi=u(-np.pi, np.pi), bleed_r0=u(0.25, 0.55),
        bleed_rad=u(0.10, 0.18), bleed_extent=u(0.8, 1.3), bleed_depth=u(0.08, 0.14),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-std Gaussian-filtered noise via FFT (keeps scipy out of the deps)."""
    n = rng.standard_normal(shape)
    fy, fx = np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :]
    out = np.fft.ifft2(np.fft.fft2(n) * np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))).real
    return out / (out.std() + 1e-12)


def _soft(d_px: np.ndarray) -> np.ndarray:
    """Anti-aliased mask from a signed distance in pixels (negative = inside)."""
    return np.clip(0.5 - d_px, 0.0, 1.0)


def _ellipse_d(p, q, a, b, px):
    """Approximate signed pixel distance to an axis-aligned ellipse."""
    return (np.sqrt((p / a) ** 2 + (q / b) ** 2) - 1.0) * min(a, b) * px


def head_phantom_slice(rng: np.random.Generator, size: int = 128, bleed: str | None = None, z: float = 0.0,
                       *, anatomy: HeadAnatomy | None = None) -> np.ndarray:
    """One axial head-CT slice in HU (float32, ``size`` x ``size``).

    ``z`` is the normalised height (-1 skull base .. 0 ventricles .. 1 vertex): the
    head and the ventricles shrink away from 0.  ``bleed`` is one of the RSNA
    subtypes (``any`` is not a subtype) and adds a 60-85 HU lesion.  Pass the same
    ``anatomy`` for every slice of one patient; otherwise one is drawn from ``rng``.
    """
    if bleed is not None and bleed not in BLEED_TYPES:
        raise ValueError(f"unknown bleed type {bleed!r}")
    a = anatomy if anatomy is not None else draw_anatomy(rng)
    px = size / 2.0
    c = (np.arange(size) - (size - 1) / 2.0) / px
    v0, u0 = np.meshgrid(c - a.cy, c - a.cx, indexing="ij")
    ct, st = np.cos(a.theta), np.sin(a.theta)
    p, q = ct * u0 + st * v0, -st * u0 + ct * v0  # head frame: p lateral, q posterior
    zs = float(np.sqrt(max(1.0 - 0.55 * z * z, 0.25)))
    ao, bo = a.ax * zs, a.by * zs
    ai, bi = ao - a.skull_t, bo - a.skull_t
    img = np.full((size, size), -1000.0)

    def blend(val, m):
        nonlocal img
        img = img * (1 - m) + val * m

    blend(25.0, _soft(_ellipse_d(p, q, ao + 0.03, bo + 0.03, px)))  # scalp
    blend(a.bone_hu, _soft(_ellipse_d(p, q, ao, bo, px)))  # skull
    brain = _soft(_ellipse_d(p, q, ai, bi, px))
    tex = a.brain_hu + 4.0 * _smooth_noise(rng, (size, size), size * 0.03)
    blend(tex, brain)
    vs = max(0.0, 1.0 - (z / 0.55) ** 2)  # ventricles only near z = 0
    if vs > 0.05:
        for s in (-1.0, 1.0):
            cu, cv, r = p - s * a.vent_dx, q - a.vent_dy, s * 0.3
            lu, lv = np.cos(r) * cu + np.sin(r) * cv, -np.sin(r) * cu + np.cos(r) * cv
            blend(5.0, brain * _soft(_ellipse_d(lu, lv, 0.045 * (0.5 + 0.5 * vs), 0.2 * vs, px)))
    if bleed is not None:
        blend(a.bleed_hu + 2.0 * _smooth_noise(rng, (size, size), 2.0), _bleed_mask(bleed, a, p, q, ai, bi, px) * brain)
    img += rng.normal(0.0, 4.0, (size, size))
    return img.astype(np.float32)


def _bleed_mask(kind, a, p, q, ai, bi, px):
    """Soft mask of the lesion in the head frame (p, q)."""
    phi = a.bleed_phi
    if kind == "intraparenchymal":
        cu, cv = a.bleed_r0 * ai * np.cos(phi), a.bleed_r0 * bi * np.sin(phi)
        ang = np.arctan2(q - cv, p - cu)
        rad = 2 * a.bleed_rad * (1 + 0.15 * np.cos(3 * ang + phi))
        return _soft((np.hypot(p - cu, q - cv) - rad) * px)
    if kind == "subdural":  # crescent hugging the inner table, tapering at both ends
        r_ell = np.sqrt((p / ai) ** 2 + (q / bi) ** 2)
        delta = np.angle(np.exp(1j * (np.arctan2(q / bi, p / ai) - phi)))
        w = a.bleed_depth * np.clip(1 - (delta / a.bleed_extent) ** 2, 0, None) / min(ai, bi)
        return np.clip(0.5 + (r_ell - (1 - w)) * min(ai, bi) * px, 0, 1) * (w > 0)
    if kind == "epidural":  # biconvex lens: skull on one side, a circle on the other
        bu, bv = ai * np.cos(phi), bi * np.sin(phi)
        n = np.array([np.cos(phi) / ai, np.sin(phi) / bi])
        n /= np.linalg.norm(n)
        rc = 0.27
        cu, cv = bu + n[0] * (rc - 1.4 * a.bleed_depth), bv + n[1] * (rc - 1.4 * a.bleed_depth)
        return _soft((np.hypot(p - cu, q - cv) - rc) * px)
    if kind == "subarachnoid":  # streak in the anterior interhemispheric fissure + small clot
        band = _soft((np.abs(p) - 0.025) * px) * ((q > -0.55 * bi) & (q < -0.1 * bi))
        return np.maximum(band, _soft((np.hypot(p, q + 0.35 * bi) - 0.05) * px))
    s = 1.0 if np.cos(phi) >= 0 else -1.0  # intraventricular: clot in the posterior horn
    return _soft((np.hypot(p - s * a.vent_dx, q - a.vent_dy - 0.1) - 0.08) * px)


# --------------------------------------------------------------------------- RSNA ICH tree
# (PixelRepresentation, BitsStored, RescaleIntercept); HU = stored * 1 + intercept.
_STORAGE = (
    (1, 16, -1024.0),  # a: signed int16, stored = HU + 1024
    (0, 16, -1024.0),  # b: unsigned uint16, stored = HU + 1024 (HU < -1024 clipped)
    (0, 12, -1024.0),  # c: unsigned 12-bit, stored = clip(HU + 1024, 0, 4095)
    (1, 16, -1000.0),  # d: signed int16, stored = HU + 1000
)


def _uid(seed: int, *parts) -> str:
    """Deterministic UUID-derived ``2.25.`` UID.  Not ``generate_uid(prefix=None, entropy_srcs=...)``:
    pydicom 3 ignores ``entropy_srcs`` when ``prefix`` is None and returns a random UUID."""
    return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(map(str, ('medclf-synthetic', seed, *parts)))).int}")


def _ct_dataset(hu, *, variant, pat, study_uid, series_uid, sop_uid, inst, two_window, spacing) -> Dataset:
    """A CT slice Dataset storing ``hu`` with storage ``variant`` (see ``_STORAGE``)."""
    pr, bits, icpt = _STORAGE[variant]
    stored = np.clip(np.rint(hu - icpt), 0 if pr == 0 else -32768, (1 << bits) - 1 if pr == 0 else 32767)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyDate = ds.SeriesDate = "20190101"
    ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
    ds.PatientName, ds.PatientID = f"PHANTOM^NAME{pat:02d}", f"PHID{pat:04d}"
    ds.PatientBirthDate = f"1950{pat % 12 + 1:02d}{pat % 28 + 1:02d}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(pat + 1), 1, inst + 1
    ds.ImagePositionPatient = [-_FOV_MM / 2, -_FOV_MM / 2, inst * 5.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = 5
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, pr
    ds.RescaleIntercept, ds.RescaleSlope = icpt, 1
    ds.WindowCenter, ds.WindowWidth = ([40, 40], [80, 80]) if two_window else (40, 80)
    ds.PixelData = stored.astype("<i2" if pr else "<u2").tobytes()
    return ds


def make_rsna_tree(root: Path, n_patients: int = 16, slices_per_series: int = 8, size: int = 128, seed: int = 0,
                   positive_fraction: float = 0.5, corrupt: bool = True, compress_fraction: float = 0.25) -> Path:
    """Write an RSNA-ICH-shaped tree: ``stage_2_train/ID_<hex>.dcm`` + ``stage_2_train.csv``.

    One study/series per patient; positive patients carry one bleed subtype in a
    contiguous run of ~half their slices.  Storage cycles per series through
    (HU = stored * RescaleSlope(1) + RescaleIntercept):
    a) signed 16-bit, intercept -1024: stored = HU + 1024;
    b) unsigned 16-bit, intercept -1024: stored = HU + 1024 clipped at 0;
    c) unsigned BitsStored 12, intercept -1024: stored = clip(HU + 1024, 0, 4095);
    d) signed 16-bit, intercept -1000: stored = HU + 1000.
    ``compress_fraction`` of the series are RLE Lossless.  The CSV has six rows
    per image and one duplicated image block.  With ``corrupt``, an extra
    single-slice patient ``ID_6431af929.dcm`` has its pixel data cut short (the
    header reads, decoding the pixels fails).  Returns ``root``.
    """
    root = Path(root)
    img_dir = root / "stage_2_train"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])
    n_pos = int(round(n_patients * positive_fraction))
    pos = set(rng.choice(n_patients, n_pos, replace=False).tolist())
    subtypes = [BLEED_TYPES[i % 5] for i in rng.permutation(max(n_pos, 5))][:n_pos]
    rle = set(rng.choice(n_patients, int(round(n_patients * compress_fraction)), replace=False).tolist())
    ids: list[str] = []
    while len(ids) < n_patients * slices_per_series:
        i = f"ID_{int(rng.integers(0, 16**9)):09x}"
        if i not in ids and i != CORRUPT_RSNA_ID:
            ids.append(i)
    spacing = round(_FOV_MM / size, 6)
    labels: dict[str, list[int]] = {}
    for pat in range(n_patients + (1 if corrupt else 0)):
        prng = np.random.default_rng([seed, 12, pat])
        anat, two_window = draw_anatomy(prng), bool(prng.random() < 0.5)
        n_sl = slices_per_series if pat < n_patients else 1
        kind, run = None, range(0)
        if pat in pos:
            kind = subtypes.pop()
            length = max(1, int(round(n_sl / 2 + prng.integers(-1, 2))))
            start = int(prng.integers(0, n_sl - length + 1))
            run = range(start, start + length)
        study, series = _uid(seed, "study", pat), _uid(seed, "series", pat)
        for s in range(n_sl):
            z = -0.7 + 1.4 * s / max(n_sl - 1, 1) if n_sl > 1 else 0.0
            hu = head_phantom_slice(prng, size, kind if s in run else None, z, anatomy=anat)
            ds = _ct_dataset(hu, variant=pat % 4, pat=pat, study_uid=study, series_uid=series,
                             sop_uid=_uid(seed, "sop", pat, s), inst=s, two_window=two_window, spacing=spacing)
            img_id = ids[pat * slices_per_series + s] if pat < n_patients else CORRUPT_RSNA_ID
            if pat in rle:
                ds.compress(RLELossless, generate_instance_uid=False)  # default would mint a random UID
            path = img_dir / f"{img_id}.dcm"
            ds.save_as(path, enforce_file_format=True)
            if img_id == CORRUPT_RSNA_ID:  # chop the tail of the (last) PixelData element
                data = path.read_bytes()
                path.write_bytes(data[: len(data) - size * size])
            labels[img_id] = [int(s in run and t == kind) for t in BLEED_TYPES] + [int(s in run)]
    order = [list(labels)[i] for i in rng.permutation(len(labels))]
    dup = order[int(rng.integers(0, len(order)))]
    with open(root / "stage_2_train.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "Label"])
        for img_id in order + [dup]:
            w.writerows([f"{img_id}_{t}", v] for t, v in zip(RSNA_SUBTYPES, labels[img_id]))
    return root


# --------------------------------------------------------------------------- NIfTI volumes
def make_nifti_volumes(root: Path, n: int = 4, size: int = 64, depth: int = 16, seed: int = 0) -> list[Path]:
    """Write ``n`` int16-HU head volumes plus ``labels.csv`` (``path,label``).

    Voxels are 0.9 x 0.9 x 5 mm.  Format cycles with ``i % 4``: NIfTI-1 .nii.gz
    (RAS), NIfTI-1 plain .nii, NIfTI-2 .nii.gz, NIfTI-1 .nii.gz stored LPS (x and
    y flipped in data and affine, so reorienting to canonical restores RAS).
    Odd-indexed volumes carry a bleed in a contiguous run of slices.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vx = (0.9, 0.9, 5.0)
    ras = np.diag([*vx, 1.0])
    ras[:3, 3] = [-vx[0] * (size - 1) / 2, -vx[1] * (size - 1) / 2, -vx[2] * (depth - 1) / 2]
    paths, rows = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 21, i])
        anat, kind = draw_anatomy(rng), (rng.choice(["intraparenchymal", "subdural", "epidural"]) if i % 2 else None)
        start = int(rng.integers(depth // 4, depth // 2))
        run = range(start, start + max(1, depth // 3))
        vol = np.empty((size, size, depth), np.int16)
        for k in range(depth):
            img = head_phantom_slice(rng, size, kind if k in run else None, -0.8 + 1.6 * k / max(depth - 1, 1),
                                     anatomy=anat)
            # image rows run anterior->posterior, columns right->left (radiological view)
            vol[:, :, k] = np.clip(np.rint(img[::-1, ::-1].T), -1024, 3071).astype(np.int16)
        fmt, affine, data = i % 4, ras, vol
        if fmt == 3:
            flip = np.array([[-1, 0, 0, size - 1], [0, -1, 0, size - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
            affine, data = ras @ flip, np.ascontiguousarray(vol[::-1, ::-1, :])
        cls = nib.Nifti2Image if fmt == 2 else nib.Nifti1Image
        im = cls(data, affine)
        im.header.set_data_dtype(np.int16)
        im.header.set_xyzt_units("mm")
        im.set_qform(affine, code=1)
        im.set_sform(affine, code=1)
        path = root / f"vol_{i:03d}{'.nii' if fmt == 1 else '.nii.gz'}"
        nib.save(im, path)
        paths.append(path)
        rows.append([path.name, "haemorrhage" if kind else "normal"])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows(rows)
    return paths


# --------------------------------------------------------------------------- ISIC dermoscopy
def _lesion_image(rng: np.random.Generator, size: int, label: str, lp: dict) -> np.ndarray:
    """Dermoscopy look-alike: skin, hairs, and a lesion whose shape/colour encode ``label``."""
    c = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    skin = lp["skin"] + 6 * _smooth_noise(rng, (size, size), size / 8)[..., None]
    img = skin + rng.normal(0, 3, (size, size, 3))
    rot = lp["rot"] + rng.uniform(-0.3, 0.3)  # a second image of a lesion is a re-take
    ang, r = np.arctan2(yy, xx), np.hypot(yy, xx)
    radius = lp["r0"] * size * rng.uniform(0.95, 1.05) * (
        1 + sum(amp * np.cos(k * (ang - rot) + ph) for k, amp, ph in lp["harm"]))
    mask = np.clip((radius - r) / 1.5, 0, 1)[..., None]
    if label == "MEL":  # multicoloured: dark brown, black, blue-grey patches, off-centre
        cols = np.array([[120, 70, 45], [70, 40, 25], [30, 22, 20], [95, 105, 125]], float)
        f = _smooth_noise(rng, (size, size), size / 14) + 0.04 * (xx * np.cos(rot) + yy * np.sin(rot))
        idx = np.digitize(f, [-0.6, 0.3, 1.0])
        lesion = cols[idx] + rng.normal(0, 6, (size, size, 3))
    else:  # NV mid brown, BKL light tan; uniform with a gentle radial fade
        base = np.array([140, 90, 60] if label == "NV" else [180, 140, 100], float) * lp["tone"]
        lesion = base + 25 * (r / (lp["r0"] * size))[..., None] + rng.normal(0, 3, (size, size, 3))
    pil = Image.fromarray(np.clip(img * (1 - mask) + lesion * mask, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 5))):  # hairs: gently curved dark strokes
        pts = rng.uniform(0, size, (2, 2))
        mid = pts.mean(0) + rng.normal(0, size / 8, 2)
        t = np.linspace(0, 1, 12)[:, None]
        curve = (1 - t) ** 2 * pts[0] + 2 * t * (1 - t) * mid + t**2 * pts[1]
        draw.line([tuple(p) for p in curve], fill=(45, 30, 25), width=int(rng.integers(1, 3)))
    return np.asarray(pil)


def make_isic_tree(root: Path, n: int = 80, size: int = 96, seed: int = 0, year: int = 2019) -> Path:
    """Write an ISIC 2019 (or Kaggle 2020 with ``year=2020``) shaped JPEG tree.

    ~half MEL, the rest NV (~60 %) and BKL.  2019: ``ISIC_2019_Training_Input/``,
    one-hot ``ISIC_2019_Training_GroundTruth.csv`` and ``..._Metadata.csv`` (two
    images carry ``_downsampled``; a few lesion_ids have two images; some blank).
    2020: ``jpeg/train/`` + ``train.csv``.  JPEG quality 90, RGB.
    """
    if year not in (2019, 2020):
        raise ValueError("year must be 2019 or 2020")
    root = Path(root)
    rng = np.random.default_rng([seed, 31, year])
    n_mel = n // 2
    labels = ["MEL"] * n_mel + ["NV"] * int(round((n - n_mel) * 0.6))
    labels = np.array(labels + ["BKL"] * (n - len(labels)))[rng.permutation(n)].tolist()
    nums = np.sort(rng.choice(73000, n, replace=False))
    names = [f"ISIC_{k:07d}" for k in nums]
    for j in rng.choice(n, min(2, n), replace=False):
        names[j] += "_downsampled"
    sites = ["anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck", ""]
    lesions, recs = {}, []
    pair_src = {}  # image j -> earlier image it is a second view of (same lesion)
    for j in rng.choice(np.arange(1, n), min(3, n - 1), replace=False) if n > 1 else []:
        if j in pair_src.values():
            continue
        same = [k for k in range(j) if labels[k] == labels[j] and k not in pair_src and k not in pair_src.values()]
        if same:
            pair_src[int(j)] = same[-1]
    for j, label in enumerate(labels):
        if j in pair_src:
            lesions[j] = lesions[pair_src[j]]
            recs.append(dict(recs[pair_src[j]], image=names[j]))
        else:
            mel = label == "MEL"
            n_h = 6 if mel else 1
            lesions[j] = dict(
                skin=np.array([225, 180, 160], float) + rng.normal(0, 8, 3), rot=rng.uniform(0, 2 * np.pi),
                r0=rng.uniform(0.26, 0.36) if mel else rng.uniform(0.2, 0.3), tone=rng.uniform(0.9, 1.1),
                harm=[(k, rng.uniform(0.05, 0.15) if mel else rng.uniform(0, 0.03), rng.uniform(0, 6.3))
                      for k in range(2, 2 + n_h)])
            recs.append(dict(image=names[j], age=f"{5 * int(rng.integers(4, 18))}.0" if rng.random() > 0.05 else "",
                             site=sites[int(rng.integers(len(sites)))], sex=("male", "female")[int(rng.integers(2))],
                             lesion=f"BCN_{int(rng.integers(0, 10**7)):07d}" if rng.random() > 0.15 else "",
                             patient=f"IP_{int(rng.integers(0, 10**7)):07d}"))
        if j in pair_src and not recs[j]["lesion"]:
            recs[j]["lesion"] = recs[pair_src[j]]["lesion"] = f"HAM_{int(nums[j]):07d}"
    img_dir = root / ("ISIC_2019_Training_Input" if year == 2019 else "jpeg/train")
    img_dir.mkdir(parents=True, exist_ok=True)
    for j, label in enumerate(labels):
        arr = _lesion_image(rng, size, label, lesions[j])
        Image.fromarray(arr).save(img_dir / f"{names[j]}.jpg", "JPEG", quality=90)
    if year == 2019:
        with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", *ISIC_2019_CLASSES])
            w.writerows([r["image"], *("1.0" if c == lab else "0.0" for c in ISIC_2019_CLASSES)]
                        for r, lab in zip(recs, labels))
        with open(root / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", "age_approx", "anatom_site_general", "lesion_id", "sex"])
            w.writerows([r["image"], r["age"], r["site"], r["lesion"], r["sex"]] for r in recs)
    else:
        diag = {"MEL": "melanoma", "NV": "nevus", "BKL": "seborrheic keratosis"}
        with open(root / "train.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                        "diagnosis", "benign_malignant", "target"])
            for j, (r, lab) in enumerate(zip(recs, labels)):
                d = "unknown" if lab == "NV" and j % 2 else diag[lab]
                site = {"anterior torso": "torso", "posterior torso": "torso"}.get(r["site"], r["site"])
                w.writerow([r["image"], r["patient"], r["sex"], r["age"], site, d,
                            "malignant" if lab == "MEL" else "benign", int(lab == "MEL")])
    return root


# --------------------------------------------------------------------------- all together
def make_sample_data(root: Path, seed: int = 0) -> dict:
    """Default demo set under ``root/{rsna,nifti,isic}``; returns a JSON-able summary."""
    root = Path(root)
    # 40 patients at 64 px: enough held-out slices to show a model beats chance, still ~3 MB.
    rsna = make_rsna_tree(root / "rsna", n_patients=40, size=64, seed=seed)
    vols = make_nifti_volumes(root / "nifti", seed=seed)
    isic = make_isic_tree(root / "isic", seed=seed)
    n_dcm = len(list((rsna / "stage_2_train").glob("*.dcm")))
    files = [p for p in root.rglob("*") if p.is_file()]
    return {
        "root": str(root),
        "seed": seed,
        "rsna": {"path": str(rsna), "dicom_files": n_dcm, "corrupt_file": f"{CORRUPT_RSNA_ID}.dcm"},
        "nifti": {"path": str(root / "nifti"), "volumes": len(vols)},
        "isic": {"path": str(isic), "images": len(list((isic / "ISIC_2019_Training_Input").glob("*.jpg")))},
        "files": len(files),
        "total_bytes": sum(p.stat().st_size for p in files),
    }


# --------------------------------------------------------------------------- subtle-lesion benchmark task
def _head_frame(a: HeadAnatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(p, q) head-frame coordinates of every pixel, as ``head_phantom_slice`` computes them."""
    c = (np.arange(size) - (size - 1) / 2.0) / (size / 2.0)
    v0, u0 = np.meshgrid(c - a.cy, c - a.cx, indexing="ij")
    ct, st = np.cos(a.theta), np.sin(a.theta)
    return ct * u0 + st * v0, -st * u0 + ct * v0


def subtle_lesion_mask(a: HeadAnatomy, size: int, z: float, radius_mm: float, phi: float, r0: float) -> np.ndarray:
    """Soft disc of ``radius_mm`` inside the brain at polar position (r0 of the inner axes, angle phi).

    Radius in mm (the field of view is 230 mm), so the lesion covers the same anatomy at every
    ingest ``--size``: 5 mm is ~2.8 px at 128 px and ~0.7 px at 32 px.
    """
    p, q = _head_frame(a, size)
    px = size / 2.0
    zs = float(np.sqrt(max(1.0 - 0.55 * z * z, 0.25)))
    ai, bi = a.ax * zs - a.skull_t, a.by * zs - a.skull_t
    cu, cv = r0 * ai * np.cos(phi), r0 * bi * np.sin(phi)
    rad = radius_mm / (_FOV_MM / 2.0)
    return _soft((np.hypot(p - cu, q - cv) - rad) * px)


def make_subtle_rsna_tree(root: Path, n_patients: int = 100, slices_per_series: int = 8, size: int = 256,
                          seed: int = 0, lesion_radius_mm: float = 5.0, lesion_contrast_hu: float = 12.0,
                          positive_fraction: float = 0.5) -> Path:
    """An RSNA-ICH-layout tree (``stage_2_train/`` + ``stage_2_train.csv``) whose bleeds are small and faint.

    The benchmark task of issue #16: every patient carries one round intraparenchymal lesion, fixed in
    the head, in a contiguous run of ``round(positive_fraction * slices_per_series)`` slices, so about
    ``positive_fraction`` of all slices are positive and every split holds both classes. The lesion
    adds ``lesion_contrast_hu`` (x U(0.8, 1.2) per patient) on top of brain texture (+-4 HU) and
    pixel noise (4 HU sd), radius ``lesion_radius_mm`` (x U(0.8, 1.2)). Defaults (5 mm, +12 HU) are
    invisible at 32 px and learnable at 128 px. No storage quirks, compression or corrupt file (the
    task is the pixels; ``make_rsna_tree`` covers the format), signed int16, HU + 1024. Deterministic
    from ``seed``: the same arguments write byte-identical files. Returns ``root``.
    """
    if not 0 < positive_fraction < 1:
        raise ValueError("positive_fraction must be in (0, 1)")
    if slices_per_series < 2:
        raise ValueError("slices_per_series must be >= 2 (each patient has positive and negative slices)")
    root = Path(root)
    img_dir = root / "stage_2_train"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 41])
    ids: list[str] = []
    while len(ids) < n_patients * slices_per_series:
        i = f"ID_{int(rng.integers(0, 16**9)):09x}"
        if i not in ids and i != CORRUPT_RSNA_ID:
            ids.append(i)
    spacing = round(_FOV_MM / size, 6)
    n_sl = slices_per_series
    length = min(n_sl - 1, max(1, int(round(positive_fraction * n_sl))))
    labels: dict[str, list[int]] = {}
    for pat in range(n_patients):
        prng = np.random.default_rng([seed, 42, pat])
        anat = draw_anatomy(prng)
        start = int(prng.integers(0, n_sl - length + 1))
        run = range(start, start + length)
        rad = lesion_radius_mm * prng.uniform(0.8, 1.2)
        contrast = lesion_contrast_hu * prng.uniform(0.8, 1.2)
        phi, r0 = prng.uniform(-np.pi, np.pi), prng.uniform(0.2, 0.6)
        study, series = _uid(seed, "subtle-study", pat), _uid(seed, "subtle-series", pat)
        for s in range(n_sl):
            z = -0.5 + 1.0 * s / (n_sl - 1)  # away from the skull base, where the brain is small
            hu = head_phantom_slice(prng, size, None, z, anatomy=anat)
            if s in run:
                hu = hu + contrast * subtle_lesion_mask(anat, size, z, rad, phi, r0)
            ds = _ct_dataset(hu, variant=0, pat=pat, study_uid=study, series_uid=series,
                             sop_uid=_uid(seed, "subtle-sop", pat, s), inst=s, two_window=False, spacing=spacing)
            img_id = ids[pat * n_sl + s]
            ds.save_as(img_dir / f"{img_id}.dcm", enforce_file_format=True)
            pos = int(s in run)
            labels[img_id] = [0, pos, 0, 0, 0, pos]  # intraparenchymal + any
    order = [list(labels)[i] for i in rng.permutation(len(labels))]
    with open(root / "stage_2_train.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "Label"])
        for img_id in order:
            w.writerows([f"{img_id}_{t}", v] for t, v in zip(RSNA_SUBTYPES, labels[img_id]))
    return root
