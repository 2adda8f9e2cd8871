"""Stage 1: index documents for dense (FAISS/Qdrant), sparse (BM25) and hybrid retrieval."""

from retro_peft.index.chunking import Chunk, ChunkingConfig
from retro_peft.index.documents import Document, load_documents
from retro_peft.index.embedding import Encoder
from retro_peft.index.evaluation import evaluate_retrieval
from retro_peft.index.index import Hit, Index, IndexConfig, build_index, open_index
from retro_peft.index.rerank import CrossEncoderReranker, MaxSimReranker, Reranker

__all__ = [
    "Chunk", "ChunkingConfig", "CrossEncoderReranker", "Document", "Encoder", "Hit", "Index", "IndexConfig",
    "MaxSimReranker", "Reranker", "build_index", "evaluate_retrieval", "load_documents", "open_index",
]
