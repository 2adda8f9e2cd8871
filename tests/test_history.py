"""Conversations in the generation layer: earlier turns in the prompt within its budget, history-aware
retrieval (concat, rewrite), QA files and training examples with history (tiny random Llama, real index)."""

import numpy as np
import pytest
import torch
from helpers_adapters import single_thread, smollm2_tokenizer, tiny_index, write_jsonl

from retro_peft.errors import InputError
from retro_peft.generation import Generator, Passage, RetrievalConfig, SearchOptions
from retro_peft.generation.history import clean_rewrite, concat_parts, concat_queries, concat_text, concat_vectors
from retro_peft.generation.prompt import Turn, build_prompt, check_history, encode
from retro_peft.qa import QAItem, load_qa
from retro_peft.training import build_examples

single_thread()

RETRIEVAL = RetrievalConfig(k=2, distractors=0, context_tokens=300, history_tokens=80)
PASSAGE = Passage("p#1", "p", "The Normans were the people who gave their name to Normandy. " * 6, "Normans")
HISTORY = [{"role": "system", "content": "Answer like a historian."},
           {"role": "user", "content": "Who were the Normans?"},
           {"role": "assistant", "content": "People of Normandy."}]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return tiny_index(tmp_path_factory.mktemp("history") / "idx")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).float().eval()


