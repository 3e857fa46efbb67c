"""``medclf export RUN --onnx``: the run's network as an ONNX graph, for serving outside Python/medclf.

ONNX holds the *network* only: one forward pass with the inputs each method's network takes
(``NETWORKS`` below). The scoring loop around it (the diffusion classifier's (t, eps) trials, paired
errors, adaptive budget and voting; DiffMIC's DDIM label chains; DiDiCM's CP/CL samplers; the
calibrated softmax of every method) stays in medclf: ``scoring_note`` says what a re-implementation
must repeat, and goes into the graph's ``metadata_props``, the JSON beside it and the package's card.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). The TorchScript tracer
(``dynamo=False``) fails on DiffMIC's guidance model, which takes Python ``round()`` of a feature-map
size and picks ROI crops with argmax/gather loops, and it is deprecated since torch 2.9; dynamo
exports all five networks with a symbolic batch axis. The example batch has 2 items (a batch of 1
would be specialised to a constant), and the written graph is checked with onnxruntime on a batch
of 3 against torch before the file is renamed into place.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from medclf import __version__
from medclf.atomic import atomic_write, atomic_write_text
from medclf.errors import MedclfError
from medclf.runs import Run, build_from_run, load_run

EXTRA = "pip install 'medclf[export]'"
FORMAT = "medclf-onnx"
FORMAT_VERSION = 1
OPSET = 18
#: onnxruntime vs torch on the check batch: above this the export is refused (float32 graphs agree to ~1e-6)
TOLERANCE = 1e-3
CHECK_BATCH = 3
EXAMPLE_BATCH = 2


@dataclass
class Tensor:
    """One graph input or output: its name, dtype, shape ("batch" = the dynamic axis) and meaning."""

    name: str
    dtype: str
    shape: list
    meaning: str


@dataclass
class Graph:
    """A method's network as a module with plain tensor inputs/outputs, and how to draw example inputs."""

    module: nn.Module
    inputs: list[Tensor]
    outputs: list[Tensor]
    example: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and how closely onnxruntime reproduced torch."""

    path: Path
    sidecar: Path
    method: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    max_abs_diff: float
    meta: dict = field(default_factory=dict)


def require_onnx() -> tuple:
    """(onnx, onnxruntime), or one line saying which extra to install (the dynamo exporter also needs onnxscript)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter builds the graph with it)
    except ImportError as e:
        raise MedclfError(f"ONNX export needs {e.name or 'onnx, onnxruntime and onnxscript'}: {EXTRA}") from None
    return onnx, onnxruntime


# ----------------------------------------------------------------------------- the networks


class _DiffMICStep(nn.Module):
    """DiffMIC's network for one denoising step: image -> DCG prior; (image features, y_t, prior, t) -> eps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, feats = self.net.guidance(image)
        prior = torch.softmax(d["logits"].float(), 1)
        return self.net.head(self.net.head.encode(feats), y_t, prior, t).float(), d["logits"].float()


class _DiDiCMScores(nn.Module):
    """DiDiCM's network with one (noisy label, sigma) per image (``DiDiCMNet.forward`` also takes M per image)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, label: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net.scores(self.net.features(image), label, sigma)


