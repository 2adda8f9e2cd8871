"""Answers beyond verbatim spans: answer kinds in QA files, grounding by document, citation markers,
choice scoring, the answerability head, and the runner's mixed batches (tiny random Llama, real index)."""

import dataclasses
import math

import pytest
import torch
from helpers_adapters import DOCS, single_thread, smollm2_tokenizer, tiny_index, write_jsonl

from retro_peft.adapters.config import RetroAdapterConfig, RetroLoraConfig
from retro_peft.errors import InputError
from retro_peft.generation import Generator, Passage, RetrievalConfig, SamplingConfig
from retro_peft.generation.answerability import (AnswerabilityHead, fit_head, parse_abstain_at, prompt_end_hook,
                                                 prompt_features, threshold_for)
from retro_peft.generation.answers import cite, mentions, split_citations
from retro_peft.generation.constrained import choice_logprobs
from retro_peft.generation.decode import decode, left_pad
from retro_peft.generation.prompt import encode, with_choices
from retro_peft.qa import QAItem, load_qa
from retro_peft.training import build_examples

single_thread()

ALPS = {"id": "alps", "title": "Alps", "text": (
    "The Alps are the highest mountain range in Europe, stretching about 1,200 kilometres across eight countries. "
    "Mont Blanc, on the border of France and Italy, is the highest summit of the Alps at 4,806 metres. "
    "Glaciers in the Alps feed the Rhine, the Rhone and the Po, and many lakes such as Lake Geneva. "
    "Alpine farmers move their cattle to high pastures in summer, a custom called transhumance. "
    "The Alps formed over tens of millions of years as the African and Eurasian plates collided.")}
RETRIEVAL = RetrievalConfig(k=2, distractors=1, oracle_fraction=1.0, context_tokens=400)
PASSAGES = [Passage("a#1", "a", "The Rhine flows into the North Sea.", "Rhine", 2.0),
            Passage("b#1", "b", "The North Sea borders Norway.", "Sea", 1.5),
            Passage("c#1", "c", "Tea comes from Camellia sinensis.", "Tea", 0.5)]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return tiny_index(tmp_path_factory.mktemp("kinds") / "idx", docs=DOCS + [ALPS])  # the Alps: two chunks


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)  # a wide initialisation: greedy choices vary from token to token
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=1)
    return LlamaForCausalLM(config).float().eval()


def _docs(index):
    return {c.id: c.doc_id for c in index.chunks()}


# -- QA files ----------------------------------------------------------------------------------------

def test_qa_file_kinds_and_choices_are_read_and_choice_answers_canonicalised(tmp_path):
    items = load_qa(write_jsonl(tmp_path / "c.jsonl", [
        {"question": "Is tea a drink?", "answers": ["YES."], "choices": ["yes", "no"], "gold_doc_ids": ["tea"]},
        {"question": "Is chess a drink?", "answers": ["the No"], "kind": "choice", "choices": [" yes", "no "]},
        {"question": "Is oxygen a drink?", "answers": ["no"]},  # the default choices
    ]), choices=["yes", "no", "maybe"])
    assert [(it.kind, it.answers, it.choices) for it in items] == [
        ("choice", ("yes",), ("yes", "no")), ("choice", ("no",), ("yes", "no")), ("choice", ("no",), ("yes", "no", "maybe"))]
    free = load_qa(write_jsonl(tmp_path / "f.jsonl", [{"question": "Why?", "answers": ["Because it rains."]}]),
                   kind="free")
    assert (free[0].kind, free[0].answers, free[0].choices) == ("free", ("Because it rains.",), ())
    assert load_qa(tmp_path / "f.jsonl")[0].kind == "span"  # no kind anywhere: a span