def test_history_is_checked_and_named():
    assert check_history(HISTORY)[0] == Turn("system", "Answer like a historian.")
    assert check_history([("user", " hi ")]) == (Turn("user", "hi"),)
    with pytest.raises(InputError, match=r"history\[1\]\.role"):
        check_history([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(InputError, match=r"history\[0\]\.content"):
        check_history([{"role": "user", "content": "  "}])
    with pytest.raises(InputError, match="list of"):
        check_history("who?")


def test_prompt_holds_the_system_message_and_earlier_turns_in_order(tokenizer):
    prompt = build_prompt(tokenizer, "When did they arrive?", [PASSAGE], RETRIEVAL, history=HISTORY)
    text = prompt.text
    assert prompt.dropped_turns == 0 and len(prompt.history) == 3
    assert text.index("Answer like a historian.") < text.index("Who were the Normans?") \
        < text.index("People of Normandy.") < text.index("Passages:") < text.index("When did they arrive?")
    assert text.count("<|im_start|>system") == 1  # the system message is the template's system prompt
    assert len(prompt.input_ids) <= RETRIEVAL.context_tokens


def test_passages_keep_their_share_and_the_oldest_turns_go_first(tokenizer):
    long = [{"role": "user", "content": f"Old question number {i} about something else entirely?"}
            for i in range(30)] + HISTORY[1:]
    alone = build_prompt(tokenizer, "When did they arrive?", [PASSAGE, PASSAGE], RETRIEVAL)
    prompt = build_prompt(tokenizer, "When did they arrive?", [PASSAGE, PASSAGE], RETRIEVAL, history=long)
    assert len(prompt.input_ids) <= RETRIEVAL.context_tokens
    assert prompt.passages and prompt.dropped_turns > 0
    kept = [t.content for t in prompt.history]
    assert kept[-2:] == ["Who were the Normans?", "People of Normandy."]  # the newest stay
    assert kept == [t["content"] for t in long][-len(kept):]  # a contiguous recent history
    # passages gave up at most `history_tokens` of their room to the turns
    passage_tokens = lambda p: sum(len(encode(tokenizer, x.text)) for x in p.passages)  # noqa: E731
    assert passage_tokens(alone) - passage_tokens(prompt) <= RETRIEVAL.history_tokens + 16
    # a history far over the budget: the question still gets its prompt
    huge = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    prompt = build_prompt(tokenizer, "When did they arrive?", [PASSAGE], RETRIEVAL, history=huge)
    assert prompt.dropped_turns == 2 and prompt.history == () and "When did they arrive?" in prompt.text


def test_concat_weights_the_newest_most_and_normalises(index):
    turns = check_history(HISTORY + [{"role": "user", "content": "And their language?"},
                                     {"role": "assistant", "content": "Norman French."}])
    parts = concat_parts("When did they arrive?", turns)
    assert parts == [("When did they arrive?", 1.0), ("And their language?", 0.5), ("Who were the Normans?", 0.25),
                     ("Norman French.", 0.5)]
    assert concat_text(parts).count("When did they arrive?") == 2
    vectors = concat_vectors(index.encoder, [parts, parts[:1]])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    single = np.asarray(index.encoder.encode(["When did they arrive?"]), dtype=np.float32)[0]
    assert np.allclose(vectors[1], single / np.linalg.norm(single), atol=1e-5)
    texts, dense = concat_queries(index, ["When did they arrive?"], [turns], "sparse")
    assert dense is None and texts == [concat_text(parts)]


def test_a_pronoun_follow_up_finds_its_subject_with_the_conversation(index, model, tokenizer):
    generator = Generator(model, tokenizer, index=index, retrieval=RetrievalConfig(k=1))
    history = [{"role": "user", "content": "Tell me about the Rhine river."},
               {"role": "assistant", "content": "It flows into the North Sea."}]
    question = "Who invented it?"  # alone, it finds the piano
    bare = generator.retrieve([question], SearchOptions.of(history="none"), [history])[0]
    concat = generator.retrieve([question], SearchOptions.of(history="concat"), [history])[0]
    assert concat[0].doc_id == "rhine" and bare[0].doc_id == "piano"
    # the domain's own strategy applies when the request names none; no history: the question alone
    by_domain = Generator(model, tokenizer, index=index, retrieval=RetrievalConfig(k=1, history="concat"))
    assert by_domain.retrieve([question], None, [history])[0][0].doc_id == "rhine"
    assert by_domain.retrieve([question])[0][0].doc_id == bare[0].doc_id


def test_rewrite_asks_the_base_model_and_searches_its_question(index, model, tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    generator = Generator(peft_model, tokenizer, index=index, retrieval=RetrievalConfig(k=1))
    history = check_history([{"role": "user", "content": "What is the Rhine?"}])
    rewritten = generator.standalone(["How long is it?", "What is tea?"], [history, ()])
    assert rewritten[1] is None  # no history: nothing to rewrite
    hits = generator.retrieve(["How long is it?"], SearchOptions.of(history="rewrite"), [history])[0]
    # a random model's reply is no question: the follow-up is searched as concat would
    expected = index.search_many([rewritten[0]], k=1)[0] if rewritten[0] else \
        generator.retrieve(["How long is it?"], SearchOptions.of(history="concat"), [history])[0]
    assert hits[0].chunk_id == expected[0].chunk_id
    assert clean_rewrite(" When was the Rhine named?\nmore") == "When was the Rhine named?"
    assert clean_rewrite("The answer is 1,230 km.") is None
    with pytest.raises(InputError, match="unknown history strategy"):
        SearchOptions.of(history="summarise")


def test_answers_with_history_equal_the_prompt_built_alone(index, model, tokenizer):
    generator = Generator(model, tokenizer, index=index, retrieval=RETRIEVAL, max_new_tokens=4)
    answer = generator.answer("When did they arrive?", history=HISTORY)
    prompt = generator.prompts(["When did they arrive?"], history=[HISTORY])[0]
    assert answer.prompt_tokens == len(prompt.input_ids) and answer.dropped_turns == 0
    batch = generator.answer_many(["When did they arrive?", "What is tea?"], history=[HISTORY, None])
    assert batch[0].text == answer.text and batch[1].text == generator.answer("What is tea?").text


def test_qa_history_field_and_training_examples(tmp_path, index, tokenizer):
    rows = [{"question": "When did they arrive?", "answers": ["911"], "gold_doc_ids": ["normans"],
             "history": HISTORY}, {"question": "What is tea?", "answers": ["a drink"], "gold_doc_ids": ["tea"]}]
    items = load_qa(write_jsonl(tmp_path / "qa.jsonl", rows))
    assert items[0].history[1] == ("user", "Who were the Normans?") and items[1].history == ()
    (ex, _) = build_examples(items, index, tokenizer, RetrievalConfig(k=1, distractors=0, context_tokens=300))
    text = tokenizer.decode(ex.input_ids)
    assert text.index("Who were the Normans?") < text.index("When did they arrive?")
    with pytest.raises(InputError, match="block-attention"):
        build_examples(items, index, tokenizer, RetrievalConfig(k=1, distractors=0, block_attention=True))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "history": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(InputError, match=r"bad\.jsonl:1: history\[0\]\.role"):
        load_qa(bad)
    assert QAItem("x", "q", ("a",)).history == ()
