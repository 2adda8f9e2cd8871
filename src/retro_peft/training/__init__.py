"""Retrieval-augmented training data, the training loop and answer evaluation."""

from retro_peft.training.data import TrainingExample, build_examples, examples_sha256
from retro_peft.training.evaluate import EvalResult, evaluate, exact_match, score, token_f1
from retro_peft.training.trainer import TrainConfig, TrainResult, latest_checkpoint, train

__all__ = ["EvalResult", "TrainConfig", "TrainResult", "TrainingExample", "build_examples", "evaluate",
           "examples_sha256", "exact_match", "latest_checkpoint", "score", "token_f1", "train"]
