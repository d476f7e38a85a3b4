"""Retrieval evaluation: exact chunked k-NN, DML metrics, and their report table."""

from kdml.evaluation.episodes import few_shot_accuracy
from kdml.evaluation.knn import exact_knn
from kdml.evaluation.metrics import format_metrics_table, retrieval_metrics
from kdml.evaluation.rerank import rerank_metrics

__all__ = ["exact_knn", "few_shot_accuracy", "format_metrics_table", "rerank_metrics", "retrieval_metrics"]
