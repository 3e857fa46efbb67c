"""torchrun restarts and multi-node runs: a killed worker costs only the steps since the last
checkpoint, and every way of running a job ends in the same weights, bit for bit (CPU, gloo).

Workers run ``tests/_elastic_worker.py``: medclf's CLI, with rank 1 killed (``os._exit(1)``) right
after the first checkpoint when ``$ELASTIC_KILL_MARKER`` is set; the library has no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from medclf.io.weights import load_tensors

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_elastic_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT_S = 600  #: per torchrun agent; a 2-core CI machine runs a whole job in about a minute
STEPS, EVERY = 40, 10


def _job(cache: Path, run: Path) -> list[str]:
    """The finetune command every job here runs: same arguments on every attempt, as torchrun restarts it."""
    return [str(WORKER), "finetune", str(cache), "--out", str(run), "--arch", "dit", "--model-size", "tiny",
            "--trials", "8", "--steps", str(STEPS), "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
            "--checkpoint-every", str(EVERY), "--device", "cpu", "--seed", "1", "--resume", "auto", "--json"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTIC_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A torchrun agent in its own session (so a timeout can end it and all its workers), output to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([*TORCHRUN, *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)


def _finish(procs: list[subprocess.Popen], logs: list[Path], what: str) -> None:
    """Wait for every agent; on a non-zero exit or after ``TIMEOUT_S`` end them all (a lone agent would
    wait out its rendezvous timeout) and fail with the culprit's last output."""
    deadline, failed = time.monotonic() + TIMEOUT_S, None
    while failed is None and None in [p.poll() for p in procs]:  # poll every one (any() would stop early)
        failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
        if failed is None and time.monotonic() > deadline:
            failed = next(i for i, p in enumerate(procs) if p.returncode is None)
        time.sleep(0.2)
    failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), failed)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the agent's own session: it and its workers
            p.wait()
    if failed is not None:
        rc = procs[failed].returncode
        why = f"did not finish within {TIMEOUT_S} s" if rc in (None, -signal.SIGKILL) else f"exited {rc}"
        pytest.fail(f"{what}: torchrun {why}; {logs[failed].name} ends:\n{logs[failed].read_text()[-3000:]}")


def _summary(log: Path) -> dict | None:
    """finetune's --json summary (rank 0 prints it, once) from an agent's output, if there is one."""
    text, decoder = log.read_text(), json.JSONDecoder()
    for start in (i for i in range(len(text)) if text.startswith("{\n", i) and (i == 0 or text[i - 1] == "\n")):
        try:
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            continue
    return None


def _standalone(cache: Path, run: Path, tmp: Path, name: str, **env: str) -> Path:
    log = tmp / f"{name}.log"
    args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    _finish([_start([*args, *_job(cache, run)], log, _env(**env))], [log], name)
    return log