@pytest.mark.parametrize("rows, message", [
    ([{"question": "A?", "answers": ["x"]}, {"question": "B?", "answers": ["y"], "kind": "free"}],
     r"m\.jsonl:2: answer kind 'free', but the file's first question is 'span'"),
    ([{"question": "A?", "answers": ["yes"], "kind": "choice"}], r"m\.jsonl:1: a 'choice' question needs its 'choices'"),
    ([{"question": "A?", "answers": ["yes"], "choices": ["yes", "no"]},
      {"question": "B?", "answers": ["perhaps"], "choices": ["yes", "no"]}],
     r"m\.jsonl:2: answer 'perhaps' is not one of its choices \(yes, no\)"),
    ([{}, {"question": "A?", "answers": ["a"], "choices": ["a", "a "]}], r"m\.jsonl:2: 'choices' needs at least two"),
    ([{"question": "A?", "answers": ["a"], "kind": "essay"}], r"m\.jsonl:1: unknown answer kind 'essay'"),
])
def test_bad_kinds_and_choices_are_refused_with_the_line_number(tmp_path, rows, message):
    path = tmp_path / "m.jsonl"
    path.write_text("".join("\n" if not r else __import__("json").dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=message):
        load_qa(path)


# -- settings ----------------------------------------------------------------------------------------

def test_retrieval_settings_and_old_adapter_configs():
    assert (RetrievalConfig().grounding, RetrievalConfig().citations) == ("auto", True)
    with pytest.raises(InputError, match="unknown grounding 'gold'"):
        RetrievalConfig(grounding="gold")
    with pytest.raises(InputError, match="citations must be true or false"):
        RetrievalConfig(citations="yes")
    assert with_choices(" Is it? ", ("yes", "no")) == "Is it?\nAnswer with one of: yes, no."
    assert with_choices(" Is it? ", ()) == "Is it?"
    # An adapter saved before grounding and markers existed was trained on the span rule, without markers.
    saved = RetroLoraConfig(retrieval=RetrievalConfig(k=5)).to_dict()
    old = {**saved, "retrieval": {k: v for k, v in saved["retrieval"].items() if k not in ("grounding", "citations")}}
    loaded = RetroAdapterConfig.from_dict(old).retrieval
    assert (loaded.k, loaded.grounding, loaded.citations) == (5, "span", False)
    new = RetroAdapterConfig.from_dict({**saved, "retrieval": {**saved["retrieval"], "grounding": "doc"}}).retrieval
    assert (new.grounding, new.citations) == ("doc", True)


# -- training examples -------------------------------------------------------------------------------

def test_a_free_answer_is_grounded_by_its_document_and_cites_every_gold_passage(index, tokenizer):
    item = QAItem("alps", "How high is Mont Blanc, and which rivers do Alpine glaciers feed?", ("Very high, and three.",),
                  ("alps",), kind="free")
    docs = _docs(index)
    targets = set()
    for seed in range(3):
        (ex,) = build_examples([item], index, tokenizer, dataclasses.replace(RETRIEVAL, k=3), seed=seed)
        markers = "".join(f"[{i}]" for i, c in enumerate(ex.chunk_ids, 1) if docs[c] == "alps")
        assert ex.has_gold and len(markers) == 6  # both chunks of the gold document, in prompt order
        assert ex.target == f"Very high, and three. {markers}"
        assert tokenizer.decode([t for t in ex.labels if t != -100]) == ex.target + "<|im_end|>"
        targets.add(ex.target)
    assert len(targets) > 1  # the shuffled prompt order moves the markers
    (plain,) = build_examples([item], index, tokenizer, dataclasses.replace(RETRIEVAL, citations=False))
    assert plain.target == "Very high, and three."
    # RAFT's no-gold share: no chunk of the gold document stays (the answer's words say nothing of a free answer).
    (none,) = build_examples([item], index, tokenizer, dataclasses.replace(RETRIEVAL, oracle_fraction=0.0))
    assert none.target == "I don't know." and not none.has_gold and "alps" not in {docs[c] for c in none.chunk_ids}


def test_a_choice_question_lists_its_choices_and_targets_the_canonical_choice(index, tokenizer):
    item = QAItem("t", "Is tea native to East Asia?", ("yes",), ("tea",), kind="choice", choices=("yes", "no"))
    (ex,) = build_examples([item], index, tokenizer, RETRIEVAL)
    prompt = tokenizer.decode(ex.input_ids)
    assert "Question: Is tea native to East Asia?\nAnswer with one of: yes, no." in prompt
    gold = [i for i, c in enumerate(ex.chunk_ids, 1) if _docs(index)[c] == "tea"]
    assert len(gold) == 1 and ex.target == f"yes [{gold[0]}]"


def test_grounding_auto_falls_back_to_the_answers_words_and_doc_needs_gold_documents(index, tokenizer):
    item = QAItem("s", "Which shrub are tea leaves taken from?", ("Camellia sinensis",))  # no gold documents
    (ex,) = build_examples([item], index, tokenizer, RETRIEVAL)
    gold = [i for i, c in enumerate(ex.chunk_ids, 1) if _docs(index)[c] == "tea"]
    assert ex.has_gold and len(gold) == 1 and ex.target == f"Camellia sinensis [{gold[0]}]"
    with pytest.raises(InputError, match="question 's' has no gold_doc_ids, which grounding 'doc' needs"):
        build_examples([item], index, tokenizer, dataclasses.replace(RETRIEVAL, grounding="doc"))


def test_training_questions_of_mixed_kinds_are_refused(index, tokenizer):
    items = [QAItem("a", "Why?", ("x",), ("tea",), kind="free"), QAItem("b", "Which?", ("yes",), ("tea",))]
    with pytest.raises(InputError, match=r"mix answer kinds \(free, span\)"):
        build_examples(items, index, tokenizer, RETRIEVAL)


def test_a_span_answer_keeps_the_gold_chunk_that_holds_it(index, tokenizer):
    # Retrieval ranks the Alps' first chunk first; only the second says "transhumance".
    item = QAItem("m", "Mont Blanc is the highest summit of the Alps in France and Italy: what custom moves cattle?",
                  ("transhumance",), ("alps",))
    (ex,) = build_examples([item], index, tokenizer, dataclasses.replace(RETRIEVAL, k=1, distractors=0))
    assert ex.has_gold and "transhumance" in tokenizer.decode(ex.input_ids).split("Question:")[0]


# -- citation markers --------------------------------------------------------------------------------

def test_split_citations_and_cite_prefer_the_markers():
    a, b, c = PASSAGES
    assert split_citations("North Sea [2]", PASSAGES) == ("North Sea", [b])
    assert split_citations("North Sea [3][1][3] [9]", PASSAGES) == ("North Sea", [c, a])  # [9] names none: dropped
    assert split_citations("North Sea", PASSAGES) == ("North Sea", [])
    assert cite("North Sea", PASSAGES, [c]) == [("c#1", "c", "Tea", 0.5)]  # the markers win over word overlap
    assert cite("North Sea", PASSAGES, []) == [("a#1", "a", "Rhine", 2.0), ("b#1", "b", "Sea", 1.5)]
    assert len(cite("Zanzibar", PASSAGES)) == 3  # neither: every passage the prompt held


# -- choice scoring ----------------------------------------------------------------------------------

def test_choice_logprobs_equal_a_plain_forward_of_prompt_and_option(model, tokenizer):
    prompts = [[5, 17, 300, 41], [9, 8, 7, 6, 5, 4, 3, 2, 1000], [77]]
    options = [[[11], [12, 13], [14, 15, 16]], [[20, 21, 22, 23], [24]], [[30, 31], [32], [33, 34]]]
    got = choice_logprobs(model, prompts, options, tokenizer.pad_token_id)

    def full(p, o):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + o])).logits[0].float(), dim=-1)
        return float(sum(logp[len(p) - 1 + t, o[t]] for t in range(len(o))))

    want = [[full(p, o) for o in opts] for p, opts in zip(prompts, options)]
    assert [len(g) for g in got] == [3, 2, 3]
    assert all(abs(x - y) < 1e-4 for g, w in zip(got, want) for x, y in zip(g, w)), (got, want)
    assert len({round(x, 2) for g in got for x in g}) == 8  # the scores really differ


