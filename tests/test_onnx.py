"""``medclf export RUN --onnx``: each method's network as ONNX, checked with onnxruntime against torch.

The runs are trained here with the training API (a few steps, tiny networks, the 16-px brain-window
cache): enough to move every weight off its initialisation (the DiT's adaLN-Zero and DiDiCM's head
start at exactly zero output, so an untrained graph would compare 0 with 0). The torch reference
is computed with the methods' own calls (the training pass, ``represent``, ``DiDiCMNet.forward``),
not with the export's wrappers, on a batch size the export never saw (the batch axis is dynamic).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

TOL = 1e-4
BATCH = 5  #: the export traces batch 2 and checks batch 3: 5 is new to it
FIGURES: dict[str, float] = {}

#: method -> (finetune method name or "pretrain", method options)
METHODS = {
    "diffusion-classifier-dit": ("diffusion-classifier", {"arch": "dit", "model_size": "tiny", "trials": 4}),
    "diffusion-classifier-unet": ("diffusion-classifier", {"arch": "unet", "model_size": "tiny", "trials": 4}),
    "baseline": ("baseline", {"backbone": "test_resnet"}),
    "diffmic": ("diffmic", {"backbone": "test_resnet", "samples": 2, "diffusion_steps": 2}),
    "didicm": ("didicm", {"backbone": "test_resnet", "noise_draws": 1, "diffusion_steps": 2, "samples": 2}),
    "repdiff": ("pretrain", {"encoder": "test_vit", "model_size": "tiny"}),
}


@pytest.fixture(scope="module")
def tiny_runs(tiny_cache, tmp_path_factory):
    """``run(key)``: the key's run, trained on first use (8 steps, batch 8, lr 1e-2 so the weights move)."""
    from medclf.methods.repdiff import PretrainConfig
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig
    from medclf.training.pretrain import pretrain

    root, done = tmp_path_factory.mktemp("onnx-runs"), {}

    def run(key: str) -> Path:
        if key not in done:
            name, options = METHODS[key]
            tcfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=1, checkpoint_every=8, log_every=4,
                               seed=0, device="cpu")
            if name == "pretrain":
                pretrain(tiny_cache, root / key, PretrainConfig(**options), tcfg)
            else:
                finetune(tiny_cache, name, root / key, options, tcfg)
            done[key] = root / key
        return done[key]

    return run


