"""Zero-shot evaluation of a frozen encoder: k-NN, nearest prototype, k-means (no fine-tuning).

Protocol (the same for every encoder compared, so only the features differ):

* Embed the labelled **train** split (the reference) and the evaluated split with the frozen
  encoder (pooled features, images as the cache holds them, no augmentation).
* Features are centred on the reference mean and L2-normalised ("CL2N", SimpleShot, Wang et al.
  2019): without centring, a random ViT's features share one large common direction and every
  cosine similarity is near 1.
* ``knn``: scikit-learn ``KNeighborsClassifier`` (k=10, cosine, distance-weighted) fitted on the
  reference. ``prototype``: ``NearestCentroid`` (one mean feature per class). ``kmeans``: label-free
  ``KMeans`` (K = number of classes, 10 inits) fitted on the reference features; clusters are matched
  to classes by the Hungarian algorithm on the reference labels (``linear_sum_assignment``), so no
  label of the evaluated split is used by any protocol.
* Metrics: ``medclf.evaluation.metrics.classification_metrics`` (accuracy, balanced accuracy,
  macro-F1, AUROC with the protocol's scores, bootstrap CIs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medclf.data.cache import CacheInfo
from medclf.errors import MedclfError

PROTOCOLS = ("knn", "prototype", "kmeans")


@dataclass
class ZeroShotConfig:
    k: int = 10  #: neighbours for knn
    seed: int = 0  #: k-means init and bootstrap
    batch_size: int = 128
    n_bootstrap: int = 1000
    reference_split: str = "train"  #: labelled split the classifiers are fitted on


@torch.no_grad()
def embed(encoder, images: torch.Tensor, device: torch.device, batch_size: int = 128) -> np.ndarray:
    """(N, F) float64 features of int16-cache or [0, 1] images, encoder in eval mode."""
    from medclf.data.cache import to_unit_float

    encoder.eval().to(device)
    out = [encoder(to_unit_float(images[i : i + batch_size].to(device))).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()


def cl2n(ref: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre on the reference mean, then L2-normalise rows (SimpleShot's CL2N)."""
    mu = ref.mean(0, keepdims=True)

    def norm(a: np.ndarray) -> np.ndarray:
        a = a - mu
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return norm(ref), norm(x)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _full_proba(p: np.ndarray, present: np.ndarray, n_classes: int) -> np.ndarray:
    """sklearn gives columns only for classes seen in the reference: put them in their K slots."""
    out = np.zeros((len(p), n_classes))
    out[:, present.astype(int)] = p
    return out