# -- the answerability head --------------------------------------------------------------------------

def test_parse_abstain_at():
    assert parse_abstain_at("answer_rate=0.9") == 0.9 and parse_abstain_at(" off ") == 0.0
    assert parse_abstain_at(None) is None
    for bad, message in (("answer_rate=2", r"in \(0, 1\]"), ("answer_rate=x", "must be a number"),
                         ("rate=0.5", "must be 'answer_rate=R'")):
        with pytest.raises(InputError, match=message):
            parse_abstain_at(bad)


def test_fit_head_calibrates_its_threshold_and_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(0)
    answerable = [i % 2 == 0 for i in range(40)]
    features = torch.randn(40, 3, generator=gen)
    features[:, 0] += torch.tensor([2.5 if a else -2.5 for a in answerable])  # the hidden state tells them apart
    head = fit_head(features, answerable, abstain_token=7, answer_rate=0.75)
    assert len(head.calibration) == 20 and head.calibration == sorted(head.calibration)
    assert head.threshold == threshold_for(head.calibration, 0.75) == head.calibration[5]
    assert sum(s >= head.threshold for s in head.calibration) == 15  # 75% of held-out answerable ones answered
    assert head.stats["held_out"] == 40 and head.stats["unanswerable"] == 20
    assert head.stats["abstain_unanswerable_held_out"] >= 0.9
    scores = head.scores(features)
    assert min(scores[0::2]) > max(scores[1::2])  # separable: every answerable scores above every unanswerable
    assert head.at_rate(None) is head and head.at_rate(0.0).threshold == -math.inf
    assert head.at_rate(0.5).threshold == head.calibration[10] and threshold_for([1.0, 2.0], 1.0) == -math.inf
    head.save(tmp_path)
    assert AnswerabilityHead.load(tmp_path) == head
    head.at_rate(0.0).save(tmp_path)
    assert AnswerabilityHead.load(tmp_path).threshold == -math.inf
    assert AnswerabilityHead.load(tmp_path / "none") is None
    (tmp_path / "answerability.json").write_text('{"weight": [1]}')
    with pytest.raises(InputError, match="not a valid answerability head"):
        AnswerabilityHead.load(tmp_path)
    # only answerable questions: the score is the margin alone, only the threshold is calibrated
    only = fit_head(features[0::2], [True] * 20, abstain_token=7, answer_rate=1.0)
    assert only.weight == [0.0, 0.0, 1.0] and only.bias == 0.0 and only.threshold == -math.inf
    with pytest.raises(InputError, match="no answerable one"):
        fit_head(features[:4], [False] * 4, abstain_token=7, answer_rate=0.9)