class _Encoder(nn.Module):
    """A pretraining run's encoder: pooled features (what ``finetune --init`` loads) and the representation r."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.encoder(image)
        return f.float(), self.net.project(f).float()


def _image(C: int, H: int, W: int) -> Tensor:
    return Tensor("image", "float32", ["batch", C, H, W], "image in [0, 1] (the cache's int16 / 32767), the run's "
                  "preprocessing and model size (resize to `shape` first when the run records `resize`)")


def network_graph(run: Run, method, model: nn.Module) -> Graph:
    """The network a run's method scores with, as an exportable module (one per method)."""
    C, H, W = run.config["shape"]
    K = len(run.config.get("classes") or [])
    name = run.method

    def img(n: int, g: torch.Generator) -> torch.Tensor:
        return torch.rand(n, C, H, W, generator=g)

    if name == "diffusion-classifier":
        T = method.config.timesteps
        return Graph(model, [
            Tensor("x_t", "float32", ["batch", C, H, W], "noised image sqrt(a_t) x0 + sqrt(1 - a_t) eps, x0 = 2 image - 1"),
            Tensor("t", "int64", ["batch"], f"DDPM timestep in 0..{T - 1}"),
            Tensor("class", "int64", ["batch"], f"class index in 0..{K - 1}, or {K} for the null class"),
        ], [Tensor("v", "float32", ["batch", C, H, W], "predicted velocity sqrt(a_t) eps - sqrt(1 - a_t) x0 (the run's "
                   "v-prediction recipe; eps = sqrt(a_t) v + sqrt(1 - a_t) x_t)")
            if getattr(method.config, "prediction", "epsilon") == "v"
            else Tensor("eps", "float32", ["batch", C, H, W], "predicted noise")],
            lambda n, g: (torch.randn(n, C, H, W, generator=g), torch.randint(0, T, (n,), generator=g),
                          torch.randint(0, K + 1, (n,), generator=g)))
    if name == "baseline":
        multi = run.config.get("task") == "multilabel"
        return Graph(model, [_image(C, H, W)],
                     [Tensor("logits", "float32", ["batch", K], "one logit per label (sigmoid)" if multi
                             else "class logits (softmax)")], lambda n, g: (img(n, g),))
    if name == "diffmic":
        T = method.config.timesteps
        return Graph(_DiffMICStep(model), [
            _image(C, H, W),
            Tensor("y_t", "float32", ["batch", K], "noisy label vector of CARD's prior-shifted process"),
            Tensor("t", "int64", ["batch"], f"timestep in 0..{T - 1}"),
        ], [Tensor("eps", "float32", ["batch", K], "predicted label noise, under the DCG prior softmax(prior_logits)"),
            Tensor("prior_logits", "float32", ["batch", K], "the DCG's fused logits: y_hat = softmax(prior_logits)")],
            lambda n, g: (img(n, g), torch.randn(n, K, generator=g), torch.randint(0, T, (n,), generator=g)))
    if name == "didicm":
        smax = -float(torch.log(torch.tensor(method.config.noise_eps)))
        return Graph(_DiDiCMScores(model), [
            _image(C, H, W),
            Tensor("label", "int64", ["batch"], f"noisy label c_t in 0..{K - 1}"),
            Tensor("sigma", "float32", ["batch"], f"total noise sigma(t) = -log(1 - (1 - eps) t), in (0, {smax:.3g}]"),
        ], [Tensor("log_scores", "float32", ["batch", K], "log p_t(j | x) / p_t(c_t | x) (0 at j = c_t)")],
            lambda n, g: (img(n, g), torch.randint(0, K, (n,), generator=g), torch.rand(n, generator=g) * smax))
    if name == "repdiff":
        enc = model.encoder
        return Graph(_Encoder(model), [_image(C, H, W)], [
            Tensor("features", "float32", ["batch", enc.num_features], f"pooled {enc.name} features (encoder.safetensors)"),
            Tensor("representation", "float32", ["batch", method.config.rep_dim], "r, the DiT's condition"),
        ], lambda n, g: (img(n, g),))
    raise MedclfError(f"no ONNX export for method {name!r}", run.path)


_SCORING = {
    "diffusion-classifier": "N (t, eps) trials shared by every class and image, each class's denoising error, the "
                            "adaptive budget (pruning classes by paired error excess), the decision rule (posterior, "
                            "vote or mean) and the calibrated softmax of negative mean errors (temperature + class bias)",
    "baseline": "the calibrated softmax (sigmoid per label for multi-label runs) with the run's temperature",
    "diffmic": "the DDIM label chains (samples x diffusion steps from y_T ~ N(y_hat, I), clipped to [0, 1]), their mean, "
               "spread and disagreement, and the calibrated softmax",
    "didicm": "the CP / CL samplers over the log-linear schedule (steps, chains, the label CP conditions on) and the "
              "calibrated probabilities",
    "repdiff": "nothing: a pretraining run's encoder has no classes or scores (`finetune --init RUN` starts a classifier)",
}


def scoring_note(config: dict) -> str:
    """What stays in medclf when a run is exported as ONNX (the card, the graph's metadata, the JSON beside it)."""
    what = _SCORING.get(config.get("method"), "the method's scoring loop")
    return ("ONNX holds only the network (one forward pass). The scoring loop stays in medclf: "
            f"{what}, as recorded in config.json. `medclf classify --model RUN` runs it; a re-implementation must "
            "repeat it, with the run's preprocessing.")


# ----------------------------------------------------------------------------- export


