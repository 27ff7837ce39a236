"""Re-ranking (QE, DBA, diffusion, k-reciprocal) on data whose answers are known."""
import time
import tracemalloc

import numpy as np
import pytest

from ris.evaluate import evaluate_reranked
from ris.metrics import evaluate_retrieval
from ris.rerank import RERANKERS, Reranker, alpha_dba, alpha_qe, diffuse, diffusion_graph, neighbours_without_self, rerank
from ris.topk import l2_normalize, pairwise_distances



def chains(classes=30, m=12, dim=32, step=0.35, seed=0):
    """Each class is a curved random walk on the sphere: its ends are farther apart than other
    classes' points, so plain kNN errs and methods that follow the manifold recover."""
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(classes):
        p = rng.normal(size=dim)
        d = rng.normal(size=dim)
        p, d = p / np.linalg.norm(p), d / np.linalg.norm(d)
        for _ in range(m):
            pts.append(p.copy())
            d = d + 0.5 * rng.normal(size=dim) / np.sqrt(dim)
            d /= np.linalg.norm(d)
            p = p + step * d
            p /= np.linalg.norm(p)
    return np.array(pts, np.float32), np.repeat(np.arange(classes), m)


def bridged_pairs(pairs=6, seed=0):
    """Pairs of groups on the unit sphere, each pair in its own plane (angle 0.1 x position):
    group A at positions -0.05..0.15, group B at 2.9..3.1 plus one member ``b`` at 1.75, and a
    query of A at 1.0. Plain kNN puts ``b`` first (0.75 away, A's nearest is 0.85) for every
    query; A outnumbers ``b`` among the query's neighbours, and ``b`` belongs to B's graph."""
    rng = np.random.default_rng(seed)
    dim = 2 * pairs
    x, y, q = [], [], []
    for j in range(pairs):
        base, axis = np.eye(dim)[2 * j], np.eye(dim)[2 * j + 1]
        for group, positions in ((2 * j, (-0.05, 0.0, 0.05, 0.1, 0.15)), (2 * j + 1, (1.75, 2.9, 2.95, 3.0, 3.05, 3.1))):
            x += [np.cos(0.1 * t) * base + np.sin(0.1 * t) * axis for t in positions]
            y += [group] * len(positions)
        q.append(np.cos(0.1) * base + np.sin(0.1) * axis)
    x = np.array(x) + 0.001 * rng.normal(size=(len(x), dim))
    q = np.array(q) + 0.001 * rng.normal(size=(len(q), dim))
    return x.astype(np.float32), np.array(y), q.astype(np.float32), 2 * np.arange(pairs)


