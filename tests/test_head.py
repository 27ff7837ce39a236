"""The HEADS and MININGS registries, and short real trainings of triplet heads through ris-train."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ris.head import HEADS, MININGS, Head, Mining, mined_triplet_loss, training_loss

keras = pytest.importorskip("keras")


def _objects(n_obj: int, views: int, dim: int, seed: int, nuisance: float = 3.0):
    """Object centres plus a nuisance in 8 directions shared by every object: learnable from some
    objects, and it confuses raw retrieval (and a random head) on the others."""
    rng = np.random.default_rng(seed)
    axes = np.linalg.qr(rng.normal(size=(dim, 8)))[0]
    x = np.repeat(rng.normal(size=(n_obj, dim)), views, 0) + nuisance * rng.normal(size=(n_obj * views, 8)) @ axes.T \
        + 0.3 * rng.normal(size=(n_obj * views, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_obj), views)


def _write_db(path, x, lab):
    from ris.featuredb import FeatureWriter

    w = FeatureWriter(path, {"model": "synthetic", "pooling": "gap"}, (x.shape[1],), [f"o{i}" for i in range(lab.max() + 1)])
    w.add([f"{i:04d}.jpg" for i in range(len(x))], x / np.linalg.norm(x, axis=1, keepdims=True), [f"o{g}" for g in lab])
    w.finish({})
    return path


def test_every_triplet_head_builds_and_every_miner_gives_a_loss():
    from ris.head import build_embedding_head

    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    labels = np.repeat(np.arange(4), 2).astype(np.float32)
    for name, head in HEADS.items():
        assert head.trained in ("triplet", "fitted") and head.help
        if head.trained == "triplet":
            model = build_embedding_head((16,), hidden=(8,), out_dim=6, arch=name)
            assert model(x).shape[0] == 8
        else:
            with pytest.raises(ValueError, match="arch must be one of"):
                build_embedding_head((16,), arch=name)
    for name, mining in MININGS.items():
        out = np.concatenate([x, x[::-1], np.roll(x, 1, 0)], 1) if mining.triplet_inputs else x
        loss = keras.ops.convert_to_numpy(training_loss(name, 0.2, "euclidean")(labels, out))
        assert loss.shape == (8,) and np.isfinite(loss).all() and mining.help


def test_a_head_and_a_miner_are_one_entry_each(monkeypatch):
    """What a newcomer adds: a HEADS / MININGS entry (and its function). The builder, the loss and
    ris-train's --arch / --mining then offer it."""
    from ris.cli import train as train_cli
    from ris.head import build_embedding_head

    def linear_top(x, skip, out_dim):  # ignores the hidden layers: a linear map of the input
        return keras.layers.Dense(out_dim, name="linear")(skip)

    def hardest_negative(d, pos, neg, margin):  # the hardest negative against the mean positive
        mean_pos = keras.ops.sum(d * pos, axis=1) / keras.ops.maximum(keras.ops.sum(pos, axis=1), 1.0)
        return keras.ops.maximum(margin + mean_pos - keras.ops.min(d + 1e6 * (1.0 - neg), axis=1), 0.0)

    monkeypatch.setitem(HEADS, "linear", Head("one Dense layer", top=linear_top))
    monkeypatch.setitem(MININGS, "hardest-negative", Mining("hardest negative, mean positive", hardest_negative))
    model = build_embedding_head((16,), hidden=(8,), out_dim=5, arch="linear")
    assert model.get_layer("linear").kernel.shape == (16, 5)
    x = np.array([[0, 0], [1, 0], [0.5, 0], [5, 0]], np.float32)
    loss = keras.ops.convert_to_numpy(mined_triplet_loss(1.0, "euclidean", "hardest-negative")(np.array([0, 0, 1, 1.0]), x))
    np.testing.assert_allclose(loss, [1.0 + 1 - 0.5, 1.0 + 1 - 0.5, 1.0 + 4.5 - 0.5, 1.0 + 4.5 - 4], atol=1e-4)
    args = train_cli.build_parser().parse_args(["--arch", "linear", "--mining", "hardest-negative"])
    assert (args.arch, args.mining) == ("linear", "hardest-negative")


def test_unknown_head_or_miner_is_one_clear_error(tmp_path):
    from ris.errors import RisError
    from ris.train import TrainConfig, train_head

    db = _write_db(tmp_path / "f.h5", *_objects(10, 4, 8, 0))
    for cfg in (TrainConfig(arch="deep"), TrainConfig(arch="mlp", mining="hard")):
        with pytest.raises(RisError, match="heads: mlp, residual, whiten; minings: random"):
            train_head(db, tmp_path / "h.keras", cfg, progress=False, log=lambda s: None)


@pytest.mark.slow
@pytest.mark.parametrize("mining", ["random", "semi-hard"])
def test_ris_train_mlp_head_learns_what_a_random_head_does_not(tmp_path, capsys, mining):
    """The blog's head (--arch mlp) trained by ris-train for a few epochs, random triplets and
    semi-hard P x K mining: on held-out objects it beats the same network untrained, and raw."""
    from ris.cli import train as train_cli
    from ris.head import build_embedding_head
    from ris.metrics import evaluate_retrieval
    from ris.embed import embed_features
    from ris.modelio import load_model
    from ris.splits import make_split

    x, lab = _objects(100, 4, 32, 7)
    db = _write_db(tmp_path / "f.h5", x, lab)
    out = tmp_path / "h.keras"
    assert train_cli.main(["--features-db", str(db), "--output", str(out), "--arch", "mlp", "--mining", mining,
                           "--hidden", "64", "--out-dim", "32", "--epochs", "10", "--lr", "0.003", "--p", "8",
                           "--k", "4", "--batch-size", "32", "--quiet", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    _, meta = load_model(out)
    assert (meta["config"]["arch"], meta["config"]["mining"]) == ("mlp", mining)

    rows, _ = make_split(lab)  # ris-train's default split: the same test objects
    test = x[rows["test"]] / np.linalg.norm(x[rows["test"]], axis=1, keepdims=True)
    keras.utils.set_random_seed(0)
    untrained = build_embedding_head((32,), (64,), 32, arch="mlp")
    random_head = evaluate_retrieval(embed_features(untrained, test), lab[rows["test"]], "euclidean").ns_score
    assert scores["head"]["ns_score"] > random_head + 0.5, (scores, random_head)
    assert scores["head"]["ns_score"] > scores["raw"]["ns_score"] + 0.3