def _assert_same_weights(a_run: Path, b_run: Path) -> None:
    a, b = load_tensors(a_run / "model.safetensors"), load_tensors(b_run / "model.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def _curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run (``--resume auto`` on an empty folder starts it)."""
    tmp = tmp_path_factory.mktemp("elastic-ref")
    run = tmp / "run"
    log = _standalone(tiny_cache, run, tmp, "reference")
    summary = _summary(log)
    assert summary and summary["world_size"] == 2 and summary["resumed_from"] is None, log.read_text()[-2000:]
    return run


@pytest.mark.slow
def test_killed_worker_restarts_and_ends_bit_for_bit(tiny_cache, reference, tmp_path):
    run, marker, attempts = tmp_path / "run", tmp_path / "killed", tmp_path / "attempts.txt"
    t0 = time.monotonic()
    log = _standalone(tiny_cache, run, tmp_path, "restarted", ELASTIC_KILL_MARKER=str(marker),
                      ELASTIC_ATTEMPTS=str(attempts))
    wall = time.monotonic() - t0
    assert marker.read_text().strip() == f"rank 1 killed after the checkpoint of step {EVERY}"
    # torchrun restarted both workers once (TORCHELASTIC_RESTART_COUNT 0, then 1)
    assert sorted(attempts.read_text().split("\n")[:-1]) == ["0 0", "0 1", "1 0", "1 1"], attempts.read_text()
    summary = _summary(log)
    assert summary, log.read_text()[-2000:]
    assert summary["resumed_from"] == EVERY  # lost: the steps after the last checkpoint, none before it
    assert summary["world_size"] == 2 and len(set(summary["rank_checksums"])) == 1
    _assert_same_weights(reference, run)
    assert _curve(run) == _curve(reference)  # rank 0 cut the curve back to the checkpoint: each step once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000030", "step-0000040"]
    print(f"restart run: 1 restart, bit-for-bit, {wall:.0f} s")


@pytest.mark.slow
def test_two_node_rendezvous_matches_single_node(tiny_cache, reference, tmp_path):
    """Two torchrun agents (``--nnodes 2``, c10d rendezvous on 127.0.0.1) sharing one run folder."""
    run, port = tmp_path / "run", _free_port()
    procs, logs = [], []
    for node, is_host in ((0, 1), (1, 0)):  # the first agent hosts the rendezvous store
        logs.append(tmp_path / f"node{node}.log")
        args = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{port}", "--rdzv-id", f"medclf-{tmp_path.name}", "--rdzv-conf", f"is_host={is_host}",
                "--local-addr", "127.0.0.1"]
        procs.append(_start([*args, *_job(tiny_cache, run)], logs[-1], _env()))
    _finish(procs, logs, "two-node job")
    summaries = [s for s in map(_summary, logs) if s]
    assert len(summaries) == 1, "exactly one agent (rank 0's) reports the run"
    assert summaries[0]["world_size"] == 2 and len(set(summaries[0]["rank_checksums"])) == 1
    _assert_same_weights(reference, run)
    assert _curve(run) == _curve(reference)


def test_each_attempt_joins_a_fresh_store_namespace():
    """Ranks agree on a new session although the shared store still holds a killed attempt's keys."""
    from medclf.training.loop import _fresh_session

    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = lambda: torch.distributed.TCPStore("127.0.0.1", server.port, is_master=False)  # noqa: E731

    def attempt(world: int) -> list[str]:
        got: list = [None] * world

        def join(r: int) -> None:
            try:
                got[r] = _fresh_session(client(), r, world, timeout_s=30)
            except Exception as e:  # reported below, not lost in the thread
                got[r] = e

        threads = [threading.Thread(target=join, args=(r,)) for r in range(world)]
        for t in reversed(threads):  # the followers first: they must not take an old answer
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        assert all(isinstance(s, str) for s in got), got
        return got

    first = attempt(3)
    assert len(set(first)) == 1
    second = attempt(3)  # the store still holds every key of the first attempt
    assert len(set(second)) == 1 and second[0] != first[0]


def test_restart_before_the_first_checkpoint_starts_over(tiny_cache, tmp_path):
    """What a job killed before its first checkpoint leaves (config.json, part of a curve with a torn
    last line, a half-written checkpoint folder) is no reason for ``--resume auto`` to refuse the run."""
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    def cfg() -> TrainConfig:
        return TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=5, log_every=1, seed=3)

    tiny = {"arch": "dit", "model_size": "tiny", "trials": 8}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    finetune(tiny_cache, "diffusion-classifier", clean, tiny, cfg(), resume="auto", calibrate=False)

    def die(rec: dict) -> None:
        if rec["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_cache, "diffusion-classifier", killed, tiny, cfg(), resume="auto", progress=die, calibrate=False)
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the writer was killed mid-line
    (killed / "checkpoints" / ".tmp-step-0000005").mkdir(parents=True)
    s = finetune(tiny_cache, "diffusion-classifier", killed, tiny, cfg(), resume="auto", calibrate=False)
    assert s["resumed_from"] is None
    assert _curve(killed) == _curve(clean)
    _assert_same_weights(clean, killed)
