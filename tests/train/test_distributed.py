"""Multi-process training through ``accelerate launch``: 2 processes equal 1 with the same global batch.

On this machine (no CUDA) the DDP launch forms a gloo CPU group. FSDP2 needs accelerators (accelerate
enables FSDP only on them): its config is checked here and its run is a GPU test. ZeRO-3 runs on 2 CPU
processes in test_zero3.py (zero3_cpu.yaml); zero3.yaml's bf16 run is a GPU test.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
DIST_RUN = str(Path(__file__).with_name("dist_run.py"))
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CONFIGS = ROOT / "pointvl" / "configs" / "train"
SFT = ["sft.batch_size=4", "sft.per_device_batch_size=2", "sft.max_steps=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(out.read_text()), "weights": load_file(f"{out}.safetensors")}


def _launch(config: str, processes: int, shards: str, out: Path, stage: str, pairs: list[str]) -> dict:
    return _run([ACCELERATE, "launch", "--config_file", str(CONFIGS / config), "--num_processes", str(processes),
                 "--main_process_port", str(_free_port()), DIST_RUN, shards, "", str(out), stage, *pairs], out)


def test_ddp_two_processes_equal_one_process(shards_dir, tmp_path):
    one = _run([sys.executable, DIST_RUN, shards_dir, "", str(tmp_path / "one.json"), "sft", *SFT],
               tmp_path / "one.json")
    two = _launch("ddp.yaml", 2, shards_dir, tmp_path / "two.json", "sft", SFT)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert [r["step"] for r in two["history"]] == [1, 2, 3]
    assert [r["loss"] for r in two["history"]] == pytest.approx([r["loss"] for r in one["history"]], abs=1e-3)
    assert [r["tokens"] for r in two["history"]] == [r["tokens"] for r in one["history"]]  # the same samples
    diff = max((one["weights"][k] - v).abs().max().item() for k, v in two["weights"].items())
    assert diff < 1e-5, diff


def test_sharded_configs_are_valid():
    from accelerate.utils import DeepSpeedPlugin

    zero3 = yaml.safe_load((CONFIGS / "zero3.yaml").read_text())
    ds_json = ROOT / zero3["deepspeed_config"]["deepspeed_config_file"]
    plugin = DeepSpeedPlugin(hf_ds_config=str(ds_json))
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == 3 and ds["bf16"]["enabled"] is True
    # the sizes are numbers; what stays "auto" the training loop fills (no DataLoader for accelerate to read)
    autos = {k for k, v in ds.items() if v == "auto"} | {k for k, v in ds["zero_optimization"].items() if v == "auto"}
    assert autos == {"gradient_accumulation_steps", "train_batch_size", "train_micro_batch_size_per_gpu",
                     "gradient_clipping"}  # the stage's max_grad_norm (one source of truth)
    cpu = yaml.safe_load((CONFIGS / "zero3_cpu.yaml").read_text())
    assert cpu["use_cpu"] is False  # accelerate turns DeepSpeed off when told cpu
    cpu_ds = json.loads((ROOT / cpu["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert cpu_ds["bf16"]["enabled"] is False and cpu_ds["gradient_clipping"] == "auto"
    fsdp = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or importlib.util.find_spec("deepspeed") is None,
                    reason="needs 2 GPUs and `pip install pointvl[deepspeed]`")
@pytest.mark.parametrize("config", ["zero3.yaml", "fsdp2.yaml"])
def test_sharded_two_processes_equal_one_process(shards_dir, tmp_path, config):
    one = _run([sys.executable, DIST_RUN, shards_dir, "", str(tmp_path / "one.json"), "sft", *SFT],
               tmp_path / "one.json")
    two = _launch(config, 2, shards_dir, tmp_path / "two.json", "sft", SFT)
    # ZeRO-3 runs the engine's bf16 (zero3.json), the 1-process run float32: bf16 rounding, not 1e-3
    tolerance = 2e-2 if config == "zero3.yaml" else 1e-3
    assert [r["loss"] for r in two["history"]] == pytest.approx([r["loss"] for r in one["history"]], rel=tolerance)


def test_a_bad_batch_size_under_a_two_process_launch_fails_before_sft_in_one_line(shards_dir, tmp_path):
    """The preflight sees the launch's process count before any stage: rank 0 prints one line, every rank
    exits 2. (accelerate launch itself then reports the failed ranks with their exit codes, a traceback of
    its own, and exits 1: accelerate/commands/launch.py re-raises torch's ChildFailedError.)"""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [ACCELERATE, "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
         "--main_process_port", str(_free_port()), "-m", "pointvl.cli", "train", "--shards", shards_dir, "--run",
         str(run), "--preset", "tiny", "--set", "sft.batch_size=6", "--set", "sft.per_device_batch_size=2"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "pointvl" in line and "error" in line]
    assert ours == ["pointvl train: error: sft.batch_size (6) must be a multiple of sft.per_device_batch_size x "
                    "processes (2 x 2 = 4): set sft.batch_size=8, change sft.per_device_batch_size, or launch another "
                    "number of processes"], result.stderr[-3000:]
    # the launcher's report: the first rank to end exited 2 (it stops the other when that is slower)
    assert "exitcode  : 2" in result.stderr.split("Root Cause")[-1]
    assert f'File "{ROOT / "pointvl"}' not in result.stderr  # no traceback from pointvl
    assert not run.exists()  # before SFT (and before the run folder)


@pytest.mark.slow
def test_pointvl_train_under_a_two_process_launch(shards_dir, tmp_path):
    """The whole pipeline on 2 ranks: per-rank RNG files, rank 0's shared files, predictions merged."""
    run = tmp_path / "run"
    sets = ["sft.batch_size=2", "sft.per_device_batch_size=1", "sft.max_steps=2", "grpo.prompts_per_step=2",
            "grpo.num_generations=2", "grpo.max_new_tokens=8", "grpo.max_steps=1", "eval_max_new_tokens=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [ACCELERATE, "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
         "--main_process_port", str(_free_port()), "-m", "pointvl.cli", "train", "--shards", shards_dir, "--run",
         str(run), "--preset", "tiny", *[x for s in sets for x in ("--set", s)]],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, step in (("sft", 2), ("grpo_grca_rpc", 1)):
        folder = run / stage / f"checkpoint-{step}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in folder.iterdir()}
    lines = (run / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and not list((run / "eval").glob("*.part-*"))  # the test split, merged
    assert {r["stage"]: r["processes"] for r in json.loads((run / "compute.json").read_text())} == {
        "sft": 2, "grpo_grca_rpc": 2}
