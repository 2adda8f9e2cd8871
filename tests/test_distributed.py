"""Data-parallel `retro-peft train` under torchrun: two gloo processes on 127.0.0.1 against one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_adapters import QA, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder, write_jsonl
from safetensors.torch import load_file

from retro_peft.cli import main
from retro_peft.training import latest_checkpoint

single_thread()
# 9 questions: with a global batch of 4 each epoch ends on a batch of 1, so rank 1's share of it is empty
ITEMS = QA + [{**QA[0], "id": "q1-again"}]
STEPS = 30
LAUNCH_TIMEOUT = 120  # s: a run that hangs fails the test instead of CI


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    tiny = tiny_llama_folder(folder / "llama", smollm2_tokenizer(), initializer_range=0.2)
    index = tiny_index(folder / "idx")
    # ia3 has no dropout: ranks draw other random numbers than one process would, so LoRA's dropout masks differ
    return ["--model", str(tiny), "--index", str(index.path), "--qa", str(write_jsonl(folder / "qa.jsonl", ITEMS)),
            "--method", "ia3", "--k", "2", "--context-tokens", "220", "--steps", str(STEPS), "--lr", "1e-2",
            "--log-every", "1", "--checkpoint-every", "3", "--no-progress"]


def torchrun(*args) -> subprocess.Popen:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(port),
                             "-m", "retro_peft.cli", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "OMP_NUM_THREADS": "1"})


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's worker process of `rank` (read from /proc: its children and their RANK)."""
    for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {LAUNCH_TIMEOUT} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def training_result(out) -> dict:
    return json.loads((out / "retro_config.json").read_text())["training"]["result"]


def test_two_ranks_killed_and_resumed_train_like_one_process_on_the_same_global_batch(common, tmp_path, capsys):
    # 2 ranks x 2 examples per batch, one rank SIGKILLed after the first checkpoint, resumed on 2 ranks
    out = tmp_path / "two"
    proc = torchrun(*common, "--batch-size", "2", "--out", out)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    worker = worker_pid(proc.pid, rank=1)
    assert worker is not None and proc.poll() is None, "the run finished before a rank could be killed"
    os.kill(worker, signal.SIGKILL)  # no cleanup code runs in it
    code, _, stderr = finish(proc)  # the launcher notices, stops rank 0 and fails: no hang
    assert code != 0 and "FAILED" in stderr and "Signal 9" in stderr, stderr[-3000:]
    assert latest_checkpoint(out) is not None and not (out / "retro_config.json").exists()
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["identity"]["world_size"] == 2 and state["identity"]["batch_size"] == 2

    # another number of processes is refused before a step; on two the run continues
    assert main(["train", *common, "--batch-size", "2", "--out", str(out), "--resume"]) == 2
    assert "number of training processes" in capsys.readouterr().err
    code, stdout, stderr = finish(torchrun(*common, "--batch-size", "2", "--out", out, "--resume"))
    assert code == 0, stderr[-3000:]
    summary = json.loads(stdout)  # one summary (rank 0's), not one per rank
    assert summary["steps"] == STEPS and summary["resumed_from"] >= 3

    # every step's loss, and the adapter, as one process's with 4 examples per batch
    one = tmp_path / "one"
    assert main(["train", *common, "--batch-size", "4", "--out", str(one)]) == 0
    capsys.readouterr()
    a, b = training_result(out)["losses"], training_result(one)["losses"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)
    assert b[-1][1] < b[0][1] - 0.5  # it trained: the comparison is not between two untouched adapters
    wa, wb = load_file(out / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)


@pytest.mark.parametrize("extra, message", [(["--method", "adalora"], "AdaLoRA cannot train data-parallel"),
                                            (["--method", "lora", "--block-attention"], "block-attention training")])
def test_what_cannot_train_data_parallel_is_refused_before_a_step(common, tmp_path, capsys, monkeypatch, extra,
                                                                  message):
    # rank 0 of 2 as a launcher describes it; the refusal comes before the process group is joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", *common, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "one process" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
