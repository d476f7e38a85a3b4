"""Retrieval evaluation: exact chunked k-NN, DML metrics, and their report table."""

from kdml.evaluation.knn import exact_knn
from kdml.evaluation.metrics import format_metrics_table, retrieval_metrics

__all__ = ["exact_knn", "format_metrics_table", "retrieval_metrics"]
