"""retrieval_metrics on hand-worked examples and an independent NumPy reference."""

import math
import warnings

import numpy as np
import pytest

from kdml.evaluation import exact_knn, format_metrics_table, retrieval_metrics


def _on_circle(degrees):
    """Unit vectors at the given angles; 0, 90, 180, 270 degrees are exact axis vectors."""
    exact = {0: (1.0, 0.0), 90: (0.0, 1.0), 180: (-1.0, 0.0), 270: (0.0, -1.0)}
    rows = [
        exact.get(a, (math.cos(math.radians(a)), math.sin(math.radians(a)))) for a in degrees
    ]
    return np.array(rows, np.float32)


# Hand-worked example with ties and a different R per class.
#   item:   0    1    2    3     4     5
#   angle:  0°   30°  90°  100°  180°  270°
#   label:  0    0    1    0     1     2
# Class sizes 3, 2, 1 -> R = 2 for items 0, 1, 3; R = 1 for 2, 4; R = 0 for 5 (lone).
# Cosine ranks by angular distance. Ties (exactly 0 similarity between axis vectors)
# go to the lower index. Neighbours (distance) and match with the query's label:
#   q0 (0): 1(30)  2(90)  5(90)  3(100)  -> match 1 0 0 1
#   q1 (0): 0(30)  2(60)  3(70)  5(120)  -> match 1 0 1 0
#   q2 (1): 3(10)  1(60)  0(90)  4(90)   -> match 0 0 0 1
#   q3 (0): 2(10)  1(70)  4(80)  0(100)  -> match 0 1 0 1
#   q4 (1): 3(80)  2(90)  5(90)  1(150)  -> match 0 1 0 0   (tie 2 vs 5 decides recall@2)
#   q5 (2): 0(90)  4(90)  1(120) 3(170)  -> match 0 0 0 0
_TIES_ANGLES = [0, 30, 90, 100, 180, 270]
_TIES_LABELS = np.array([0, 0, 1, 0, 1, 2])
_TIES_NEIGHBOURS = [
    [1, 2, 5, 3],
    [0, 2, 3, 5],
    [3, 1, 0, 4],
    [2, 1, 4, 0],
    [3, 2, 5, 1],
    [0, 4, 1, 3],
]


def test_hand_example_neighbours():
    indices, _ = exact_knn(_on_circle(_TIES_ANGLES), k=4)
    assert indices.tolist() == _TIES_NEIGHBOURS


def test_hand_example_with_ties_and_unequal_r():
    with pytest.warns(UserWarning, match="1 of 6 queries"):
        got = retrieval_metrics(_on_circle(_TIES_ANGLES), _TIES_LABELS, ks=(1, 2, 4), nmi=False)
    assert set(got) == {"recall@1", "recall@2", "recall@4", "map@r", "r_precision"}
    assert all(isinstance(v, float) for v in got.values())
    # Recall over all 6 queries (the lone q5 is a miss):
    #   @1: q0, q1                -> 2/6
    #   @2: q0, q1, q3, q4        -> 4/6
    #   @4: q0, q1, q2, q3, q4    -> 5/6
    assert got["recall@1"] == pytest.approx(2 / 6, abs=1e-6)
    assert got["recall@2"] == pytest.approx(4 / 6, abs=1e-6)
    assert got["recall@4"] == pytest.approx(5 / 6, abs=1e-6)
    # MAP@R over the 5 queries with R > 0, AP@R = (1/R) sum_{i<=R} P@i rel_i:
    #   q0 R=2 [1 0] -> (1/1)/2 = 0.5     q1 R=2 [1 0] -> 0.5
    #   q2 R=1 [0]   -> 0                 q3 R=2 [0 1] -> (1/2)/2 = 0.25
    #   q4 R=1 [0]   -> 0                 mean = 1.25 / 5 = 0.25
    assert got["map@r"] == pytest.approx(0.25, abs=1e-6)
    # R-Precision: 1/2, 1/2, 0/1, 1/2, 0/1 -> 1.5 / 5 = 0.3
    assert got["r_precision"] == pytest.approx(0.3, abs=1e-6)


def test_perfect_separation_scores_one():
    # Three classes, each a pair 10° apart, pairs 120° apart: every metric is perfect.
    x = _on_circle([0, 10, 120, 130, 240, 250])
    got = retrieval_metrics(x, np.array([0, 0, 1, 1, 2, 2]), ks=(1, 2, 4))
    for name, value in got.items():
        assert value == pytest.approx(1.0, abs=1e-6), name


