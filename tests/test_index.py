import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retro_peft.errors import EncoderMismatchError, IndexFormatError, InputError
from retro_peft.index import Document, IndexConfig, MaxSimReranker, build_index, evaluate_retrieval, open_index
from retro_peft.index.embedding import EmbeddingCache, embed_with_cache
from retro_peft.qa import QAItem

from conftest import run_cli


@pytest.fixture
def index(corpus, tmp_path):
    return build_index(tmp_path / "idx", [corpus / "docs", corpus / "more.jsonl"])


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_search_finds_the_right_document(index, mode):
    hits = index.search("which language has a borrow checker for memory safety?", k=3, mode=mode)
    assert hits[0].doc_id == "rust.txt"
    assert hits[0].metadata["title"] == "rust" and "borrow" in hits[0].text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_filters_apply_before_the_top_k_cut(index):
    # "opera" is the least similar document to this query; with the filter it must still come back.
    query = "molten lava erupts"
    assert index.search(query, k=1, mode="dense")[0].doc_id == "volcano"
    for mode in ("dense", "sparse", "hybrid"):
        hits = index.search(query, k=1, mode=mode, filters={"topic": "arts"})
        if mode == "sparse":
            assert hits == []  # no query term occurs in the only allowed document
        else:
            assert [h.doc_id for h in hits] == ["opera"]
        assert all(h.metadata["topic"] == "geo" for h in index.search(query, k=5, mode=mode, filters={"topic": "geo"}))
    assert index.search(query, k=5, filters={"topic": "nothing"}) == []
    assert [h.doc_id for h in index.search(query, k=5, filters={"doc_id": "glacier"})] == ["glacier"]


def test_bad_search_arguments(index):
    for k in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="k must be a positive integer"):
            index.search("cats", k=k)
    with pytest.raises(InputError, match="unknown search mode"):
        index.search("cats", mode="fuzzy")
    with pytest.raises(InputError, match="query is empty"):
        index.search("   ")


def test_weighted_fusion_and_reranker(index):
    hits = index.search("cats sleep sixteen hours", k=2, fusion="weighted", weights=(0.5, 0.5))
    assert hits[0].doc_id == "cats.md" and hits[0].score <= 1.0
    reranked = index.search("cats sleep sixteen hours", k=2, rerank=MaxSimReranker(index.encoder))
    assert reranked[0].doc_id == "cats.md"
    assert reranked[0].score > reranked[1].score


def test_persistence_add_is_idempotent_and_updates(index, corpus, tmp_path):
    gen = index.manifest["generation"]
    assert index.add([corpus / "more.jsonl"]) == {"added": 0, "replaced": 0, "unchanged": 3}
    assert index.manifest["generation"] == gen  # nothing written

    stats = index.add([Document("volcano", "Volcanoes are vents where magma escapes.", {"title": "Volcano", "topic": "geo"}),
                       Document("tea", "Tea is brewed from the leaves of Camellia sinensis.", {"title": "Tea"})])
    assert stats == {"added": 1, "replaced": 1, "unchanged": 0}
    reopened = open_index(tmp_path / "idx")
    assert sorted(reopened.doc_ids()) == ["cats.md", "glacier", "opera", "rust.txt", "tea", "volcano"]
    assert "magma" in reopened.search("magma vent", k=1)[0].text
    assert reopened.search("Camellia sinensis leaves", k=1, mode="sparse")[0].doc_id == "tea"
    assert reopened.manifest["counts"] == {"documents": 6, "chunks": 6}

    assert reopened.delete(["tea"]) == 1
    again = open_index(tmp_path / "idx")
    assert "tea" not in again.doc_ids()
    with pytest.raises(InputError, match="no document with id 'nope'"):
        again.delete(["nope"])
    # only the current generation's files remain
    files = sorted(p.name for p in (tmp_path / "idx").iterdir() if not p.name.startswith("."))
    assert files == sorted(["manifest.json", *again.manifest["files"]])


