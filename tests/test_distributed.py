"""Many processes on torch.distributed (gloo on CPU): N processes train what one does, rank 0 writes, a SIGKILLed job
resumes exactly, a failing rank stops the job with its own one-line error.

Each test launches real processes (`imagen ... --nproc 2`, or torchrun itself) and bounds them with a timeout, so a
job that would hang fails instead.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_helpers import one_line_error, process_tree, run_cli

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: the two ranks may share one core.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
ENV.pop("WORLD_SIZE", None)
TIMEOUT = 300
# Dropout 0 and no augmentation: the random streams of 2 ranks differ from one process's, the gradients must not.
CLASSIFY = ["finetune", "--task", "classify", "--data", "shapes", "--n", "96", "--label", "shape", "--batch-size", "16",
            "--precision", "fp32", "--device", "cpu", "--no-progress", "--report-to", "jsonl", "--eval-every", "10",
            "--set", "model.dim=32", "--set", "model.num_layers=2", "--set", "model.num_heads=2"]
T2I = ["train-t2i", "--data", "shapes", "--sizes", "8", "--n", "48", "--batch-size", "8", "--max-steps", "20",
       "--text-encoder", "trainable", "--no-progress", "--precision", "fp32", "--device", "cpu", "--report-to", "jsonl",
       "--sample-every", "10", "--set", "base.unet.dim=16", "--set", "base.unet.num_heads=2"]


def test_ranks_share_each_global_batch_of_the_one_process_permutation():
    from imagen.train.batching import EpochBatchSampler, num_batches

    for n, batch, world in ((96, 16, 2), (101, 16, 2), (100, 12, 4), (97, 16, 2)):
        one = list(EpochBatchSampler(n, batch, shuffle=True, seed=3, epoch=1))
        ranks = [list(EpochBatchSampler(n, batch, shuffle=True, seed=3, epoch=1, rank=r, world_size=world))
                 for r in range(world)]
        assert all(len(r) == num_batches(n, batch, world) for r in ranks)
        for i, shares in enumerate(zip(*ranks)):
            assert [j for share in shares for j in share] == one[i]  # rank order rebuilds the batch
            assert max(map(len, shares)) - min(map(len, shares)) <= 1 and min(map(len, shares)) >= 1
        # A last batch too small to give every rank a sample is dropped (97 = 6 x 16 + 1 with 2 ranks).
        assert num_batches(n, batch, world) == len(one) - (0 < n % batch < world)


def test_a_text_to_image_sample_is_noised_the_same_in_any_batch():
    import torch

    from imagen.tasks.text_to_image import T2ISplit

    split = T2ISplit(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), [f"caption {i}" for i in range(6)], seed=5)
    whole = split.__getitems__([0, 1, 2, 3, 4, 5])["sample_seeds"]
    halves = torch.cat([split.__getitems__([0, 1, 2])["sample_seeds"], split.__getitems__([3, 4, 5])["sample_seeds"]])
    assert torch.equal(whole, halves) and len(set(whole.tolist())) == 6
    split.set_epoch(1)
    assert not set(split.__getitems__([0, 1, 2, 3, 4, 5])["sample_seeds"].tolist()) & set(whole.tolist())


def imagen(*args, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", "imagen", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


def max_difference(a_path, b_path) -> float:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def classify_runs(tmp_path_factory):
    """The same 20-step classify run with one process and with two (global batch 16 either way)."""
    root = tmp_path_factory.mktemp("dist")
    one = imagen(*CLASSIFY, "--max-steps", "20", "--out", root / "one")
    assert one.returncode == 0, one.stderr
    two = imagen(*CLASSIFY, "--max-steps", "20", "--out", root / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    return root, one, two


def test_two_processes_train_the_classifier_one_process_trains(classify_runs):
    root, one, two = classify_runs
    assert max_difference(root / "one" / "model.safetensors", root / "two" / "model.safetensors") <= 1e-5
    # Rank 0 alone reports and writes: one result line, one log with the same records.
    assert two.stdout.count("completed at step 20") == 1, two.stdout
    one_log = (root / "one" / "metrics.jsonl").read_text().splitlines()
    two_log = (root / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(one_log) == len(two_log)
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted(p.name for p in (root / "one").iterdir())


def test_two_processes_train_a_text_to_image_stage_as_one_does(tmp_path):
    one = imagen(*T2I, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = imagen(*T2I, "--out", tmp_path / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    # Equal up to float32 summation order (two half-batch gradients averaged vs one batch): 1.06e-5 after 20 AdamW
    # steps on an AVX2-only CPU, under 1e-5 elsewhere; ranks stepping on unsynchronised gradients drift by the order
    # of AdamW's steps (the learning rate, 1e-3).
    assert max_difference(tmp_path / "one" / "base" / "model.safetensors",
                          tmp_path / "two" / "base" / "model.safetensors") <= 5e-5
    # Rank 0 alone writes the sample grids.
    assert sorted(p.name for p in (tmp_path / "two" / "base" / "samples").iterdir()) == ["step-000010.png", "step-000020.png"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_two_process_job_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    args = [*CLASSIFY, "--max-steps", "40", "--checkpoint-every", "10", "--nproc", "2"]
    alone = imagen(*args, "--out", tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "imagen", *map(str, args), "--out", str(out)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(out / "checkpoints" / "step-00000010" / "trainer_state.json", proc)
    finally:
        for pid in process_tree(proc.pid):  # the launcher and both ranks, at once
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "step-00000010" / "rng-rank-1.pt").is_file()  # every rank's random streams

    # Another number of processes cannot continue it exactly: one clear line, the run untouched.
    refused = imagen(*args[:-2], "--out", out, "--resume")
    line = one_line_error(refused.returncode, refused.stderr, ignore_logs=True)
    assert "2 process(es)" in line and "has 1" in line, line

    resumed = imagen(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert max_difference(tmp_path / "alone" / "model.safetensors", out / "model.safetensors") == 0.0


FAILING_RANK = """
import sys
from imagen.cli import main
from imagen.errors import TrainingError
from imagen.tasks.classify import ClassifyTask
import torch.distributed as dist

original, calls = ClassifyTask.training_step, []


def training_step(self, model, batch):
    calls.append(1)
    if dist.get_rank() == 1 and len(calls) == 3:
        raise TrainingError("rank one broke on purpose")
    return original(self, model, batch)


ClassifyTask.training_step = training_step
sys.exit(main())
"""


def test_a_rank_that_raises_stops_the_job_with_its_one_line_error(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), *[("--num-samples" if a == "--n" else a) for a in CLASSIFY], "--max-steps", "20",
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=ENV, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("imagen finetune: error:")]
    assert "imagen finetune: error: rank 1: rank one broke on purpose" in errors, done.stderr
    assert not any("Traceback" in line for line in done.stderr.splitlines()[:5] if line.startswith("imagen")), done.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_global_batch_that_does_not_split_is_one_line_before_anything_starts(capsys, tmp_path):
    code, _, err = run_cli(capsys, *CLASSIFY, "--max-steps", "2", "--batch-size", "15", "--nproc", "2",
                           "--out", tmp_path / "run")
    line = one_line_error(code, err)
    assert "--batch-size 15" in line and "--nproc 2" in line, line
    assert not (tmp_path / "run").exists()