def test_nmi_perfect_clusters_and_label_permutation(rng):
    # 5 classes, 6 points each, tightly around orthogonal directions.
    labels = np.repeat(np.arange(5), 6)
    x = np.eye(8, dtype=np.float32)[labels] + 0.02 * rng.normal(size=(30, 8)).astype(np.float32)
    got = retrieval_metrics(x, labels, ks=(1, 5))
    assert got["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert got["recall@1"] == pytest.approx(1.0) and got["map@r"] == pytest.approx(1.0)
    # Renaming the classes (a permutation onto arbitrary ids) changes nothing.
    renamed = np.array([40, -3, 7, 1000, 5])[labels]
    assert retrieval_metrics(x, renamed, ks=(1, 5)) == got


def test_nmi_hand_computed():
    # Two tight clusters that k-means (k = 2 classes) recovers: A = 5 points around 0°,
    # B = 3 points around 90°. Labels: A = [0 0 0 0 1], B = [1 1 1] (classes 4 / 4).
    # Joint p(cluster, label): (A,0) = 4/8, (A,1) = 1/8, (B,0) = 0, (B,1) = 3/8.
    # With natural logs: H(Y) = ln 2; H(C) = -(5/8 ln 5/8 + 3/8 ln 3/8) = 0.661563;
    # MI = 1/2 ln(0.5 / (5/8 * 1/2)) + 1/8 ln(0.125 / (5/8 * 1/2)) + 3/8 ln 2 = 0.380396;
    # NMI (arithmetic mean) = MI / ((H(Y) + H(C)) / 2) = 0.561590 (geometric: 0.561738).
    x = _on_circle([-4, -2, 0, 2, 4, 88, 90, 92])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    h_labels = math.log(2)
    h_clusters = -(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8))
    mutual_info = (
        0.5 * math.log(0.5 / (5 / 16)) + 0.125 * math.log(0.125 / (5 / 16)) + 0.375 * math.log(2)
    )
    want = mutual_info / ((h_labels + h_clusters) / 2)
    assert want == pytest.approx(0.561590, abs=1e-6)
    got = retrieval_metrics(x, labels, ks=(1,))
    assert got["nmi"] == pytest.approx(want, abs=1e-9)