def test_build_refuses_to_clobber(index, corpus, tmp_path):
    with pytest.raises(InputError, match="already exists"):
        build_index(tmp_path / "idx", [corpus / "docs"])
    rebuilt = build_index(tmp_path / "idx", [corpus / "docs"], overwrite=True)
    assert rebuilt.manifest["counts"]["documents"] == 2
    assert open_index(tmp_path / "idx").manifest["generation"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a retro-peft index"):
        build_index(tmp_path / "other", [corpus / "docs"])
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_build_rejects_bad_config_before_writing(corpus, tmp_path):
    with pytest.raises(InputError, match="unknown backend 'milvus'"):
        build_index(tmp_path / "a", [corpus / "docs"], IndexConfig(backend="milvus"))
    with pytest.raises(InputError, match="exceed the encoder's limit"):
        build_index(tmp_path / "b", [corpus / "docs"], IndexConfig(chunk_tokens=4096, overlap=0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "manifest.json").exists()


def test_open_rejects_other_encoders_newer_formats_and_corruption(index, tmp_path, small_encoder_dir):
    path = tmp_path / "idx"
    assert open_index(path, encoder="minilm").encoder_name == "minilm"
    with pytest.raises(EncoderMismatchError, match="built with encoder 'minilm'"):
        open_index(path, encoder=str(small_encoder_dir))

    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99"):
        open_index(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(IndexFormatError, match="not a retro-peft index"):
        open_index(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    chunks = next(name for name in manifest["files"] if name.startswith("chunks-"))
    (path / chunks).write_text((path / chunks).read_text().replace("Cats", "Dogs"))
    with pytest.raises(IndexFormatError, match="checksum mismatch"):
        open_index(path)
    with pytest.raises(IndexFormatError, match="no index at"):
        open_index(tmp_path / "nothing-here")


@pytest.mark.parametrize("ann_kind", ["hnsw", "ivf"])
def test_ann_kinds_above_threshold(corpus, tmp_path, ann_kind):
    index = build_index(tmp_path / ann_kind, [corpus / "docs", corpus / "more.jsonl"],
                        IndexConfig(ann_threshold=2, ann_kind=ann_kind))
    assert index.manifest["dense"]["kind"] == ann_kind
    reopened = open_index(tmp_path / ann_kind)
    assert reopened.search("lava from the mantle", k=1, mode="dense")[0].doc_id == "volcano"
    assert [h.doc_id for h in reopened.search("lava", k=1, mode="dense", filters={"topic": "arts"})] == ["opera"]


def test_qdrant_embedded_backend_matches_faiss(corpus, tmp_path):
    pytest.importorskip("qdrant_client")
    inputs = [corpus / "docs", corpus / "more.jsonl"]
    faiss_index = build_index(tmp_path / "f", inputs)
    qdrant_index = build_index(tmp_path / "q", inputs, IndexConfig(backend="qdrant"))
    queries = ["lava", "ice valleys", "memory safety", "purring"]
    for a, b in zip(faiss_index.search_many(queries, k=3, mode="dense"), qdrant_index.search_many(queries, k=3, mode="dense")):
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-4)
    assert [h.doc_id for h in qdrant_index.search("lava", k=1, mode="dense", filters={"topic": "arts"})] == ["opera"]
    qdrant_index.add([Document("tea", "Tea is brewed from leaves.", {})])
    reader = open_index(tmp_path / "q")  # e.g. a server replica, holding generation 2
    qdrant_index.delete(["opera"])
    assert reader.search("brewed leaves", k=1, mode="dense")[0].doc_id == "tea"  # its collection is kept
    reopened = open_index(tmp_path / "q")
    assert reopened.manifest["dense"]["collection"].endswith("-g000003")
    names = sorted(c.name[-8:] for c in reopened._dense.client.get_collections().collections)
    assert names == ["-g000002", "-g000003"]  # older generations are dropped
    assert reopened.search("brewed leaves", k=1, mode="dense")[0].doc_id == "tea"
    assert "opera" not in {h.doc_id for h in reopened.search("music theatre", k=10, mode="dense")}


def test_qdrant_embedded_store_in_use_elsewhere_is_a_clear_error(corpus, tmp_path):
    pytest.importorskip("qdrant_client")
    build_index(tmp_path / "q", [corpus / "docs"], IndexConfig(backend="qdrant"))  # this process now holds the store
    out = run_cli("index", "query", tmp_path / "q", "cats")
    assert out.returncode == 2, out.stderr
    assert f"embedded Qdrant store {tmp_path / 'q' / 'qdrant'} is in use by another process" in out.stderr
    assert "--qdrant-url" in out.stderr and "Traceback" not in out.stderr


def test_embedding_cache_skips_known_chunks(encoder, tmp_path):
    cache = EmbeddingCache(encoder, tmp_path)
    texts = ["alpha beta", "gamma delta"]
    first, embedded = embed_with_cache(encoder, texts, ["h1", "h2"], cache)
    assert embedded == 2
    again, embedded = embed_with_cache(encoder, texts + ["epsilon"], ["h1", "h2", "h3"], cache)
    assert embedded == 1
    np.testing.assert_array_equal(first, again[:2])
    np.testing.assert_allclose(np.linalg.norm(again, axis=1), 1.0, rtol=1e-5)


def test_retrieval_metrics(index):
    items = [QAItem("1", "Which animal purrs and sleeps sixteen hours?", ("cat",), ("cats.md",)),
             QAItem("2", "What slow rivers of ice carve valleys?", ("glaciers",), ()),  # judged by answer string
             QAItem("3", "Unanswerable?", (), ("x",), is_impossible=True)]
    report = evaluate_retrieval(index, items)
    assert report["n"] == 2
    for mode in ("dense", "sparse", "hybrid"):
        m = report[mode]
        assert set(m) == {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"}
        assert m["recall@1"] == 1.0 and m["mrr@10"] == 1.0 and m["ndcg@10"] == 1.0


def test_a_stale_writer_is_refused_and_the_first_writers_documents_survive(index, tmp_path):
    path = tmp_path / "idx"
    first, second = open_index(path), open_index(path)  # two writers, e.g. two `index add` processes
    first.add([Document("tea", "Tea is brewed from the leaves of Camellia sinensis.", {"title": "Tea"})])
    with pytest.raises(IndexFormatError, match=r"changed since it was opened \(generation 1 -> 2\); reopen it"):
        second.add([Document("coffee", "Coffee is brewed from roasted coffee beans.", {"title": "Coffee"})])
    with pytest.raises(IndexFormatError, match="changed since it was opened"):
        second.delete(["opera"])
    reopened = open_index(path)  # verifies every checksum
    assert reopened.manifest["generation"] == 2
    assert sorted(reopened.doc_ids()) == ["cats.md", "glacier", "opera", "rust.txt", "tea", "volcano"]
    assert reopened.search("Camellia sinensis leaves", k=1)[0].doc_id == "tea"
    files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    assert files == sorted(["manifest.json", *reopened.manifest["files"]])
    # reopened, the refused writer's change goes through
    assert open_index(path).add([Document("coffee", "Coffee is brewed from roasted coffee beans.", {})])["added"] == 1


def test_a_build_racing_another_build_does_not_overwrite_it(corpus, tmp_path, monkeypatch):
    from retro_peft.index import index as index_module

    path = tmp_path / "idx"
    real_embed = index_module._embed

    def embed_while_another_build_commits(encoder, chunks, *args, **kwargs):
        # Another process builds the same index while this one is embedding (after its existence check).
        if not (path / "manifest.json").exists():
            monkeypatch.setattr(index_module, "_embed", real_embed)
            build_index(path, [corpus / "more.jsonl"])
        return real_embed(encoder, chunks, *args, **kwargs)

    monkeypatch.setattr(index_module, "_embed", embed_while_another_build_commits)
    with pytest.raises(IndexFormatError, match="changed since it was opened"):
        build_index(path, [corpus / "docs"])
    assert sorted(open_index(path).doc_ids()) == ["glacier", "opera", "volcano"]


def test_unknown_filter_fields_match_nothing_and_are_not_cached(index):
    assert index.search("lava", k=5, filters={"no-such-field": "x"}) == []
    assert index.search("lava", k=5, filters={"topic": "geo", "other-field": ["a", "b"]}) == []
    assert set(index._filter_cache) == {"topic"}
    assert {h.doc_id for h in index.search("lava", k=5, filters={"topic": "geo"})} == {"volcano", "glacier"}


def test_reembed_switches_the_encoder_and_search_still_works(corpus, tmp_path, small_encoder_dir):
    import shutil

    from retro_peft.index import Encoder

    path = tmp_path / "re"
    index = build_index(path, [corpus / "docs", corpus / "more.jsonl"], IndexConfig(chunk_tokens=64, overlap=8))
    reader = open_index(path)  # e.g. a server holding generation 1
    before = reader.search("molten lava", k=3, mode="hybrid")
    shutil.copytree(path, tmp_path / "re-copy")
    tiny = Encoder(str(small_encoder_dir))
    stats = index.reembed(str(small_encoder_dir))
    assert stats["changed"] and stats["chunks"] == 5 and stats["generation"] == 2
    assert stats["previous_encoder"]["name"] == "minilm"

    reopened = open_index(path)  # verifies every checksum
    recorded = reopened.manifest["encoder"]
    assert recorded == {"name": str(small_encoder_dir.resolve()), "dim": 32, "fingerprint": tiny.fingerprint}
    assert reopened.encoder.fingerprint == tiny.fingerprint and reopened._vectors.shape == (5, 32)
    assert sorted(reopened.doc_ids()) == sorted(index.doc_ids())
    np.testing.assert_allclose(reopened._vectors, tiny.encode([c.text for c in reopened.chunks()]), atol=1e-5)
    assert len(reopened.search("molten lava", k=3, mode="dense")) == 3
    assert reopened.search("molten lava", k=1, mode="sparse")[0].doc_id == "volcano"
    assert reader.search("molten lava", k=3, mode="hybrid") == before  # the reader's generation, in memory
    # the old encoder is refused now, the new one accepted
    with pytest.raises(EncoderMismatchError, match="re-embed the index"):
        open_index(path, encoder="minilm")
    assert open_index(path, encoder=str(small_encoder_dir)).search("lava", k=1, mode="dense")
    # the embedding cache is per encoder fingerprint: a second index re-embedded with it embeds nothing
    assert open_index(tmp_path / "re-copy").reembed(tiny)["embedded"] == 0
    assert reopened.reembed(str(small_encoder_dir))["changed"] is False  # already its encoder: nothing written
    assert open_index(path).manifest["generation"] == 2
    files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    assert files == sorted(["manifest.json", *reopened.manifest["files"]])


def test_reembed_refuses_an_encoder_that_cannot_read_the_chunks(index, small_encoder_dir, tmp_path):
    # the fixture's chunks are 192 tokens; the tiny encoder reads 126
    with pytest.raises(InputError, match="exceed the encoder's limit"):
        index.reembed(str(small_encoder_dir))
    assert open_index(tmp_path / "idx").manifest["generation"] == 1


def test_contextual_chunks_index_the_title_and_show_the_chunk(tmp_path, small_encoder_dir):
    docs = [Document("zanzibar", "The island exports cloves and other spices to many countries.", {"title": "Zanzibar"}),
            Document("rhine", "The river flows north through Germany into the North Sea.", {"title": "Rhine"}),
            Document("notitle", "A document without any title field at all.", {})]
    plain = build_index(tmp_path / "plain", docs, IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=64, overlap=8))
    contextual = build_index(tmp_path / "ctx", docs, IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=64, overlap=8, context=("title",)))
    assert contextual.manifest["context"] == ["title"] and plain.manifest["context"] == []
    assert open_index(tmp_path / "ctx").info()["context"] == ["title"]
    # BM25 finds the chunk by its document's title only when the title is indexed with it
    assert plain.search("Zanzibar", k=1, mode="sparse") == [] or \
        plain.search("Zanzibar", k=1, mode="sparse")[0].doc_id != "zanzibar"
    hit = contextual.search("Zanzibar", k=1, mode="sparse")[0]
    assert hit.doc_id == "zanzibar" and hit.text == docs[0].text  # the chunk's own text, not the title
    # the dense vectors are the title + text's, and stay so through add() and reopening
    v = contextual.encoder.encode(["Zanzibar\nThe island exports cloves and other spices to many countries."])[0]
    row = next(i for i, c in enumerate(contextual.chunks()) if c.doc_id == "zanzibar")
    assert np.allclose(contextual._vectors[row], v, atol=1e-5)
    contextual.add([Document("tea", "Leaves of a shrub, brewed in hot water.", {"title": "Tea"})])
    reopened = open_index(tmp_path / "ctx")
    assert reopened.manifest["context"] == ["title"]
    assert reopened.search("Tea", k=1, mode="sparse")[0].doc_id == "tea"
    with pytest.raises(InputError, match="context must be a list"):
        build_index(tmp_path / "bad", docs, IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=64, overlap=8, context="title"))


def test_markdown_chunks_carry_their_heading_path_for_contextual_chunks(tmp_path, small_encoder_dir):
    from retro_peft.index.chunking import HEADINGS
    from retro_peft.index.index import indexed_texts

    page = tmp_path / "guide.md"
    filler = " ".join(["Words that fill the section so that it needs a chunk of its own here."] * 6)
    page.write_text(f"# Guide\n\nIntro. {filler}\n\n## Install\n\n### Linux\n\nRun apt. {filler}\n\n"
                    f"```sh\n# a comment, not a heading\n```\n\n## Usage\n\nCall it. {filler}\n")
    config = IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=48, overlap=0, context=(HEADINGS,))
    index = build_index(tmp_path / "md", [page], config)
    paths = {c.metadata[HEADINGS] for c in index.chunks()}
    assert {"Guide", "Guide > Install > Linux", "Guide > Usage"} <= paths
    assert not any("comment" in p for p in paths)  # a '#' line in a code fence is not a heading
    linux = next(c for c in index.chunks() if c.metadata[HEADINGS] == "Guide > Install > Linux")
    assert indexed_texts([linux], (HEADINGS,))[0].startswith("Guide > Install > Linux\n")
    # BM25 finds a chunk by a heading it sits under but does not contain
    later = [c for c in index.chunks() if c.metadata[HEADINGS] == "Guide > Install > Linux" and "Linux" not in c.text]
    assert later, "the section spans more than one chunk"
    hits = index.search("Install", k=10, mode="sparse")
    assert {h.chunk_id for h in hits} >= {c.id for c in later} and all("Install" in h.metadata[HEADINGS] + h.text for h in hits)
    # plain text files get no heading path (their '#' lines are text)
    (tmp_path / "notes.txt").write_text("# not markdown\nplain text")
    txt = build_index(tmp_path / "txt", [tmp_path / "notes.txt"], IndexConfig(encoder=str(small_encoder_dir), chunk_tokens=48, overlap=0))
    assert HEADINGS not in txt.chunks()[0].metadata


@pytest.mark.parametrize("user_value", [None, "true"])
def test_importing_bm25_keeps_jax_from_preallocating_the_gpu(user_value):
    # bm25s runs JAX at import when it is installed; JAX would then take 75% of a GPU in every process.
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    if user_value:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = user_value
    code = "import os, retro_peft.index.sparse; print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (user_value or "false")