def test_threshold_for_abstains_on_the_share_the_rate_leaves():
    assert threshold_for([float(i) for i in range(20)], 0.8) == 4.0  # 16 of 20 answered (got 3.0: 17)
    assert threshold_for([float(i) for i in range(10)], 0.9) == 1.0  # 9 of 10 answered (got -inf: never abstains)


def test_prompt_features_and_the_prefill_hook(model):
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    feats = prompt_features(torch.ones(2, 4), logits, abstain_token=1)
    assert feats.shape == (2, 5) and feats[:, :4].eq(1).all()
    assert feats[:, 4].tolist() == pytest.approx([-1.0, 3.0])  # best other token's log-prob minus the abstention's
    seen = []

    def on_prefill(hidden, last):
        seen.append((hidden.shape, last.shape))
        last = last.clone()
        last[:, 5] = 1e4
        return last

    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad(), prompt_end_hook(model, on_prefill):
        first = model(input_ids=ids).logits
        second = model(input_ids=ids).logits
    assert seen == [((2, 32), (2, len(first[0, 0])))]  # the first LM-head call only
    assert first[:, -1].argmax(-1).tolist() == [5, 5] and second[:, -1].argmax(-1).tolist() != [5, 5]
    assert not model.get_output_embeddings()._forward_hooks


# -- the runner --------------------------------------------------------------------------------------

QUESTIONS = ["Where does the Rhine flow?", "Is tea from East Asia? Say it.", "Why?", "Which sea borders Norway?"]
CHOICES = [("North Sea", "Baltic Sea", "Black Sea"), ("yes", "no"), None, ("Norway", "the North Sea")]
ROW_PASSAGES = [[PASSAGES[0]], [PASSAGES[2], PASSAGES[0]], [], [PASSAGES[1], PASSAGES[0]]]


def _head(threshold, token):
    """A head whose score is the margin feature alone (hidden size 32 + 1)."""
    weight = [0.0] * 32 + [1.0]
    return AnswerabilityHead(mean=[0.0] * 33, std=[1.0] * 33, weight=weight, bias=0.0, abstain_token=token,
                             answer_rate=0.9, threshold=threshold)


def _last_logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_choice_rows_answer_the_most_likely_choice(model, tokenizer):
    gen = Generator(model, tokenizer, retrieval=RetrievalConfig(context_tokens=200, citations=False))
    picked = [c for c in CHOICES if c]
    qs = [q for q, c in zip(QUESTIONS, CHOICES) if c]
    ps = [p for p, c in zip(ROW_PASSAGES, CHOICES) if c]
    answers = gen.answer_many(qs, passages=ps, choices=picked)
    prompts = gen.prompts(qs, ps, choices=picked)
    assert "Answer with one of: North Sea, Baltic Sea, Black Sea." in prompts[0].text
    scores = choice_logprobs(model, [p.input_ids for p in prompts],
                             [[encode(tokenizer, c) for c in cs] for cs in picked], tokenizer.pad_token_id)
    want = [cs[max(range(len(s)), key=s.__getitem__)] for cs, s in zip(picked, scores)]
    assert [a.text for a in answers] == want
    assert all(a.completion_tokens == len(encode(tokenizer, a.text)) and not a.abstained for a in answers)
    # no markers decoded (citations off): the passages holding the choice's words, else every passage
    assert answers[0].citations == [("a#1", "a", "Rhine", 2.0)]  # the row's only passage
    holding = [p for p in ps[2] if mentions(p.text, want[2])] or ps[2]
    assert answers[2].citations == [(p.chunk_id, p.doc_id, p.title, p.score) for p in holding]
    # Generator(choices=...) is the default for questions that give none; a question's own come first
    yes_no = Generator(model, tokenizer, retrieval=RetrievalConfig(context_tokens=200), choices=("yes", "no"))
    got = yes_no.answer_many(QUESTIONS[:2], passages=ROW_PASSAGES[:2], choices=[CHOICES[0], None])
    assert got[0].text == want[0] and got[1].text in ("yes", "no")
    with pytest.raises(InputError, match="at least two different"):
        gen.answer_many(["Q?"], choices=[("a", "a")])
    with pytest.raises(InputError, match="2 choice lists for 1 questions"):
        gen.answer_many(["Q?"], choices=[("a", "b"), ("c", "d")])