def _reference(key: str, run_path: Path, n: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """(ONNX feeds, torch outputs in the graph's output order) from the method's own torch calls."""
    from medclf.methods.diffmic import card_q_sample
    from medclf.methods.didicm import log_linear
    from medclf.runs import build_from_run, load_run

    run = load_run(run_path)
    method, model = build_from_run(run)
    model.eval()
    C, H, W = run.config["shape"]
    K = len(run.config.get("classes") or [])
    g = torch.Generator().manual_seed(123)
    image = torch.rand(n, C, H, W, generator=g)
    with torch.no_grad():
        if key.startswith("diffusion-classifier"):
            x_t = torch.randn(n, C, H, W, generator=g)
            t = torch.randint(0, method.config.timesteps, (n,), generator=g)
            y = torch.randint(0, K + 1, (n,), generator=g)
            return {"x_t": x_t.numpy(), "t": t.numpy(), "class": y.numpy()}, [model(x_t, t, y).numpy()]
        if key == "baseline":
            return {"image": image.numpy()}, [model(image).numpy()]
        if key == "diffmic":
            t = torch.randint(0, method.config.timesteps, (n,), generator=g)
            y0 = torch.nn.functional.one_hot(torch.randint(0, K, (n,), generator=g), K).float()
            eps = torch.randn(n, K, generator=g)
            out = model(image, y0, t, eps)  # the training pass: y_t built from the fused DCG prior
            y_t = card_q_sample(y0, torch.softmax(out["logits"].float(), 1), model.alphas_cumprod[t][:, None], eps)
            return {"image": image.numpy(), "y_t": y_t.numpy(), "t": t.numpy()}, [out["eps"].numpy(), out["logits"].numpy()]
        if key == "didicm":
            label = torch.randint(0, K, (n,), generator=g)
            sigma, _ = log_linear(torch.rand(n, generator=g, dtype=torch.float64).float(), method.config.noise_eps)
            return {"image": image.numpy(), "label": label.numpy(), "sigma": sigma.numpy()}, [model(image, label, sigma).numpy()]
        if key == "repdiff":
            return {"image": image.numpy()}, [model.encoder(image).numpy(), model.represent(image).numpy()]
    raise AssertionError(key)


@pytest.mark.parametrize("key", list(METHODS))
def test_onnxruntime_reproduces_torch(key, tiny_runs, tmp_path, record_property):
    import onnxruntime as ort

    from medclf.export.onnx import export_onnx, read_onnx_meta

    run = tiny_runs(key)
    done = export_onnx(run, tmp_path / f"{key}.onnx")
    assert done.path.is_file() and done.sidecar == tmp_path / f"{key}.onnx.json"
    sess = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    # names, dtypes and shapes as recorded; the batch axis is symbolic, every other one fixed
    side = json.loads(done.sidecar.read_text())
    assert [i.name for i in sess.get_inputs()] == [t["name"] for t in side["inputs"]]
    assert [o.name for o in sess.get_outputs()] == [t["name"] for t in side["outputs"]]
    for got, want in zip([*sess.get_inputs(), *sess.get_outputs()], side["inputs"] + side["outputs"]):
        assert isinstance(got.shape[0], str), (got.name, got.shape)
        assert list(got.shape[1:]) == want["shape"][1:], (got.name, got.shape, want["shape"])
        assert got.type == {"float32": "tensor(float)", "int64": "tensor(int64)"}[want["dtype"]]
    feeds, ref = _reference(key, run, BATCH)
    outs = sess.run(None, feeds)
    assert len(outs) == len(ref)
    diff = 0.0
    for o, r in zip(outs, ref):
        assert o.shape == r.shape and o.shape[0] == BATCH
        assert np.abs(r).max() > 1e-6, "the torch output is all zeros: this comparison would prove nothing"
        diff = max(diff, float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()))
    FIGURES[key] = diff
    record_property("onnx_max_abs_diff", diff)
    print(f"\nONNX {key}: onnxruntime vs torch max |diff| = {diff:.3g} (export's own check: {done.max_abs_diff:.3g})")
    assert diff < TOL, (key, diff)
    # the graph carries the same record as the JSON beside it, including what stays in medclf
    meta = read_onnx_meta(done.path)
    assert meta == {k: v for k, v in side.items() if k != "onnx"}
    assert side["onnx"] == done.path.name and meta["method"] == METHODS[key][0].replace("pretrain", "repdiff")
    assert meta["check"]["max_abs_diff"] < TOL and meta["check"]["batch"] == 3
    assert "ONNX holds only the network" in meta["scoring"] and "stays in medclf" in meta["scoring"]
    assert meta["cache_fingerprint"] == json.loads((run / "config.json").read_text())["cache_fingerprint"]


def test_cli_writes_onnx_beside_the_run_by_default(tiny_runs, capsys):
    from medclf.cli import app
    from medclf.cli._common import run_app

    run = tiny_runs("baseline")
    target = run.with_name(run.name + ".onnx")
    target.unlink(missing_ok=True)
    assert run_app(app, ["export", str(run), "--onnx"]) == 0
    assert target.is_file() and target.with_name(target.name + ".json").is_file()
    assert not list(run.glob("*.onnx"))  # the run folder itself is left as it was
    printed = capsys.readouterr().out
    assert str(target) in printed and "image float32[batch, 1, 16, 16] -> logits float32[batch, 2]" in printed
    assert run_app(app, ["export", str(run)]) == 2  # neither --out nor --onnx: a usage error
    assert run_app(app, ["export", str(run), "--onnx", "--report", str(run)]) == 2


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_export_extra_is_one_line(missing, tiny_runs, tmp_path, monkeypatch, capsys):
    from medclf.cli import app
    from medclf.cli._common import run_app
    from medclf.errors import MedclfError
    from medclf.export.onnx import export_onnx

    run = tiny_runs("baseline")
    monkeypatch.setitem(sys.modules, missing, None)  # ``import missing`` now raises ImportError, as when not installed
    with pytest.raises(MedclfError) as e:
        export_onnx(run, tmp_path / "m.onnx")
    assert "pip install 'medclf[export]'" in str(e.value) and missing in str(e.value)
    assert run_app(app, ["export", str(run), "--onnx", "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'medclf[export]'" in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_model_card_says_the_scoring_loop_stays_in_medclf():
    from medclf.export.package import model_card

    for method in ("diffusion-classifier", "baseline", "diffmic", "didicm", "repdiff"):
        card = model_card({"method": method, "classes": ["a", "b"]}, None, "m")
        assert "## ONNX" in card and "ONNX holds only the network" in card and "stays in medclf" in card
    assert "trials" in model_card({"method": "diffusion-classifier"}, None, "m").split("## ONNX")[1]
