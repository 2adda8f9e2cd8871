"""End to end with the real packaged models: SmolLM2-135M + a MiniLM index over a few SQuAD paragraphs.

Trains RetroLoRA for 3 steps, saves, reloads in a NEW process through retro-peft
and through plain `peft.PeftModel.from_pretrained` (logits must be bit-identical),
and evaluates a handful of questions.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SQUAD
from helpers_adapters import single_thread
from safetensors.torch import save_file

from retro_peft.adapters import RetrievalConfig, RetroPeftModel, config_for_method
from retro_peft.index import IndexConfig, build_index
from retro_peft.qa import load_qa
from retro_peft.training import TrainConfig, build_examples, evaluate, train

single_thread()
pytestmark = pytest.mark.slow

RELOAD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from retro_peft.adapters import RetroPeftModel
    from retro_peft.models import resolve_generator

    adapter, probe = sys.argv[1], load_file(sys.argv[2])
    ours = RetroPeftModel.load(adapter).model.eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_generator("smollm2-135m")),
                                      adapter).eval()
    with torch.inference_mode():
        a = ours(input_ids=probe["input_ids"]).logits
        b = plain(input_ids=probe["input_ids"]).logits
    print("retro-peft", torch.equal(a, probe["logits"]), "plain-peft", torch.equal(b, probe["logits"]))
""")


@pytest.fixture(scope="module")
def squad_slice(tmp_path_factory):
    """The first 3 paragraphs of the first SQuAD 2.0 article, as a SQuAD file."""
    data = json.loads(SQUAD.read_text())
    article = dict(data["data"][0], paragraphs=data["data"][0]["paragraphs"][:3])
    path = tmp_path_factory.mktemp("squad") / "squad-3.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [article]}))
    return path


def test_train_reload_in_new_process_and_evaluate_smollm2(squad_slice, tmp_path):
    index = build_index(tmp_path / "idx", [squad_slice], IndexConfig(encoder="minilm"))
    items = load_qa(squad_slice)
    retrieval = RetrievalConfig(k=2, distractors=0, oracle_fraction=0.8, context_tokens=360)
    model = RetroPeftModel.create("smollm2-135m", config_for_method("lora", retrieval=retrieval))
    examples = build_examples(items, index, model.tokenizer, retrieval, seed=0)
    assert max(len(ex) for ex in examples) <= 360 + 24
    out = tmp_path / "adapter"
    result = train(model, examples, TrainConfig(steps=3, batch_size=1, lr=1e-3, log_every=1), out_dir=out,
                   index=index, progress=False)
    assert result.steps == 3 and all(math.isfinite(loss) for _, loss in result.losses)  # logged every step

    probe_ids = torch.tensor([examples[0].input_ids[-40:]])
    model.model.eval()
    with torch.inference_mode():
        logits = model.model(input_ids=probe_ids).logits
        with model.model.disable_adapter():
            assert not torch.equal(model.model(input_ids=probe_ids).logits, logits)  # training changed it
    save_file({"input_ids": probe_ids, "logits": logits.contiguous()}, tmp_path / "probe.safetensors")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "probe.safetensors")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["retro-peft", "True", "plain-peft", "True"]

    info = json.loads((out / "retro_config.json").read_text())
    assert info["index"]["encoder"] == "minilm" and info["base_model"]["name"] == "smollm2-135m"

    answerable = [it for it in items if not it.is_impossible][:3]
    unanswerable = [it for it in items if it.is_impossible][:1]
    scores = evaluate(model.generator(index=index, max_new_tokens=8), answerable + unanswerable)
    assert scores.n == 4 and scores.n_answerable == 3 and scores.n_unanswerable == 1
    assert scores.retrieval_recall >= 2 / 4  # MiniLM + BM25 find most gold paragraphs among 3
    assert 0.0 <= scores.f1 <= 1.0 and 0.0 <= scores.em <= scores.f1 + 1e-9
    assert len(scores.predictions) == 4
    assert all(p["citations"] for p in scores.predictions if not p["abstained"])