def test_answerability_abstains_below_its_threshold_and_forbids_the_abstention_token_above(model, tokenizer):
    retrieval = RetrievalConfig(context_tokens=200, citations=False)
    plain = Generator(model, tokenizer, retrieval=retrieval, max_new_tokens=6)
    prompt = plain.prompts([QUESTIONS[0]], [ROW_PASSAGES[0]])[0].input_ids
    logp = _last_logp(model, prompt)
    top2 = logp.topk(2).indices.tolist()  # the greedy first token stands in for the abstention phrase's
    margin = float(logp[top2[1]] - logp[top2[0]])
    low = Generator(model, tokenizer, retrieval=retrieval, max_new_tokens=6, answerability=_head(1e9, top2[0]))
    (a,) = low.answer_many([QUESTIONS[0]], passages=[ROW_PASSAGES[0]])
    assert a.abstained and a.text == "I don't know." and a.completion_tokens == 0 and not a.citations
    assert a.answerability == pytest.approx(margin, abs=1e-4)
    high = Generator(model, tokenizer, retrieval=retrieval, max_new_tokens=6, answerability=_head(-math.inf, top2[0]))
    (b,) = high.answer_many([QUESTIONS[0]], passages=[ROW_PASSAGES[0]])
    # it answers, starting with the second most likely token, then decodes greedily
    rest = decode(model, *left_pad([prompt + [top2[1]]], tokenizer.pad_token_id, "cpu"), max_new_tokens=5,
                  stop_ids=high.runner.stop_ids, pad_id=tokenizer.pad_token_id)[0]
    assert not b.abstained and b.answerability == pytest.approx(margin, abs=1e-4)
    assert b.text == split_citations(tokenizer.decode([top2[1]] + rest, skip_special_tokens=True), [])[0]
    assert plain.answer(QUESTIONS[0], passages=ROW_PASSAGES[0]).text != b.text


def test_a_mixed_batch_gives_each_row_its_answer_alone(model, tokenizer):
    gen = Generator(model, tokenizer, retrieval=RetrievalConfig(context_tokens=200), batch_size=8)
    choices = [CHOICES[0], CHOICES[1], None, CHOICES[3], None, CHOICES[1], None, CHOICES[3]]
    rows = gen.rows(QUESTIONS * 2, ROW_PASSAGES * 2, choices=[c or () for c in choices])
    token = encode(tokenizer, "I")[0]
    # choice rows and free rows, each without a head, with one that abstains and with one that never does
    heads = [None, _head(1e9, token), _head(-math.inf, token), _head(-math.inf, token), None, None,
             _head(1e9, token), _head(1e9, token)]
    rows = [dataclasses.replace(r, answerability=h) for r, h in zip(rows, heads)]
    assert len({len(r.prompt.input_ids) for r in rows}) == 5  # left padding is exercised
    sampling = SamplingConfig(max_new_tokens=6)
    together = gen.runner.run(rows, sampling)
    alone = [gen.runner.run([r], sampling)[0] for r in rows]
    key = lambda a: (a.text, a.abstained, a.completion_tokens, a.citations)  # noqa: E731
    assert [key(a) for a in together] == [key(a) for a in alone]
    assert [a.answerability is None for a in together] == [h is None for h in heads]
    assert all(a.answerability == pytest.approx(b.answerability, abs=1e-4) for a, b in zip(together, alone)
               if a.answerability is not None)
    assert [a.abstained for a in together] == [False, True, False, False, False, False, True, True]
    assert all(a.text == "I don't know." and a.completion_tokens == 0 for a in together if a.abstained)
    assert all(a.text in r.choices for a, r in zip(together, rows) if r.choices and not a.abstained)
    free = [a for a, r in zip(together, rows) if not r.choices and not a.abstained]
    assert len(free) == 2 and all(a.completion_tokens == 6 and a.text not in ("", "I don't know.") for a in free)