def blobs(classes=50, m=8, dim=16, spread=0.7, seed=0):
    """Noisy Gaussian classes: a query's own noise misleads it, its neighbours' average less."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), m)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    return centers[labels] + spread * rng.normal(size=(len(labels), dim)).astype(np.float32), labels


# --- method="none" is the plain evaluation -------------------------------------------------------

@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_none_reproduces_evaluate_retrieval(metric):
    x, y = blobs(classes=40, m=4, spread=1.0)
    x = x * np.random.default_rng(1).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)  # not normalised
    y = y.copy()
    y[::17] = -1  # unlabelled rows are left out by both
    for kw in ({}, {"recall_ks": (1, 2, 5), "precision_ks": (3, 10)}):
        assert evaluate_reranked(x, y, "none", metric, **kw) == evaluate_retrieval(x, y, metric, **kw)
    subset = np.arange(3, len(y), 5)  # only some rows query (all rows are the database)
    assert (evaluate_reranked(x, y, "none", metric, query_rows=subset)
            == evaluate_retrieval(x, y, metric, query_rows=subset))
    xl, yl = blobs(classes=3, m=80, spread=1.5)  # large groups: evaluate_retrieval's sorting AP path
    assert evaluate_reranked(xl, yl, "none", metric, block=50) == evaluate_retrieval(xl, yl, metric)


# --- the methods fix what plain kNN gets wrong ----------------------------------------------------

def test_manifold_methods_fix_knn_errors_on_curved_classes():
    x, y = chains()
    m = {method: evaluate_reranked(x, y, method).map for method in RERANKERS}
    assert m["none"] < 0.93
    assert m["diffusion"] > m["none"] + 0.05
    assert m["kreciprocal"] > m["none"] + 0.05
    assert m["qe"] > m["none"] and m["dba+qe"] > m["qe"]


# Each method's own parameters where its defaults do not fit six-image groups: QE needs the
# query's 3 neighbours (2 of A outvote b; with 2 it is a tie), diffusion a graph and seed of 3
# (its default 50 links every image of a pair).
FIX_PARAMS = {"qe": {"n": 3}, "dba+qe": {}, "diffusion": {"graph_k": 3, "query_k": 3}, "kreciprocal": {}}


@pytest.mark.parametrize("method", sorted(FIX_PARAMS))
def test_reranking_recovers_the_group_when_the_nearest_neighbour_is_wrong(method):
    x, y, q, qy = bridged_pairs()
    _, plain = rerank(q, x, "none", k=1)
    assert (y[plain[:, 0]] != qy).all()  # by construction: plain ranking puts b first for every query
    _, i = rerank(q, x, method, k=3, **FIX_PARAMS[method])
    assert (y[i[:, 0]] == qy).all()


def test_every_reranker_is_covered():
    assert set(FIX_PARAMS) == set(RERANKERS) - {"none"}


def test_query_expansion_fixes_noisy_queries():
    x, y = blobs()
    none, qe, dba = (evaluate_reranked(x, y, method) for method in ("none", "qe", "dba+qe"))
    assert qe.map > none.map + 0.05 and qe.ns_score > none.ns_score
    assert dba.map > qe.map


# --- API contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(RERANKERS))
def test_output_is_k_columns_sorted_best_first(method):
    x, _ = blobs(classes=20, m=5)
    q = x[:9] + 0.05
    d, i = rerank(q, x, method, k=7)
    assert d.shape == i.shape == (9, 7) and d.dtype == np.float32 and i.dtype == np.int64
    assert np.all(np.diff(d, axis=1) >= 0)
    assert all(len(set(row)) == 7 for row in i.tolist()) and i.min() >= 0 and i.max() < len(x)
    d_all, i_all = rerank(q, x, method, k=10_000)  # k is clipped to the database
    assert i_all.shape == (9, len(x)) and np.array_equal(i_all[:, :7], i)
    rows = np.arange(9)
    _, i_own = rerank(x[:9], x, method, k=len(x), query_rows=rows)  # the query's own row left out
    assert i_own.shape == (9, len(x) - 1) and not (i_own == rows[:, None]).any()
    assert (method == "none") == np.array_equal(i, rerank(q, x, "none", k=7)[1])  # re-ranking re-ranks


@pytest.mark.parametrize("method", list(RERANKERS))
def test_out_of_database_query_finds_its_source_and_class(method):
    x, y = blobs(classes=30, m=6, spread=0.3)
    src = np.arange(0, len(x), 7)
    q = x[src] + 0.02 * np.random.default_rng(3).normal(size=(len(src), x.shape[1])).astype(np.float32)
    _, i = rerank(q, x, method, k=6)
    # diffusion ranks by accumulated graph mass: a central class mate may outrank the seed itself
    first = (i[:, :3] == src[:, None]).any(1) if method == "diffusion" else i[:, 0] == src
    assert first.all()
    assert (y[i] == y[src, None]).mean() > 0.9
    assert (method == "none") == np.array_equal(i, rerank(q, x, "none", k=6)[1])


def test_a_reranker_is_one_entry_in_the_registry(monkeypatch):
    """What a newcomer adds: a Method subclass and its RERANKERS entry. Nothing else is needed for
    rerank, evaluate_reranked and the CLIs' --rerank to use it."""
    from ris.cli import eval as eval_cli
    from ris.rerank import Method

    class Farthest(Method):  # a deliberately bad method whose effect is easy to see
        defaults = {"scale": 1.0}
        help = "farthest first"

        def scores(self, q, rows):
            return -self.p["scale"] * pairwise_distances(q, self.db, self.metric)

    monkeypatch.setitem(RERANKERS, "farthest", Farthest)
    x, y = blobs(classes=10, m=4)
    _, plain = rerank(x[:5], x, "none", k=len(x))
    _, far = rerank(x[:5], x, "farthest", k=len(x), scale=2.0)
    assert np.array_equal(far[:, 0], plain[:, -1])
    assert evaluate_reranked(x, y, "farthest").map < 0.5 * evaluate_reranked(x, y, "none").map
    assert eval_cli.build_parser().parse_args(["--rerank", "farthest"]).rerank == "farthest"


