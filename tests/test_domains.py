"""Domains: the registry, the `domain` CLI and routing, on real MiniLM/FAISS/bm25s indexes."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import WIKI
from retro_peft.domains import (
    AUTO, RouteDecision, Router, RouterConfig, add_domain, get_domain, list_domains, remove_domain,
)
from retro_peft.errors import EncoderMismatchError, InputError, RetroPeftError
from retro_peft.index import Document, IndexConfig, build_index

TOPICS = {"math": "Mathematics", "geo": "Geography", "bio": "Biology and health sciences"}


@pytest.fixture(scope="module")
def wiki_indexes(tmp_path_factory, encoder):
    """Three tiny domain indexes: the first 12 Wikipedia summaries of three topics."""
    wanted = {topic: name for name, topic in TOPICS.items()}
    docs = {name: [] for name in TOPICS}
    with open(WIKI, encoding="utf-8") as f:
        for line in f:
            o = json.loads(line)
            name = wanted.get(o["topic"])
            if name and len(docs[name]) < 12:
                docs[name].append(Document(o["id"], o["text"], {"title": o["title"]}))
    folder = tmp_path_factory.mktemp("domains")
    return {name: build_index(folder / name, docs[name], IndexConfig()).path for name in TOPICS}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A registry of our own (indexes are passed as absolute paths, so they stay where they are)."""
    monkeypatch.setenv("RETRO_PEFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A real retro-peft adapter folder (random LoRA on a tiny Llama), saved once."""
    from helpers_adapters import smollm2_tokenizer, tiny_llama_folder

    from retro_peft.adapters import RetroLoraConfig, RetroPeftModel

    folder = tmp_path_factory.mktemp("adapter")
    tiny = tiny_llama_folder(folder / "llama", smollm2_tokenizer())
    return RetroPeftModel.create(str(tiny), RetroLoraConfig(), seed=0).save(folder / "adapter")


@pytest.fixture
def adapter_dir(tmp_path, saved_adapter):
    return Path(shutil.copytree(saved_adapter, tmp_path / "adapter"))


# -- registry ------------------------------------------------------------------------------------


def test_registry_round_trip(home, wiki_indexes, adapter_dir):
    spec = add_domain("math", wiki_indexes["math"], adapter=adapter_dir, description="numbers and proofs")
    assert spec == get_domain("math")
    assert spec.index == str(wiki_indexes["math"]) and spec.index_path == wiki_indexes["math"]
    assert spec.adapter == str(adapter_dir.resolve()) and spec.kv_cache is None
    assert json.loads((home / "domains" / "math.json").read_text())["format"] == "retro-peft-domain"
    add_domain("geo", wiki_indexes["geo"])
    assert [d.name for d in list_domains()] == ["geo", "math"]
    assert get_domain("geo").adapter is None and get_domain("geo").description is None

    with pytest.raises(InputError, match="already exists"):
        add_domain("geo", wiki_indexes["bio"])
    assert add_domain("geo", wiki_indexes["bio"], overwrite=True).index == str(wiki_indexes["bio"])

    assert remove_domain("geo").name == "geo"
    assert [d.name for d in list_domains()] == ["math"]
    assert wiki_indexes["geo"].exists()  # removing a domain keeps its index


def test_index_by_name_stays_a_name(home, encoder):
    build_index("tiny", [Document("a", "Glaciers are slow rivers of ice.")], IndexConfig())
    spec = add_domain("ice", "tiny")
    assert spec.index == "tiny" and spec.index_path == home / "indexes" / "tiny"


@pytest.mark.parametrize("name", ["auto", "", "has space", "../escape", "a/b", "ünï", ".."])
def test_bad_names(home, wiki_indexes, name):
    with pytest.raises(InputError, match="reserved|bad domain name"):
        add_domain(name, wiki_indexes["math"])
    assert not (home / "domains").exists() or not list((home / "domains").iterdir())


def test_bad_inputs(home, wiki_indexes, tmp_path, adapter_dir):
    add_domain("math", wiki_indexes["math"])
    with pytest.raises(InputError, match=r"unknown domain 'law'; known domains: math"):
        get_domain("law")
    with pytest.raises(InputError, match="unknown domain"):
        remove_domain("law")
    with pytest.raises(InputError, match="index does not open.*no index at"):
        add_domain("nothing", tmp_path / "missing-index")
    with pytest.raises(InputError, match="index does not open"):
        add_domain("nothing", "never-built")
    (adapter_dir / "retro_config.json").unlink()  # a PEFT adapter, but not one retro-peft saved
    with pytest.raises(InputError, match="PEFT adapter without retro_config.json"):
        add_domain("x", wiki_indexes["geo"], adapter=adapter_dir)
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="not an adapter folder: adapter_model.safetensors is missing"):
        add_domain("x", wiki_indexes["geo"], adapter=adapter_dir)
    with pytest.raises(InputError, match="adapter folder not found"):
        add_domain("x", wiki_indexes["geo"], adapter=tmp_path / "no-adapter")
    assert [d.name for d in list_domains()] == ["math"]  # nothing half-registered

    (home / "domains" / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="broken.json is unreadable"):
        get_domain("broken")