def _numpy_reference(x, labels, ks):
    """Independent float64 implementation: full matrix, stable sort, per-query loops."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    recall = {k: 0.0 for k in ks}
    ap, rp = [], []
    for i in range(len(labels)):
        rel = labels[order[i, : len(labels) - 1]] == labels[i]
        for k in ks:
            recall[k] += float(rel[:k].any()) / len(labels)
        r = int((labels == labels[i]).sum()) - 1
        if r == 0:
            continue
        hits, total = 0, 0.0
        for rank in range(1, r + 1):
            if rel[rank - 1]:
                hits += 1
                total += hits / rank
        ap.append(total / r)
        rp.append(rel[:r].sum() / r)
    return recall, float(np.mean(ap)), float(np.mean(rp))


def _clustered(rng):
    sizes = [2, 9, 5, 1, 7, 3, 12, 6, 4, 8]  # unequal R, one lone item
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.normal(size=(len(sizes), 16))
    x = centres[labels] + 1.1 * rng.normal(size=(labels.size, 16))
    perm = rng.permutation(labels.size)
    return x[perm].astype(np.float32), labels[perm]


def test_matches_numpy_reference_on_clustered_data(rng):
    x, labels = _clustered(rng)
    ks = (1, 2, 4, 8, 16)
    with pytest.warns(UserWarning, match="R = 0"):
        got = retrieval_metrics(x, labels, ks=ks, nmi=False, max_memory_bytes=4096)
    recall, map_at_r, r_precision = _numpy_reference(x, labels, ks)
    for k in ks:
        assert got[f"recall@{k}"] == pytest.approx(recall[k], abs=1e-6)
    assert got["map@r"] == pytest.approx(map_at_r, abs=1e-6)
    assert got["r_precision"] == pytest.approx(r_precision, abs=1e-6)
    # Not vacuous: the data is neither perfect nor random.
    assert 0.2 < got["map@r"] < 0.9 and got["map@r"] < got["r_precision"]


def test_preclipped_map_equals_tensorflow_similarity_clip_at_r(rng):
    # metrics.py zeroes the match mask beyond R and calls MapAtK(clip_at_r=False), because
    # clip_at_r=True loops eagerly per query. Both must give the same number.
    import tensorflow as tf
    from tensorflow_similarity.retrieval_metrics import MapAtK

    x, labels = _clustered(rng)
    keep = np.isin(labels, [0, 1, 2, 4, 5])  # no lone item, R from 1 to 8
    x, labels = x[keep], labels[keep]
    got = retrieval_metrics(x, labels, ks=(1,), nmi=False)
    r = {int(c): int((labels == c).sum()) - 1 for c in np.unique(labels)}
    k = max(r.values())
    indices, _ = exact_knn(x, k=k)
    match_mask = tf.constant(labels[indices] == labels[:, None])
    reference = MapAtK(r=r, clip_at_r=True, k=k).compute(
        query_labels=tf.constant(labels, tf.int64), match_mask=match_mask
    )
    assert got["map@r"] == pytest.approx(float(reference), abs=1e-6)


def test_all_lone_queries_give_nan():
    x = _on_circle([0, 90, 180])
    with pytest.warns(UserWarning, match="3 of 3 queries"):
        got = retrieval_metrics(x, np.array([0, 1, 2]), ks=(1,), nmi=False)
    assert got["recall@1"] == 0.0
    assert math.isnan(got["map@r"]) and math.isnan(got["r_precision"])


def test_no_warning_without_lone_queries():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrieval_metrics(
            _on_circle([0, 10, 120, 130]), np.array([0, 0, 1, 1]), ks=(1,), nmi=False
        )


@pytest.mark.parametrize(
    "embeddings, labels, ks, message",
    [
        (np.ones((4, 2), np.int32), [0, 0, 1, 1], (1,), "floating-point"),
        (np.ones(4, np.float32), [0, 0, 1, 1], (1,), "2-D"),
        (np.ones((4, 2), np.float32), [0.0, 0.0, 1.0, 1.0], (1,), "integer"),
        (np.ones((4, 2), np.float32), [[0, 0, 1, 1]], (1,), "1-D"),
        (np.ones((4, 2), np.float32), [0, 0, 1], (1,), "one label per embedding"),
        (np.ones((1, 2), np.float32), [0], (1,), "at least 2"),
        (np.ones((4, 2), np.float32), [0, 0, 1, 1], (1, 4), r"1 <= K < N = 4"),
        (np.ones((4, 2), np.float32), [0, 0, 1, 1], (0,), "ks=\\(0,\\)"),
        (np.ones((4, 2), np.float32), [0, 0, 1, 1], (), "at least one K"),
        (np.full((4, 2), np.nan, np.float32), [0, 0, 1, 1], (1,), "finite"),
    ],
)
def test_invalid_inputs_raise(embeddings, labels, ks, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(embeddings, np.asarray(labels), ks=ks, nmi=False)


def test_format_metrics_table():
    table = format_metrics_table(
        {
            "initial": {"recall@1": 0.123456, "map@r": 0.05, "nmi": float("nan")},
            "final": {"recall@1": 0.6543, "map@r": 0.3, "nmi": 0.7071, "epochs": 40},
        }
    )
    assert table == (
        "| result | recall@1 | map@r | nmi | epochs |\n"
        "|---|---:|---:|---:|---:|\n"
        "| initial | 12.35 | 5.00 | n/a | - |\n"
        "| final | 65.43 | 30.00 | 70.71 | 40 |"
    )
    with pytest.raises(ValueError, match="at least one row"):
        format_metrics_table({})


# --- Precision@K, AMI, query vs gallery ------------------------------------------------


def test_precision_at_k_hand_example_with_ties():
    # matches of the 4 nearest (see _TIES_NEIGHBOURS): q0 1001, q1 1010, q2 0001,
    # q3 0101, q4 0100 (decided by the 2-vs-5 tie), q5 0000.
    with pytest.warns(UserWarning):
        got = retrieval_metrics(_on_circle(_TIES_ANGLES), _TIES_LABELS, ks=(1,),
                                precision_ks=(1, 2, 4), nmi=False)
    assert got["precision@1"] == pytest.approx(2 / 6, abs=1e-6)
    assert got["precision@2"] == pytest.approx((1 + 1 + 0 + 1 + 1 + 0) / 12, abs=1e-6)
    assert got["precision@4"] == pytest.approx((2 + 2 + 1 + 2 + 1 + 0) / 24, abs=1e-6)


def test_precision_matches_numpy_reference(rng):
    x, labels = _clustered(rng)
    with pytest.warns(UserWarning):
        got = retrieval_metrics(x, labels, ks=(1,), precision_ks=(1, 3, 10), nmi=False)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    for k in (1, 3, 10):
        want = np.mean((labels[order[:, :k]] == labels[:, None]).sum(axis=1) / k)
        assert got[f"precision@{k}"] == pytest.approx(want, abs=1e-6)


def test_ami_and_nmi_equal_scikit_learn_on_the_known_clustering():
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    # the two tight clusters of test_nmi_hand_computed: k-means finds A = 5, B = 3 points
    x = _on_circle([-4, -2, 0, 2, 4, 88, 90, 92])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    clusters = [0, 0, 0, 0, 0, 1, 1, 1]
    got = retrieval_metrics(x, labels, ks=(1,), ami=True)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(labels, clusters), abs=1e-9)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-9)
    assert got["ami"] < got["nmi"]  # the chance correction lowers it
    only_ami = retrieval_metrics(x, labels, ks=(1,), nmi=False, ami=True)
    assert "nmi" not in only_ami and only_ami["ami"] == got["ami"]


def test_kmeans_scores_are_scikit_learn_scores_of_kdml_kmeans(rng):
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    from kdml.evaluation import kmeans
    from kdml.evaluation.metrics import kmeans_scores

    x = rng.normal(size=(60, 5)).astype(np.float32)
    labels = np.repeat(np.arange(6), 10)
    got, settings = kmeans_scores(x, labels, 6, seed=3, n_init=4, ami=True,
                                  return_settings=True)
    clusters, *_ = kmeans(x, 6, seed=3, n_init=4)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(labels, clusters), abs=1e-12)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert settings.startswith("k-means (TensorFlow Lloyd): 6 clusters, k-means++ init, seed 3, "
                               "4 restart(s), at most 10 iterations")
    with pytest.raises(ValueError, match="n_init"):
        kmeans_scores(x, labels, 6, n_init=0)


def test_nmi_auto_is_skipped_with_its_reason_when_kmeans_costs_more(monkeypatch):
    from kdml.evaluation import metrics

    # 20 classes of 2 among 40 items: (10 + 1) passes x 20 clusters = 5.5x the 40-item pass
    monkeypatch.setattr(metrics, "_AUTO_NMI_SMALL", 0)  # no "small anyway" exemption
    x = _on_circle(np.repeat(np.arange(0, 360, 18), 2) + np.tile([0, 3], 20))
    labels = np.repeat(np.arange(20), 2)
    with pytest.warns(UserWarning, match=r"nmi skipped: k-means with 20 clusters x 10 \+ 1 "
                                         r"iterations would cost 5\.5x the ranking pass"):
        got = retrieval_metrics(x, labels, ks=(1,))
    assert math.isnan(got["nmi"]) and "nmi=True" in got.notes["nmi"]
    assert got["recall@1"] == 1.0
    forced = retrieval_metrics(x, labels, ks=(1,), nmi=True)
    assert forced["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert "20 clusters" in forced.notes["nmi"] and "seed 0" in forced.notes["nmi"]
    assert "nmi" not in retrieval_metrics(x, labels, ks=(1,), nmi=False)
    with pytest.raises(ValueError, match="nmi='yes'"):
        retrieval_metrics(x, labels, ks=(1,), nmi="yes")


def test_table_columns_have_one_fixed_order():
    first = {"recall@1": 0.5, "recall@10": 0.9, "recall@2": 0.6, "precision@2": 0.4,
             "map@r": 0.3, "r_precision": 0.35, "nmi": 0.8, "epochs": 3}
    shuffled = {name: first[name] for name in
                ["nmi", "epochs", "map@r", "recall@10", "r_precision", "precision@2",
                 "recall@2", "recall@1"]}
    table = format_metrics_table({"final": first})
    assert table.splitlines()[0] == (
        "| result | recall@1 | recall@2 | recall@10 | precision@2 | map@r | r_precision | nmi "
        "| epochs |")
    assert format_metrics_table({"final": shuffled}) == table
    # a re-run whose dicts list the metrics in another order prints the same table
    assert format_metrics_table({"initial": shuffled, "final": first}) == format_metrics_table(
        {"initial": first, "final": shuffled})


# Query vs gallery (In-Shop style), by hand. Gallery on the circle:
#   gallery: 0°(l0) 40°(l0) 90°(l1) 180°(l2) 270°(l3)   classes 1, 2, 3 have ONE image
#   q0 10° l0: order 0 1 2 4 3 -> match 1 1 0 0 0, R=2: AP 1,  RP 1
#   q1 80° l1: order 2 1 0 3 4 -> match 1 0 0 0 0, R=1: AP 1,  RP 1
#   q2 200° l3: order 3 4 2 .. -> match 0 1 0 0 0, R=1: AP 0,  RP 0
#   q3 350° l4: no gallery image of class 4 (R = 0): a miss, left out of MAP@R / RP
_GALLERY = _on_circle([0, 40, 90, 180, 270])
_GALLERY_LABELS = np.array([0, 0, 1, 2, 3])
_QUERIES = _on_circle([10, 80, 200, 350])
_QUERY_LABELS = np.array([0, 1, 3, 4])


def test_query_vs_gallery_hand_example_with_single_image_classes():
    with pytest.warns(UserWarning, match="1 of 4 queries"):
        got = retrieval_metrics(_QUERIES, _QUERY_LABELS, ks=(1, 2), precision_ks=(2,),
                                nmi=False, gallery=_GALLERY, gallery_labels=_GALLERY_LABELS)
    assert got["recall@1"] == pytest.approx(2 / 4, abs=1e-6)
    assert got["recall@2"] == pytest.approx(3 / 4, abs=1e-6)
    assert got["precision@2"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4, abs=1e-6)
    assert got["map@r"] == pytest.approx(2 / 3, abs=1e-6)
    assert got["r_precision"] == pytest.approx(2 / 3, abs=1e-6)
    # a gallery K may reach the gallery size (no query is excluded)
    with pytest.warns(UserWarning):
        retrieval_metrics(_QUERIES, _QUERY_LABELS, ks=(5,), nmi=False, gallery=_GALLERY,
                          gallery_labels=_GALLERY_LABELS)


def test_query_equal_to_gallery_is_leave_one_out(rng):
    x, labels = _clustered(rng)
    with pytest.warns(UserWarning):
        loo = retrieval_metrics(x, labels, ks=(1, 4), precision_ks=(2,), nmi=False)
    with pytest.warns(UserWarning):
        same = retrieval_metrics(x, labels, ks=(1, 4), precision_ks=(2,), nmi=False,
                                 gallery=x.copy(), gallery_labels=labels.copy())
    assert same == loo
    # forced to keep itself, every query finds itself first
    kept = retrieval_metrics(x, labels, ks=(1,), nmi=False, gallery=x, gallery_labels=labels,
                             exclude_self=False)
    assert kept["recall@1"] == 1.0


def test_query_gallery_errors():
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(_QUERIES, _QUERY_LABELS, nmi=False, gallery=_GALLERY)
    with pytest.raises(ValueError, match="without `gallery`"):
        retrieval_metrics(_QUERIES, _QUERY_LABELS, nmi=False, gallery_labels=_GALLERY_LABELS)
    with pytest.raises(ValueError, match="same embedding dimension"):
        retrieval_metrics(_QUERIES, _QUERY_LABELS, nmi=False, gallery=np.ones((5, 3), np.float32),
                          gallery_labels=_GALLERY_LABELS)
    with pytest.raises(ValueError, match="exclude_self=True"):
        retrieval_metrics(_QUERIES, _QUERY_LABELS, nmi=False, gallery=_GALLERY,
                          gallery_labels=_GALLERY_LABELS, exclude_self=True)


def test_bfloat16_neighbour_lists_give_the_float32_metrics_on_separable_data(rng):
    centres = rng.normal(size=(12, 32))
    labels = np.repeat(np.arange(12), 5)
    x = (centres[labels] + 0.2 * rng.normal(size=(60, 32))).astype(np.float32)
    exact = retrieval_metrics(x, labels, ks=(1, 4, 30), precision_ks=(2,), nmi=False)
    fast = retrieval_metrics(x, labels, ks=(1, 4, 30), precision_ks=(2,), nmi=False,
                             knn_precision="bfloat16")
    assert fast == pytest.approx(exact, abs=1e-6)
    assert list(fast) == list(exact)
