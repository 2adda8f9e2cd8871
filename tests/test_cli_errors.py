"""Errors a person meets on the command line are one line that says what to do: a missing optional package
gives the pip command, an unknown domain points at `retro-peft domain list`, a GPU asked for on a machine
without one names the flag to drop. Each through the real CLI (`main`)."""

import sys

import torch

from retro_peft.cli import main
from retro_peft.domains import add_domain
from retro_peft.errors import MissingPackageError

from helpers_adapters import QA, tiny_index, write_jsonl


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_a_missing_optional_package_gives_the_pip_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what `import uvicorn` meets where it is not installed
    err = one_line_error(capsys, ["serve"])
    assert "retro-peft serve needs the optional package 'uvicorn'" in err
    assert err.endswith("pip install 'retro-peft[serve]'"), err

    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "Glaciers are slow rivers of ice."}])
    err = one_line_error(capsys, ["index", "build", str(tmp_path / "idx"), str(docs), "--backend", "qdrant"])
    assert "needs qdrant-client" in err and err.endswith("pip install 'retro-peft[qdrant]'"), err

    # Any other missing module is a broken install or a bug: the CLI lets its traceback through.
    assert MissingPackageError.of(ModuleNotFoundError("no", name="safetensors")) is None
    assert "retro-peft[serve]" in str(MissingPackageError.of(ModuleNotFoundError("no", name="redis.asyncio")))


def test_an_unknown_domain_points_at_domain_list_or_domain_add(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RETRO_PEFT_HOME", str(tmp_path / "home"))
    for argv in (["ask", "What is tea?", "--domain", "law"], ["domain", "show", "law"], ["domain", "remove", "law"]):
        err = one_line_error(capsys, argv)
        assert "unknown domain 'law'" in err and "`retro-peft domain add`" in err, err
    add_domain("math", tiny_index(tmp_path / "idx").path)
    err = one_line_error(capsys, ["ask", "What is tea?", "--domain", "law"])
    assert err == "error: unknown domain 'law'; known domains: math (see `retro-peft domain list`)", err


def test_a_gpu_asked_for_on_a_machine_without_one_names_the_flag_to_drop(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, wherever the test runs
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    for argv in (["eval", "--qa", str(qa), "--no-retrieval", "--device", "cuda"],
                 ["eval", "--qa", str(qa), "--no-retrieval", "--device", "cuda:1"]):
        err = one_line_error(capsys, argv)
        device = argv[-1]
        assert "CUDA is not available" in err and f"drop --device {device}" in err and "run on the CPU" in err, err