def test_an_unreadable_domain_file_is_skipped_in_listings_and_can_be_removed(home, wiki_indexes, caplog,
                                                                             monkeypatch, capsys):
    add_domain("math", wiki_indexes["math"])
    (home / "domains" / "broken.json").write_text("{not json")
    (home / "domains" / "future.json").write_text(json.dumps(
        {"format": "retro-peft-domain", "format_version": 99, "name": "future", "index": "x"}))
    (home / "domains" / "odd.json").write_text(json.dumps(  # a hand-edited layout (or one a later version knows)
        {"format": "retro-peft-domain", "format_version": 1, "name": "odd", "index": "x", "kv_cache": "/k",
         "kv_layout": "Prefix"}))
    with caplog.at_level(logging.WARNING, logger="retro_peft"):
        assert [d.name for d in list_domains()] == ["math"]  # one bad file does not hide the others
    assert "broken.json is unreadable" in caplog.text and "format version 99" in caplog.text
    assert "kv_layout 'Prefix'" in caplog.text
    (home / "domains" / "odd.json").unlink()
    with pytest.raises(InputError, match="format version 99"):
        get_domain("future")  # asked for by name, it is still the clear error
    assert cli(monkeypatch, "domain", "list") == 0 and capsys.readouterr().out.startswith("math\t")

    assert remove_domain("broken") is None  # what cannot be read can still be removed
    assert cli(monkeypatch, "domain", "remove", "future") == 0
    assert "removed domain future" in capsys.readouterr().out
    assert sorted(f.name for f in (home / "domains").iterdir()) == ["math.json"]
    with pytest.raises(InputError, match="unknown domain 'broken'"):
        remove_domain("broken")


# -- CLI -----------------------------------------------------------------------------------------


def cli(monkeypatch, *argv) -> int:
    """`retro-peft ...` through the real entry point (its parser must have the `domain` subcommand)."""
    from retro_peft.cli import main

    return main(list(map(str, argv)))