def classify_features(ref: np.ndarray, ref_y: np.ndarray, x: np.ndarray, protocol: str, n_classes: int,
                      k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, probs) for features ``x`` by ``protocol``, fitted on (``ref``, ``ref_y``); features as given."""
    if protocol == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        clf = KNeighborsClassifier(n_neighbors=min(k, len(ref)), metric="cosine", weights="distance").fit(ref, ref_y)
        probs = _full_proba(clf.predict_proba(x), clf.classes_, n_classes)
        return probs.argmax(1), probs
    if protocol == "prototype":
        from sklearn.neighbors import NearestCentroid

        clf = NearestCentroid().fit(ref, ref_y)
        pred = clf.predict(x).astype(int)
        # softmax of negative squared distances to the prototypes (sklearn's predict_proba form)
        probs = _full_proba(clf.predict_proba(x), clf.classes_, n_classes)
        return pred, probs
    if protocol == "kmeans":
        from scipy.optimize import linear_sum_assignment
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=n_classes, n_init=10, random_state=seed).fit(ref)
        counts = np.zeros((n_classes, n_classes))  # (cluster, class) on the reference
        np.add.at(counts, (km.labels_, ref_y), 1)
        rows, cols = linear_sum_assignment(-counts)
        to_class = np.empty(n_classes, dtype=int)
        to_class[rows] = cols
        d = km.transform(x)  # (N, clusters) distances
        probs = np.zeros((len(x), n_classes))
        probs[:, to_class] = _softmax(-(d**2) / max(np.median(d**2), 1e-12) * 4.0)
        return to_class[d.argmin(1)], probs
    raise MedclfError(f"unknown --protocol {protocol!r} ({', '.join(PROTOCOLS)})")


def _split_tensors(cache: CacheInfo, split: str) -> tuple[torch.Tensor, np.ndarray]:
    from medclf.data.dataset import CacheDataset

    from torch.utils.data import ConcatDataset

    ds = ConcatDataset([CacheDataset(cache, split=s, labelled_only=True) for s in split.split("+")])  # "val+test"
    if len(ds) == 0:
        raise MedclfError(f"split {split!r} has no labelled items (zero-shot evaluation needs labels there)", cache.path)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), np.array([it["label"] for it in items], dtype=np.int64)


def run_encoder(run_path: str | Path):
    """(run, Encoder) of a run: the pretrained encoder of a ``pretrain`` run, or ``model.backbone`` of
    a supervised run that has one."""
    from medclf.runs import load_encoder

    return load_encoder(run_path)


def baseline_encoder(spec: str, run_config: dict):
    """(label, Encoder) for ``--baseline-encoder``: ``[TIMM_NAME=]untrained|imagenet|PATH``.

    Without ``TIMM_NAME`` the run's encoder architecture is used. ``untrained`` is that architecture
    with the random init of the run's seed (the pretraining's starting point when it started from
    scratch); ``imagenet`` is timm's hub weights (online only); a path is a local weights file
    (DINOv2 / timm state dict, ``weights_only`` loading).
    """
    from medclf.models.backbone import create_encoder

    enc = run_config.get("encoder") or {}
    C, H, _ = run_config["shape"]
    name, sep, what = spec.partition("=")
    if not sep:
        name, what = enc.get("name") or run_config.get("method_config", {}).get("backbone"), spec
        if not name:
            raise MedclfError("this run records no encoder name: write the baseline as TIMM_NAME=untrained|imagenet|PATH")
    label = what if not sep else f"{name}={what}"
    torch.manual_seed(int(run_config.get("seed", 0)))
    if what == "untrained":
        return label, create_encoder(name, C, H)
    if what == "imagenet":
        return label, create_encoder(name, C, H, pretrained=True)
    path = Path(what)
    if not path.exists():
        raise MedclfError(f"--baseline-encoder {spec!r}: not 'untrained', 'imagenet' or an existing weights file")
    return f"{name}={path.name}" if sep else path.name, create_encoder(name, C, H, weights=path)


def zero_shot(encoders: list[tuple[str, object]], cache: CacheInfo, split: str, protocols: list[str] | tuple[str, ...] = PROTOCOLS,
              cfg: ZeroShotConfig | None = None, device: torch.device | None = None,
              shape: list[int] | tuple[int, ...] | None = None) -> dict:
    """Every (encoder, protocol) on ``split`` with ``cfg.reference_split`` as the labelled reference.

    ``encoders``: (label, Encoder) pairs, the first being the one under test; ``shape``: the (C, H, W)
    they were built for (checked against the cache). Returns a JSON-able
    report: {"split", "reference_split", "n_reference", "n_eval", "classes", "protocol",
    "results": [{"encoder", "protocol", "embed_seconds", metrics...}]}.
    """
    from medclf.evaluation.metrics import classification_metrics

    cfg = cfg or ZeroShotConfig()
    device = device or torch.device("cpu")
    for p in protocols:
        if p not in PROTOCOLS:
            raise MedclfError(f"unknown --protocol {p!r} ({', '.join(PROTOCOLS)})")
    classes = cache.classes
    if shape is not None:
        from medclf.runs import check_compatible

        check_compatible({"shape": list(shape)}, cache, what="the encoder")
    if len(classes) < 2:
        raise MedclfError("zero-shot evaluation needs a cache with at least 2 single-label classes", cache.path)
    ref_x, ref_y = _split_tensors(cache, cfg.reference_split)
    ev_x, ev_y = _split_tensors(cache, split)
    if len(np.unique(ref_y)) < 2:
        raise MedclfError(f"the {cfg.reference_split} split holds only one class: nothing to compare against", cache.path)
    results = []
    for label, enc in encoders:
        t0 = time.perf_counter()
        ref_f, ev_f = cl2n(embed(enc, ref_x, device, cfg.batch_size), embed(enc, ev_x, device, cfg.batch_size))
        seconds = time.perf_counter() - t0
        for p in protocols:
            pred, probs = classify_features(ref_f, ref_y, ev_f, p, len(classes), k=cfg.k, seed=cfg.seed)
            m = classification_metrics(ev_y, probs, classes, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, pred=pred)
            results.append({"encoder": label, "protocol": p, "embed_seconds": seconds, "num_features": int(ref_f.shape[1]),
                            **{k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "per_class",
                                                 "confusion_matrix", "ci95")}})
    return {"split": split, "reference_split": cfg.reference_split, "n_reference": int(len(ref_y)),
            "n_eval": int(len(ev_y)), "classes": classes, "cache": str(cache.path),
            "cache_fingerprint": cache.fingerprint, "k": cfg.k, "seed": cfg.seed,
            "protocol": "frozen pooled features, centred + L2-normalised on the reference split; knn: cosine "
                        f"k={cfg.k} distance-weighted; prototype: nearest class mean; kmeans: K clusters on the "
                        "reference, Hungarian-matched with reference labels",
            "results": results}
