"""Retrieval evaluation: one-pass ranking, exact chunked k-NN, k-means, DML metrics, tables."""

from kdml.evaluation.clustering import kmeans
from kdml.evaluation.episodes import few_shot_accuracy
from kdml.evaluation.knn import exact_knn
from kdml.evaluation.metrics import format_metrics_table, retrieval_metrics
from kdml.evaluation.ranking import retrieval_ranking
from kdml.evaluation.rerank import rerank_metrics
from kdml.evaluation.threshold import calibrate_threshold
from kdml.evaluation.verification import verification_metrics

__all__ = ["calibrate_threshold", "exact_knn", "few_shot_accuracy", "format_metrics_table", "kmeans",
           "rerank_metrics",
           "retrieval_metrics", "retrieval_ranking", "verification_metrics"]
