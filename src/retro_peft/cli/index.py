"""`retro-peft index build|add|delete|reembed|query|info|eval`."""

from __future__ import annotations

import json
import sys

from retro_peft.choices import SEARCH_MODES
from retro_peft.cli import add_progress_argument, show_progress
from retro_peft.errors import InputError
from retro_peft.index import IndexConfig, MaxSimReranker, build_index, evaluate_retrieval, open_index
from retro_peft.qa import load_qa


def register(sub) -> None:
    index = sub.add_parser("index", help="build, update, query and evaluate document indexes")
    cmds = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    p = cmds.add_parser("build", help="build an index from files, folders, JSONL or SQuAD JSON")
    p.add_argument("name", help="index name (under $RETRO_PEFT_HOME/indexes) or a path")
    p.add_argument("inputs", nargs="+", help=".txt/.md files or folders, .jsonl, SQuAD .json")
    p.add_argument("--backend", default="faiss", help="dense backend: faiss (default) or qdrant")
    p.add_argument("--chunk-tokens", type=int, default=IndexConfig.chunk_tokens)
    p.add_argument("--overlap", type=int, default=IndexConfig.overlap)
    p.add_argument("--encoder", default=IndexConfig.encoder, help="minilm (packaged), a local folder or a HF id")
    p.add_argument("--qdrant-url", help="Qdrant server URL (default: embedded Qdrant in the index folder)")
    p.add_argument("--ann-threshold", type=int, default=IndexConfig.ann_threshold,
                   help="FAISS: exact search below this many chunks, HNSW above")
    p.add_argument("--context", metavar="FIELD,...",
                   help="contextual chunks: put these metadata fields (e.g. title; headings: a Markdown chunk's heading "
                        "path) before each chunk's text in what is embedded and BM25-indexed (hits still show the "
                        "chunk's own text)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing index")
    add_progress_argument(p)
    p.set_defaults(func=_build)

    p = cmds.add_parser("add", help="add or update documents")
    p.add_argument("name")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--encoder", help="fail unless the index was built with this encoder")
    add_progress_argument(p)
    p.set_defaults(func=_add)

    p = cmds.add_parser("delete", help="delete documents by id")
    p.add_argument("name")
    p.add_argument("--doc-id", action="append", required=True, help="document id (repeatable)")
    p.set_defaults(func=_delete)

    p = cmds.add_parser("reembed", help="embed every chunk again with another encoder (e.g. a trained one)")
    p.add_argument("name")
    p.add_argument("--encoder", required=True,
                   help="the new encoder: a folder (`retro-peft train-retriever --out`), minilm or a HF id")
    add_progress_argument(p)
    p.set_defaults(func=_reembed)

    p = cmds.add_parser("query", help="search an index")
    p.add_argument("name")
    p.add_argument("text")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--mode", choices=SEARCH_MODES, default="hybrid")
    p.add_argument("--fusion", choices=("weighted", "rrf"), default="weighted",
                   help="hybrid fusion: weighted min-max scores (default) or reciprocal rank fusion")
    p.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE", help="metadata filter (repeatable)")
    p.add_argument("--rerank", action="store_true", help="re-score candidates with the MaxSim reranker")
    p.add_argument("--encoder", help="fail unless the index was built with this encoder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_query)

    p = cmds.add_parser("info", help="show an index's manifest")
    p.add_argument("name")
    p.set_defaults(func=_info)

    p = cmds.add_parser("eval", help="retrieval quality on a QA file (recall@1/5/10, MRR@10, nDCG@10)")
    p.add_argument("name")
    p.add_argument("--qa", required=True, help="JSONL (question, answers, gold_doc_ids) or SQuAD JSON")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)


def _build(args) -> int:
    config = IndexConfig(encoder=args.encoder, chunk_tokens=args.chunk_tokens, overlap=args.overlap,
                         backend=args.backend, qdrant_url=args.qdrant_url, ann_threshold=args.ann_threshold,
                         context=tuple(f.strip() for f in args.context.split(",")) if args.context else ())
    index = build_index(args.name, args.inputs, config, overwrite=args.overwrite, progress=show_progress(args))
    counts = index.manifest["counts"]
    print(f"built {index.path}: {counts['documents']} documents, {counts['chunks']} chunks "
          f"({index.manifest['dense']['backend']}/{index.manifest['dense']['kind']})")
    return 0


def _add(args) -> int:
    stats = open_index(args.name, encoder=args.encoder).add(args.inputs, progress=show_progress(args))
    print(f"added {stats['added']}, replaced {stats['replaced']}, unchanged {stats['unchanged']} documents")
    return 0


def _delete(args) -> int:
    removed = open_index(args.name).delete(args.doc_id)
    print(f"deleted {len(set(args.doc_id))} documents ({removed} chunks)")
    return 0


def _reembed(args) -> int:
    index = open_index(args.name)
    stats = index.reembed(args.encoder, progress=show_progress(args))
    if not stats["changed"]:
        print(f"{index.path} already uses this encoder ({stats['encoder']['name']}); nothing written")
        return 0
    print(f"re-embedded {stats['chunks']} chunks of {index.path} with {stats['encoder']['name']} "
          f"({stats['embedded']} embedded, {stats['chunks'] - stats['embedded']} from the cache): "
          f"generation {stats['generation']}")
    return 0


def _parse_filters(items: list[str]) -> dict[str, str]:
    filters = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise InputError(f"bad filter {item!r}: expected FIELD=VALUE")
        filters[field] = value
    return filters


def _query(args) -> int:
    index = open_index(args.name, encoder=args.encoder)
    rerank = MaxSimReranker(index.encoder) if args.rerank else None
    hits = index.search(args.text, k=args.k, mode=args.mode, filters=_parse_filters(args.filter),
                        fusion=args.fusion, rerank=rerank)
    if args.json:
        json.dump([h.to_dict() for h in hits], sys.stdout, ensure_ascii=False)
        print()
        return 0
    for rank, h in enumerate(hits, start=1):
        title = f" [{h.title}]" if h.title else ""
        print(f"{rank:2d}. {h.score:.4f}  {h.chunk_id}{title}\n    {h.text[:200].replace(chr(10), ' ')}")
    if not hits:
        print("no results")
    return 0


def _info(args) -> int:
    print(json.dumps(open_index(args.name, verify=False).info(), indent=2))
    return 0


def _eval(args) -> int:
    report = evaluate_retrieval(open_index(args.name), load_qa(args.qa))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'mode':8s} " + " ".join(f"{m:>9s}" for m in report["dense"]) + f"   (n={report['n']})")
    for mode in SEARCH_MODES:
        print(f"{mode:8s} " + " ".join(f"{v:9.4f}" for v in report[mode].values()))
    return 0
