"""Data-parallel training on CPU: 2 gloo processes started by torchrun."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastgan.train import TrainConfig
from fastgan.train.cli import main
from fastgan.train.report import read_metrics

REPO = Path(__file__).resolve().parents[1]

# float64 and dcgan (no batch-dependent layer), so 2 x 4 samples == 1 x 8 samples.
FLAGS = ["--res", "8", "--backend", "torch", "--channel-base", "16", "--channel-max", "4",
         "--z-dim", "4", "--batch", "8", "--steps", "4", "--r1-interval", "2", "--r1-gamma",
         "1", "--dtype", "float64", "--device", "cpu", "--metrics-every", "0",
         "--ckpt-every", "2", "--sample-every", "100"]
# r3gan (no batch-dependent layer either) with its recipe: rpgan, R1 and R2 at every step.
R3GAN_FLAGS = ["--arch", "r3gan", "--res", "8", "--backend", "torch", "--channel-base", "64",
               "--channel-max", "16", "--z-dim", "4", "--batch", "8", "--steps", "4",
               "--r1-gamma", "1", "--dtype", "float64", "--device", "cpu", "--metrics-every",
               "0", "--ckpt-every", "2", "--sample-every", "100"]


def _torchrun(args, cwd, timeout=240):
    """Run torchrun with 2 processes; on timeout kill its whole process group (the ranks
    too) and fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank hung)")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _checkpoint(out, step):
    return torch.load(out / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=True)


@pytest.mark.parametrize("flags, r1_steps", [(FLAGS, [0, 2]), (R3GAN_FLAGS, [0, 1, 2, 3])],
                         ids=["dcgan", "r3gan"])
def test_torchrun_matches_a_single_process_with_the_same_global_batch(tmp_path, flags,
                                                                      r1_steps):
    """Ranks stay bitwise identical (the trainer checks it collectively at every checkpoint,
    and fails otherwise) and equal a 1-process run, R1 (and r3gan's R2) steps included."""
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    result = _torchrun(["-m", "fastgan", "train", *flags, "--out", str(dist_out)], REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", *flags, "--out", str(single_out), "--no-progress"]) == 0

    assert "2 process(es)" in (dist_out / "log.txt").read_text()
    assert [r["step"] for r in read_metrics(dist_out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert [r["step"] for r in read_metrics(dist_out / "metrics.jsonl") if "r1" in r] == r1_steps
    dist_state, single_state = _checkpoint(dist_out, 4), _checkpoint(single_out, 4)
    initial = _checkpoint(single_out, 2)
    for key in ("G", "D", "G_ema"):
        for name, value in single_state[key].items():
            torch.testing.assert_close(dist_state[key][name], value, rtol=1e-10, atol=1e-13,
                                       msg=f"{key}.{name}: 2 processes != 1 process")
    assert not torch.equal(single_state["D"]["out.weight"], initial["D"]["out.weight"])


# One rank of a run whose config differs per rank; argv: config JSON, JSON {rank: overrides}.
DRIVER = textwrap.dedent("""
    import json, sys
    from fastgan.train.config import TrainConfig
    from fastgan.train.distributed import init_from_env, shutdown
    from fastgan.train.trainer import Trainer

    ctx = init_from_env("cpu")
    cfg = {**json.loads(sys.argv[1]), **json.loads(sys.argv[2]).get(str(ctx.rank), {})}
    try:
        Trainer(TrainConfig.from_dict(cfg), ctx, resume=False).run()
    finally:
        shutdown()
""")


def test_a_rank_failing_at_setup_stops_every_rank_with_a_clear_message(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cfg = TrainConfig(out=str(tmp_path / "run"), res=8, backend="torch", channel_base=16,
                      channel_max=4, batch=4, steps=2, metrics_every=0, progress=False)
    bad = {"1": {"data": str(tmp_path / "missing-on-rank-1")}}
    result = _torchrun([str(driver), json.dumps(cfg.to_dict()), json.dumps(bad)], tmp_path)
    assert result.returncode != 0
    assert "RuntimeError: stopping because rank 1 failed during setup: FileNotFoundError" \
        in result.stderr  # rank 0's error names rank 1 and its reason
    assert "missing-on-rank-1" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_must_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="--batch .*divisible by the number of processes"):
        TrainConfig(out=str(tmp_path), batch=5).check(world_size=2)