def test_unknown_method_or_parameter_is_refused():
    x, _ = blobs(classes=5, m=4)
    with pytest.raises(ValueError, match="method"):
        rerank(x, x, "magic", k=3)
    with pytest.raises(ValueError, match="graph_k"):
        rerank(x, x, "diffusion", k=3, k1=5)
    with pytest.raises(ValueError, match="depth"):
        evaluate_reranked(x, np.repeat(np.arange(5), 4), "qe", depth=3)


def test_truncated_depth_gives_a_lower_bound_on_map():
    x, y = blobs(classes=4, m=30, spread=1.2)
    full, short = evaluate_reranked(x, y, "qe"), evaluate_reranked(x, y, "qe", depth=20)
    assert short.map < full.map and short.ns_score == full.ns_score
    assert full.map != evaluate_reranked(x, y, "none").map
    assert short.precision_at == full.precision_at


# --- the building blocks against direct computation -----------------------------------------------

def test_alpha_qe_and_alpha_dba_follow_the_formula():
    rng = np.random.default_rng(0)
    db = l2_normalize(rng.normal(size=(30, 8)))
    q = l2_normalize(rng.normal(size=(2, 8)))
    nbr = np.array([[3, 7, 1], [5, 0, 2]])
    out = alpha_qe(q, db, nbr, n=2, alpha=3.0)
    for j in range(2):
        w = np.maximum(db[nbr[j, :2]] @ q[j], 0) ** 3
        want = q[j] + w @ db[nbr[j, :2]]
        np.testing.assert_allclose(out[j], want / np.linalg.norm(want), atol=1e-6)
    np.testing.assert_allclose(alpha_qe(q, db, nbr, n=0), q, atol=1e-6)
    idx, sim = neighbours_without_self(db, 2)
    assert not (idx == np.arange(30)[:, None]).any()
    aug = alpha_dba(db, idx, sim, n=2, alpha=3.0)
    want = db[4] + (np.maximum(sim[4], 0) ** 3) @ db[idx[4]]
    np.testing.assert_allclose(aug[4], want / np.linalg.norm(want), atol=1e-6)


def test_diffusion_solves_the_linear_system_on_a_mutual_knn_graph():
    x, _ = chains(classes=6, m=10)
    s = diffusion_graph(x, k=5, gamma=3.0)
    dense = s.toarray()
    assert np.allclose(dense, dense.T) and (dense >= 0).all() and np.all(np.diag(dense) == 0)
    assert np.all((dense > 0).sum(1) <= 5)  # mutual neighbours only: at most k per row
    assert np.abs(np.linalg.eigvalsh(dense)).max() <= 1 + 1e-5
    y = np.zeros((len(x), 3), np.float32)
    y[[0, 11, 40], [0, 1, 2]] = 1.0
    f = diffuse(s, y, alpha=0.9, iters=500, tol=1e-10)
    np.testing.assert_allclose(f, np.linalg.solve(np.eye(len(x)) - 0.9 * dense, y), rtol=1e-3, atol=1e-5)
    # end to end: the ranking is the order of the exact solution for the query's kNN seed
    params = dict(graph_k=5, query_k=3, alpha=0.9, iters=500, tol=1e-10)
    _, i = rerank(x[:1] + 0.01, x, "diffusion", k=10, **params)
    sim = (l2_normalize(x[:1] + 0.01) @ l2_normalize(x).T)[0]
    seed = np.zeros(len(x))
    top = np.argsort(-sim)[:3]
    seed[top] = sim[top] ** 3
    exact = np.linalg.solve(np.eye(len(x)) - 0.9 * dense, seed)
    assert np.array_equal(i[0], np.argsort(-exact, kind="stable")[:10])