def _check(sess, graph: Graph, seed: int) -> float:
    """Max |onnxruntime - torch| over every output on a fresh batch (another size than the example: the axis is dynamic)."""
    g = torch.Generator().manual_seed(seed + 1)
    args = graph.example(CHECK_BATCH, g)
    with torch.no_grad():
        ref = graph.module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = sess.run(None, {t.name: a.numpy() for t, a in zip(graph.inputs, args)})
    diff = 0.0
    for spec, r, o in zip(graph.outputs, ref, got):
        if tuple(o.shape) != tuple(r.shape):
            raise MedclfError(f"ONNX output {spec.name} has shape {list(o.shape)}, torch {list(r.shape)}")
        diff = max(diff, float((torch.from_numpy(o).double() - r.double()).abs().max()))
    return diff


def default_out(run_path: str | Path) -> Path:
    """``RUN.onnx`` beside the run folder (``runs/a`` -> ``runs/a.onnx``; ``MODEL.zip`` -> ``MODEL.onnx``)."""
    p = Path(run_path)
    return p.with_suffix(".onnx") if p.suffix == ".zip" else p.with_name(p.name + ".onnx")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def export_onnx(run_path: str | Path, out: str | Path | None = None, seed: int = 0) -> OnnxExport:
    """Write the run's network as ONNX (``out``, default ``default_out``) and ``OUT.json`` beside it.

    Both carry the same record (medclf version, method, classes, shapes, inputs/outputs, what stays
    in medclf, the onnxruntime check); the graph holds it as ``metadata_props["medclf"]``."""
    onnx, ort = require_onnx()
    run = load_run(run_path)
    out = Path(out) if out is not None else default_out(run_path)
    if out.is_dir():
        raise MedclfError("is a folder: --out names the .onnx file to write", out)
    method, model = build_from_run(run)
    model = model.eval()
    graph = network_graph(run, method, model)
    graph.module.eval()
    args = graph.example(EXAMPLE_BATCH, torch.Generator().manual_seed(seed))
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/perf notes are not the user's business
        try:
            program = torch.onnx.export(graph.module, args, dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=[t.name for t in graph.inputs],
                                        output_names=[t.name for t in graph.outputs],
                                        dynamic_shapes=tuple({0: batch} for _ in args))
        except Exception as e:  # torch.export reports an unsupported op with pages of context: one line here
            raise MedclfError(f"ONNX export of the {run.method} network failed ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})", run.path) from None
    proto = program.model_proto
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "medclf_version": __version__,
            "torch_version": torch.__version__, "exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET,
            "method": run.method, "kind": run.kind, "task": run.config.get("task", "single"),
            "classes": run.config.get("classes") or [], "shape": run.config["shape"],
            **{k: run.config[k] for k in ("data_shape", "resize") if k in run.config},
            "cache_fingerprint": run.config.get("cache_fingerprint"),
            "preprocessing": run.config.get("preprocessing"),
            "inputs": [asdict(t) for t in graph.inputs], "outputs": [asdict(t) for t in graph.outputs],
            "scoring": scoring_note(run.config)}
    proto.doc_string = meta["scoring"]

    def save(tmp: str) -> None:
        del proto.metadata_props[:]
        for key, value in (("medclf", json.dumps(meta, sort_keys=True, default=str)), ("medclf.scoring", meta["scoring"])):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, tmp)

    def write(tmp: str) -> None:
        save(tmp)
        onnx.checker.check_model(tmp)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: onnxruntime's own warnings would reach the console
        diff = _check(ort.InferenceSession(tmp, opts, providers=["CPUExecutionProvider"]), graph, seed)
        if not diff <= TOLERANCE:
            raise MedclfError(f"onnxruntime differs from torch by {diff:.3g} (> {TOLERANCE:g}) on the exported "
                              f"{run.method} network; not written", run.path)
        meta["check"] = {"onnxruntime_version": ort.__version__, "batch": CHECK_BATCH, "max_abs_diff": diff}
        save(tmp)  # again, with the check's result in the graph's metadata too

    atomic_write(out, write)
    side = sidecar_path(out)
    atomic_write_text(side, json.dumps({**meta, "onnx": out.name}, indent=1, sort_keys=True, default=str) + "\n")
    return OnnxExport(path=out, sidecar=side, method=run.method, inputs=graph.inputs, outputs=graph.outputs,
                      max_abs_diff=meta["check"]["max_abs_diff"], meta=meta)


def read_onnx_meta(path: str | Path) -> dict:
    """The medclf record in an exported graph's ``metadata_props`` (reads the graph's header, not its weights)."""
    onnx, _ = require_onnx()
    proto = onnx.load_model(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if "medclf" not in props:
        raise MedclfError("not an ONNX graph written by `medclf export --onnx` (no medclf metadata)", path)
    return json.loads(props["medclf"])