def test_cli(home, wiki_indexes, adapter_dir, monkeypatch, capsys):
    assert cli(monkeypatch, "domain", "list") == 0
    assert "no domains" in capsys.readouterr().out
    assert cli(monkeypatch, "domain", "add", "math", "--index", wiki_indexes["math"], "--adapter", adapter_dir,
               "--description", "numbers") == 0
    assert "added domain math" in capsys.readouterr().out
    assert cli(monkeypatch, "domain", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == ["math"] and listed[0]["description"] == "numbers"
    assert cli(monkeypatch, "domain", "show", "math", "--json") == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == str(adapter_dir.resolve())
    assert cli(monkeypatch, "domain", "show", "math") == 0
    assert "numbers" in capsys.readouterr().out

    assert cli(monkeypatch, "domain", "add", "math", "--index", wiki_indexes["geo"]) == 2
    assert "already exists" in capsys.readouterr().err
    # --kv-cache: the file's absolute path is recorded (the cache is computed when the domain is first loaded)
    assert cli(monkeypatch, "domain", "add", "geo", "--index", wiki_indexes["geo"], "--kv-cache", "geo.kv") == 0
    assert "frozen KV cache" in capsys.readouterr().out
    assert get_domain("geo").kv_cache == str(Path("geo.kv").resolve()) and not Path("geo.kv").exists()
    assert cli(monkeypatch, "domain", "list") == 0 and f"kv_cache={Path('geo.kv').resolve()} (block)" in capsys.readouterr().out
    assert cli(monkeypatch, "domain", "add", "geo", "--index", wiki_indexes["geo"], "--kv-cache", "geo.kv",
               "--kv-layout", "prefix", "--overwrite") == 0 and "(prefix)" in capsys.readouterr().out
    assert get_domain("geo").kv_layout == "prefix"
    assert cli(monkeypatch, "domain", "add", "bio", "--index", wiki_indexes["bio"], "--kv-layout", "prefix") == 2
    assert "needs a KV cache file" in capsys.readouterr().err
    assert cli(monkeypatch, "domain", "add", "bio", "--index", wiki_indexes["bio"], "--kv-cache", str(home)) == 2
    assert "is a folder" in capsys.readouterr().err and "bio" not in [d.name for d in list_domains()]
    assert cli(monkeypatch, "domain", "remove", "geo") == 0
    assert cli(monkeypatch, "domain", "add", "auto", "--index", wiki_indexes["geo"]) == 2
    assert "reserved" in capsys.readouterr().err
    assert cli(monkeypatch, "domain", "show", "law") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown domain 'law'") and len(err.strip().splitlines()) == 1

    assert cli(monkeypatch, "domain", "remove", "math") == 0
    assert cli(monkeypatch, "domain", "remove", "math") == 2
    assert list_domains() == []


def test_answer_choices_and_abstain_at_are_recorded_checked_and_optional(home, wiki_indexes, adapter_dir, tmp_path,
                                                                         monkeypatch, capsys):
    from test_bank import adapter_with_head

    head_dir = adapter_with_head(adapter_dir, tmp_path / "with-head", None)
    spec = add_domain("pubmed", wiki_indexes["bio"], adapter=head_dir, choices=["yes", "no", "maybe"],
                      abstain_at=0.9)
    assert spec == get_domain("pubmed") and spec.choices == ("yes", "no", "maybe") and spec.abstain_at == 0.9
    saved = json.loads((home / "domains" / "pubmed.json").read_text())
    assert saved["choices"] == ["yes", "no", "maybe"] and saved["abstain_at"] == 0.9

    # a domain file written before these keys existed still reads (no choices, the head's own rate)
    old = {k: v for k, v in saved.items() if k not in ("choices", "abstain_at")}
    (home / "domains" / "old.json").write_text(json.dumps({**old, "name": "old"}))
    assert get_domain("old").choices is None and get_domain("old").abstain_at is None

    for kwargs, message in ((dict(choices=["yes"]), "choices must be a list of at least two different"),
                            (dict(choices=["yes", ""]), "at least two different non-empty"),
                            (dict(choices=["yes", "yes"]), "at least two different"),
                            (dict(choices="yes,no"), "must be a list"),
                            (dict(abstain_at=1.5, adapter=head_dir), r"abstain_at must be an answer rate in \(0, 1\]"),
                            (dict(abstain_at=True, adapter=head_dir), "abstain_at must be an answer rate"),
                            (dict(abstain_at=0.9), "abstain_at needs an adapter"),
                            (dict(abstain_at=0.9, adapter=adapter_dir), "has none")):  # no answerability.json
        with pytest.raises(InputError, match=message):
            add_domain("x", wiki_indexes["geo"], **kwargs)
    (home / "domains" / "bad.json").write_text(json.dumps({**old, "name": "bad", "choices": ["only"]}))
    with pytest.raises(InputError, match="bad.json is malformed.*choices"):
        get_domain("bad")
    (home / "domains" / "bad.json").unlink()

    # the CLI: --choices is comma-separated, --abstain-at takes ask's syntax (off: never by the score)
    assert cli(monkeypatch, "domain", "add", "yn", "--index", wiki_indexes["geo"], "--adapter", head_dir,
               "--choices", "yes, no", "--abstain-at", "off") == 0
    assert "choices yes,no" in capsys.readouterr().out
    assert get_domain("yn").choices == ("yes", "no") and get_domain("yn").abstain_at == 0.0
    assert cli(monkeypatch, "domain", "show", "yn") == 0 and "yes,no" in capsys.readouterr().out
    assert cli(monkeypatch, "domain", "list") == 0 and "choices=yes,no" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(monkeypatch, "domain", "add", "z", "--index", wiki_indexes["geo"], "--choices", "yes")
    assert "--choices must be a list of at least two" in capsys.readouterr().err
    assert cli(monkeypatch, "domain", "add", "z", "--index", wiki_indexes["geo"], "--adapter", head_dir,
               "--abstain-at", "rate=0.9") == 2
    assert "abstain_at must be 'answer_rate=R'" in capsys.readouterr().err


def test_a_domains_history_strategy_is_recorded_checked_and_optional(home, wiki_indexes, monkeypatch, capsys):
    spec = add_domain("rivers", wiki_indexes["geo"], history="concat")
    assert spec == get_domain("rivers") and spec.history == "concat"
    saved = json.loads((home / "domains" / "rivers.json").read_text())
    assert saved["history"] == "concat"
    # a domain file written before the key existed still reads (the adapter's setting, else none)
    old = {k: v for k, v in saved.items() if k != "history"}
    (home / "domains" / "old.json").write_text(json.dumps({**old, "name": "old"}))
    assert get_domain("old").history is None and add_domain("plain", wiki_indexes["geo"]).history is None
    with pytest.raises(InputError, match="history must be one of none, concat, rewrite, got 'summarise'"):
        add_domain("x", wiki_indexes["geo"], history="summarise")
    (home / "domains" / "bad.json").write_text(json.dumps({**old, "name": "bad", "history": "summarise"}))
    with pytest.raises(InputError, match="bad.json is malformed.*history"):
        get_domain("bad")
    (home / "domains" / "bad.json").unlink()

    assert cli(monkeypatch, "domain", "add", "rw", "--index", wiki_indexes["geo"], "--history", "rewrite") == 0
    assert "history rewrite" in capsys.readouterr().out and get_domain("rw").history == "rewrite"
    assert cli(monkeypatch, "domain", "list") == 0 and "history=rewrite" in capsys.readouterr().out
    assert cli(monkeypatch, "domain", "show", "rw", "--json") == 0
    assert json.loads(capsys.readouterr().out)["history"] == "rewrite"
    with pytest.raises(SystemExit):
        cli(monkeypatch, "domain", "add", "z", "--index", wiki_indexes["geo"], "--history", "summarise")
    assert "invalid choice: 'summarise'" in capsys.readouterr().err


# -- routing -------------------------------------------------------------------------------------

QUERIES = {
    "a branch of mathematics that studies algebraic structures and number fields": "math",
    "capital city and largest port of a West African country": "geo",
    "molecule that carries energy within cells of living organisms": "bio",
    "the aardvark, a nocturnal burrowing mammal native to Africa": "bio",
    "mountain in the Andes, the highest peak in the Americas": "geo",
}
UNRELATED = ["remind me to buy milk and eggs after work", "can you reschedule my meeting with Sarah to Friday"]


def test_routing_and_fallback(wiki_indexes, encoder):
    router = Router(wiki_indexes, encoder=encoder)
    decisions = router.route_many(list(QUERIES) + UNRELATED)
    assert [d.domain for d in decisions] == list(QUERIES.values()) + [None] * len(UNRELATED)
    for d in decisions[:len(QUERIES)]:
        assert d.similarity >= router.config.threshold
        assert d.score == max(d.scores_by_domain.values()) and abs(sum(d.scores_by_domain.values()) - 1) < 1e-6
    assert all(d.similarity < router.config.threshold and d.score == 0 for d in decisions[len(QUERIES):])
    # One at a time gives the same decisions as a batch (cosines to float32 rounding: the encoder pads a
    # batch, which changes the order of its sums).
    for single, batched in zip([router.route(q) for q in list(QUERIES)[:2]], decisions[:2]):
        assert (single.domain, single.score, single.scores_by_domain) == \
            (batched.domain, batched.score, batched.scores_by_domain)
        assert single.similarity == pytest.approx(batched.similarity, abs=1e-5)
    assert isinstance(decisions[0], RouteDecision)

    assert router.choose(AUTO, "capital city and largest port of a West African country") == "geo"
    assert router.choose(AUTO, UNRELATED[0]) is None
    assert router.choose("math", UNRELATED[0]) == "math"  # a named domain is used as is
    with pytest.raises(InputError, match="unknown domain 'law'"):
        router.choose("law", "anything")
    with pytest.raises(InputError, match="empty"):
        router.route_many(["fine", " "])

    strict = Router(wiki_indexes, RouterConfig(threshold=0.99), encoder)
    assert strict.route(list(QUERIES)[0]).domain is None  # above every similarity: always the base model


def test_router_from_registry(home, wiki_indexes, encoder):
    with pytest.raises(InputError, match="no domains"):
        Router.from_registry(encoder=encoder)
    for name, path in wiki_indexes.items():
        add_domain(name, path)
    router = Router.from_registry(["geo", "bio"], encoder=encoder)
    assert router.names == ["geo", "bio"]
    assert router.route("the aardvark, a nocturnal burrowing mammal native to Africa").domain == "bio"
    assert Router.from_registry(encoder=encoder).names == ["bio", "geo", "math"]


def test_router_bad_config_and_mixed_encoders(wiki_indexes, encoder, small_encoder_dir, tmp_path):
    with pytest.raises(InputError, match="positive integer"):
        Router(wiki_indexes, RouterConfig(k=0), encoder)
    with pytest.raises(InputError, match="at least one domain"):
        Router({}, encoder=encoder)
    other = build_index(tmp_path / "other", [Document("x", "Opera is a form of theatre.")],
                        IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=64, overlap=8))
    with pytest.raises(RetroPeftError, match="encoder"):
        Router({"math": wiki_indexes["math"], "arts": other}, encoder=encoder)
    with pytest.raises(EncoderMismatchError):
        Router({"math": wiki_indexes["math"], "arts": other.path}, encoder=encoder)