def _kreciprocal_dense(x, k1, k2, lam):
    """Zhong et al.'s re-ranking on the full matrix, every row both probe and gallery."""
    d = pairwise_distances(x, x, "euclidean") ** 2
    d = d / d.max(axis=1, keepdims=True)
    n = len(x)
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        fwd = rank[i, : k + 1]
        return fwd[(rank[fwd, : k + 1] == i).any(axis=1)]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = [r]
        for c in r:
            rc = reciprocal(c, int(round(k1 / 2)))
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expanded.append(rc)
        e = np.unique(np.concatenate(expanded))
        w = np.exp(-d[i, e])
        v[i, e] = w / w.sum()
    v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    smin = np.minimum(v[:, None, :], v[None, :, :]).sum(axis=2)
    return (1 - lam) * (1 - smin / (2 - smin)) + lam * d


def test_kreciprocal_out_of_database_query_is_close_to_inserting_it():
    x, _ = blobs(classes=25, m=8, spread=0.8)
    src = np.arange(0, len(x), 9)
    q = x[src] + 0.01 * np.random.default_rng(5).normal(size=(len(src), x.shape[1])).astype(np.float32)
    d, i = rerank(q, x, "kreciprocal", k=10, k1=8, k2=3)
    errors = []
    for j in range(len(src)):
        ref = _kreciprocal_dense(np.vstack([x, q[j : j + 1]]), k1=8, k2=3, lam=0.3)[-1, :-1]
        want = np.argsort(ref, kind="stable")[:10]
        assert i[j, 0] == want[0] == src[j]
        assert len(set(i[j]) & set(want)) >= 8
        errors.append(np.abs(d[j] - ref[i[j]]).max())
    assert np.median(errors) < 0.08  # approximate: other rows' reciprocal sets are not updated


def test_kreciprocal_matches_the_full_matrix_algorithm_in_closed_set():
    x, _ = blobs(classes=12, m=8, spread=0.8)
    ref = _kreciprocal_dense(x, k1=8, k2=3, lam=0.3)
    rows = np.arange(len(x))
    d, i = rerank(x, x, "kreciprocal", k=len(x), query_rows=rows, k1=8, k2=3, lam=0.3)
    np.testing.assert_allclose(d, np.take_along_axis(ref, i, 1), atol=2e-5)


# --- bounded memory -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, n, dim, params", [
    ("diffusion", 20_000, 32, {"graph_k": 10, "query_k": 5}),  # dba+qe shares its kNN graph code
    ("kreciprocal", 5_000, 16, {"k1": 6, "k2": 3}),  # the slowest build; same O(N k) structures
])
def test_memory_stays_far_below_n_by_n(method, n, dim, params):
    """Offline graphs are O(N k) and query blocks O(b N): peak memory is a small fraction of one
    N x N float32 matrix (1.6 GB at 20k)."""
    x, y = blobs(classes=n // 10, m=10, dim=dim, spread=0.3)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        r = Reranker(x, method, **params)
        _, i = r.search(x[:50] + 0.01, 10)
        _, i_own = r.search(x[50:80], 10, query_rows=np.arange(50, 80))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.1 * n * n * 4 + 16 * 2**20
    assert (i[:, :3] == np.arange(50)[:, None]).any(1).all() and (y[i[:, :5]] == y[:50, None]).mean() > 0.9
    assert i_own.shape == (30, 10) and not (i_own == np.arange(50, 80)[:, None]).any()
    assert not np.array_equal(i, Reranker(x, "none").search(x[:50] + 0.01, 10)[1])
    assert time.perf_counter() - t < 60
