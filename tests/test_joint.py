"""Joint training (`train --train-retriever`): adapter and retriever in one run, checkpointed, resumable, the index
re-embedded with the trained encoder at the end."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers_adapters import QA, Crash, crash_at, single_thread, tiny_index, write_jsonl
from safetensors.torch import load_file

from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
from retro_peft.adapters.model import RETRIEVER_FOLDER, check_index, read_retro_config
from retro_peft.cli import main
from retro_peft.errors import InputError
from retro_peft.index import Encoder, open_index
from retro_peft.qa import load_qa
from retro_peft.training import TrainConfig, build_examples, latest_checkpoint, train
from retro_peft.training.joint import JointRetrieverConfig, RetrieverObjective

single_thread()
RETRIEVAL = RetrievalConfig(k=2, distractors=1, oracle_fraction=0.5, context_tokens=220)


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, small_encoder_dir):
    return tiny_index(tmp_path_factory.mktemp("index") / "idx", encoder=str(small_encoder_dir))


@pytest.fixture
def index(built_index, tmp_path):
    """A copy per test: joint training re-embeds it."""
    shutil.copytree(built_index.path, tmp_path / "idx")
    return open_index(tmp_path / "idx")


def _model(tiny):
    return RetroPeftModel.create(str(tiny), config_for_method("lora", retrieval=RETRIEVAL), seed=0)


def test_joint_contrastive_resumes_to_the_same_adapter_and_encoder_and_reembeds_the_index(tiny, index, qa_file,
                                                                                          tokenizer, tmp_path):
    items = load_qa(qa_file, require_answers=True)
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    config = TrainConfig(steps=5, batch_size=3, lr=1e-2, checkpoint_every=2, log_every=1)
    joint = JointRetrieverConfig(lr=1e-3)
    start_vectors = index.search("Normandy", k=1, mode="dense")[0].score

    straight_index = open_index(shutil.copytree(index.path, tmp_path / "straight-idx"))
    straight = train(_model(tiny), examples, config, out_dir=tmp_path / "straight", index=straight_index,
                     progress=False, retriever=RetrieverObjective(straight_index, items, joint))
    assert [s for s, _ in straight.retriever_losses] == [1, 2, 3, 4, 5]
    assert straight.reembedded["changed"] and straight.reembedded["chunks"] == len(index)

    with pytest.raises(Crash):
        train(_model(tiny), examples, config, out_dir=tmp_path / "crashed", index=index, on_step=crash_at(3),
              progress=False, retriever=RetrieverObjective(index, items, joint))
    assert (latest_checkpoint(tmp_path / "crashed") / "retriever.safetensors").is_file()
    assert open_index(index.path).search("Normandy", k=1, mode="dense")[0].score == start_vectors  # not re-embedded yet
    resumed = train(_model(tiny), examples, config, out_dir=tmp_path / "crashed", index=index, resume=True,
                    progress=False, retriever=RetrieverObjective(index, items, joint))
    assert resumed.resumed_from == 2
    for name in ("adapter_model.safetensors", f"{RETRIEVER_FOLDER}/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "crashed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # The adapter records the re-embedded index; the index now uses the trained encoder, which plain
    # sentence-transformers loads to the same vectors.
    from sentence_transformers import SentenceTransformer

    encoder_dir = tmp_path / "crashed" / RETRIEVER_FOLDER
    info = read_retro_config(tmp_path / "crashed")
    reopened = open_index(index.path)
    assert reopened.manifest["encoder"]["fingerprint"] == info["index"]["encoder_fingerprint"] \
        == info["retriever"]["fingerprint"] != info["retriever"]["start_encoder"]
    check_index(info, reopened)  # no EncoderMismatchError
    texts = ["Normandy", "the North Sea"]
    assert np.allclose(SentenceTransformer(str(encoder_dir), device="cpu").encode(texts, normalize_embeddings=True),
                       Encoder(str(encoder_dir)).encode(texts), atol=1e-5)
    assert np.allclose(reopened.encoder.encode(texts), Encoder(str(encoder_dir)).encode(texts), atol=1e-6)


def test_joint_resume_refuses_another_retriever_setting(tiny, index, qa_file, tokenizer, tmp_path):
    items = load_qa(qa_file, require_answers=True)
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    config = TrainConfig(steps=3, batch_size=4, checkpoint_every=1)

    def stop(step, _loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_model(tiny), examples, config, out_dir=tmp_path / "run", index=index, on_step=stop, progress=False,
              retriever=RetrieverObjective(index, items, JointRetrieverConfig(weight=1.0)))
    with pytest.raises(InputError, match="cannot resume"):
        train(_model(tiny), examples, config, out_dir=tmp_path / "run", index=index, resume=True, progress=False,
              retriever=RetrieverObjective(index, items, JointRetrieverConfig(weight=0.5)))
    with pytest.raises(InputError, match="cannot resume"):  # nor a run without the retriever
        train(_model(tiny), examples, config, out_dir=tmp_path / "run", index=index, resume=True, progress=False)


def test_joint_lsr_teaches_the_encoder_the_adapters_preference(tiny, index, qa_file, tokenizer, tmp_path):
    items = load_qa(qa_file, require_answers=True)
    examples = build_examples(items, index, tokenizer, RETRIEVAL)
    model = _model(tiny)
    objective = RetrieverObjective(index, items, JointRetrieverConfig(supervision="lsr", k=3, lr=1e-3),
                                   tokenizer=tokenizer, retrieval=RETRIEVAL)
    assert set(objective.by_item) == {it.id for it in items if it.answerable}
    before = {n: t.clone() for n, t in objective.state_dict().items()}
    result = train(model, examples, TrainConfig(steps=6, batch_size=6, lr=1e-2, log_every=1), out_dir=tmp_path / "a",
                   index=index, progress=False, retriever=objective)
    losses = [v for _, v in result.retriever_losses]
    assert len(losses) == 6 and all(v >= 0 for v in losses)  # a KL divergence
    after = objective.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # The generator's preference moves as the adapter trains, so the per-step losses need not fall; against the
    # final adapter's preference, the trained encoder is closer than the one it started from.
    ids = list(objective.by_item)
    with torch.no_grad():
        trained = float(objective.loss(ids, model.model, tokenizer.pad_token_id))
        objective.load_state_dict(before)
        started = float(objective.loss(ids, model.model, tokenizer.pad_token_id))
    assert trained < started, (trained, started)
    assert model.model.training is True  # scoring switched the generator to eval and back


def test_cli_joint_training_and_its_refusals(tiny, index, qa_file, tmp_path, capsys):
    common = ["train", "--model", str(tiny), "--index", str(index.path), "--qa", str(qa_file), "--k", "2",
              "--context-tokens", "220", "--steps", "2", "--batch-size", "2", "--no-progress"]
    out = tmp_path / "joint"
    assert main([*common, "--out", str(out), "--train-retriever", "contrastive", "--retriever-weight", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["retriever"]["supervision"] == "contrastive" and summary["retriever"]["reembedded"]["changed"]
    assert (out / RETRIEVER_FOLDER / "modules.json").is_file()
    # the adapter and its re-embedded index load together
    assert main(["ask", "--model", str(tiny), "--adapter", str(out), "--index", str(index.path),
                 "--max-tokens", "2", "Where is Normandy?"]) == 0
    capsys.readouterr()

    with pytest.raises(SystemExit) as e:  # argparse: an unknown value, before any work
        main([*common, "--out", str(tmp_path / "x"), "--train-retriever", "bm25"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "y"), "--retriever-weight", "2"]) == 2
    assert "belong to --train-retriever" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "z"), "--train-retriever", "lsr", "--retriever-lr", "0"]) == 2
    assert "positive number" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**QA[0], "gold_doc_ids": ["no-such-doc"]}])
    assert main([*common[:6], str(bad), *common[7:], "--out", str(tmp_path / "w"),
                 "--train-retriever", "contrastive"]) == 2
    assert "'no-such-doc'" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "xyzw")
