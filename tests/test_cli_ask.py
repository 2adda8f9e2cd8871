"""`retro-peft ask` with answer choices and an adapter's answerability head (tiny random Llama, real index)."""

import json

import pytest

from retro_peft.adapters import RetroLoraConfig, RetroPeftModel
from retro_peft.cli import main

from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, tiny_llama_folder
from test_bank import adapter_with_head

QUESTION = "Who invented the piano?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    single_thread()
    root = tmp_path_factory.mktemp("ask")
    base = tiny_llama_folder(root / "base", smollm2_tokenizer(), initializer_range=0.2)
    index = tiny_index(root / "idx", DOCS)
    plain = RetroPeftModel.create(str(base), RetroLoraConfig(), seed=0).save(root / "adapter", index=index)
    return index.path, plain, adapter_with_head(plain, root / "with-head", index, threshold=1e9)


def ask(capsys, *argv) -> tuple[int, str, str]:
    code = main(["ask", QUESTION, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_ask_with_choices_and_the_answerability_head(folders, capsys):
    index, plain, head = folders
    code, out, _ = ask(capsys, "--index", index, "--adapter", head, "--json")
    strict = json.loads(out)
    assert code == 0 and strict["abstained"] is True and isinstance(strict["answerability"], float)

    code, out, _ = ask(capsys, "--index", index, "--adapter", head, "--abstain-at", "off", "--choices",
                       "Cristofori, Scheele", "--json")
    answered = json.loads(out)
    assert answered["abstained"] is False and answered["answer"] in ("Cristofori", "Scheele")
    assert isinstance(answered["answerability"], float)  # (another score: the prompt lists the choices)

    code, out, _ = ask(capsys, "--index", index, "--adapter", head)  # the text output shows the score too
    assert code == 0 and ", abstained, answerability " in out and "(threshold 1000000000.000)" in out

    code, out, err = ask(capsys, "--index", index, "--adapter", plain, "--abstain-at", "answer_rate=0.5",
                         "--choices", "yes,no", "--json")
    assert json.loads(out)["answerability"] is None and json.loads(out)["answer"] in ("yes", "no")
    assert "--abstain-at is ignored" in err and "no adapter answerability head" in err

    assert ask(capsys, "--index", index, "--adapter", head, "--abstain-at", "answer_rate=2")[0] == 2
    with pytest.raises(SystemExit):
        ask(capsys, "--index", index, "--choices", "yes,,no")
    assert "--choices must be a list of at least two different non-empty strings" in capsys.readouterr().err


def test_ask_chat_answers_each_line_with_the_conversation_so_far_and_ends_at_eof(folders, capsys, monkeypatch):
    import io

    index, plain, _ = folders
    follow_up = "When was that?"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n\n{follow_up}\n"))  # a blank line is skipped
    code = main(["ask", "--chat", "--index", str(index), "--adapter", str(plain), "--json", "--history", "concat"])
    out, _ = capsys.readouterr()
    first, second = (json.loads(line) for line in out.splitlines())
    assert code == 0 and first["domain"] == second["domain"] == "ad-hoc"

    # each turn as the bank answers it after the turns before it (the same prompt, so the same answer)
    from retro_peft.adapters.model import read_retro_config
    from retro_peft.domains.bank import AdapterBank
    from retro_peft.generation import SamplingConfig

    bank = AdapterBank(read_retro_config(plain)["base_model"]["name"])
    bank.load("ad-hoc", index, plain, history="concat")
    sampling = SamplingConfig()
    want = bank.answer(QUESTION, "ad-hoc", sampling=sampling)
    turns = [{"role": "user", "content": QUESTION}] + ([{"role": "assistant", "content": want.text}] if want.text else [])
    then = bank.answer(follow_up, "ad-hoc", sampling=sampling, history=turns)
    alone = bank.answer(follow_up, "ad-hoc", sampling=sampling)
    assert (first["answer"], first["prompt_tokens"]) == (want.text, want.prompt_tokens)
    assert (second["answer"], second["prompt_tokens"]) == (then.text, then.prompt_tokens)
    assert second["prompt_tokens"] > alone.prompt_tokens and second["dropped_turns"] == 0

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n"))  # the text output, then EOF
    assert main(["ask", "--chat", "--index", str(index), "--adapter", str(plain)]) == 0
    assert "[domain ad-hoc" in capsys.readouterr().out
    assert main(["ask", QUESTION, "--chat", "--index", str(index)]) == 2
    assert "--chat reads the questions from stdin" in capsys.readouterr().err
    assert main(["ask", QUESTION, "--history", "concat", "--index", str(index)]) == 2
    assert "--history needs --chat" in capsys.readouterr().err


def test_json_output_is_clean_to_pipe_and_other_libraries_stay_quiet(folders, tmp_path):
    """`ask`, `eval` and `index query` with --json print one JSON document on stdout and nothing else, in a real
    process; other libraries' bars and warnings ("Loading weights", FutureWarning) appear only with -v."""
    from conftest import run_cli

    index, adapter, _ = folders
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q", "question": QUESTION, "answers": ["Normandy"]}) + "\n")
    commands = [["ask", QUESTION, "--index", index, "--adapter", adapter, "--max-tokens", "3", "--json"],
                ["eval", "--model", adapter.parent / "base", "--index", index, "--adapter", adapter, "--qa", qa,
                 "--json"],
                ["index", "query", index, "Normandy", "--json"]]
    env = {"OMP_NUM_THREADS": "1"}
    for command in commands:
        proc = run_cli(*command, env=env, check=True)
        json.loads(proc.stdout)  # the whole of stdout is the JSON
        assert "Loading weights" not in proc.stderr and "Warning" not in proc.stderr, (command, proc.stderr)
    loud = run_cli(*commands[0], "-v", env=env, check=True)
    json.loads(loud.stdout)
    assert "Loading weights" in loud.stderr  # -v lets transformers' bars through (on stderr, never stdout)
