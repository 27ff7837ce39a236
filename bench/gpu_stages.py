"""The measuring stages of bench/gpu_extract.py, one function each; ``Run`` carries what they share
(settings, the result dict, its ``save`` and ``stage`` gates). Keras, JAX and ris are imported
inside the functions: decode workers are spawned and import the script's modules again."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Run:
    args: Any
    profile: dict
    res: dict
    work: Path
    size: int
    batch: int
    workers: int
    dtypes: list[str]
    decode_modes: list[str]
    acc_models: list[str]
    backend: str
    save: Callable[[], None]
    stage: Callable[[str], bool]
    log: Callable[[str], None]
    data: Path = Path(".")
    files: list[str] = field(default_factory=list)
    acc_feats: dict = field(default_factory=dict)  # (model, dtype) -> (ids, features, labels)


def block(x):
    """Wait for an (asynchronous) device result."""
    if hasattr(x, "block_until_ready"):
        return x.block_until_ready()
    import numpy as np

    return np.asarray(x)


def conv_flops(trunk, size: int) -> float:
    """FLOPs (2 x multiply-adds) of the trunk's conv layers for one size x size image; 0 if unknown."""
    import keras

    convs = [l for l in trunk.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    if not convs:
        return 0.0
    try:
        probe = keras.Model(trunk.inputs, [l.output for l in convs])
        shapes = probe.compute_output_spec(keras.KerasTensor((1, size, size, 3)))
    except Exception:
        return 0.0
    total = 0.0
    for layer, spec in zip(convs, shapes):
        h, w = spec.shape[1], spec.shape[2]
        k = layer.kernel.shape  # (kh, kw, cin, cout) or depthwise (kh, kw, cin, multiplier)
        groups = 1 if isinstance(layer, keras.layers.DepthwiseConv2D) else max(getattr(layer, "groups", 1), 1)
        total += 2.0 * h * w * k[0] * k[1] * k[2] * k[3] / groups
    return total


def decode_only(run: Run) -> None:
    """2. Decode-only throughput of the input pipeline, per decode mode."""
    from ris.decoding import iter_decoded

    for mode in run.decode_modes:
        warm = run.files[: 2 * run.workers]
        t = time.perf_counter()
        for _ in iter_decoded(run.data, warm, run.size, run.workers, prefetch=4 * run.batch, processes=mode == "processes"):
            pass
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        got = 0
        for _, img, err in iter_decoded(run.data, run.files, run.size, run.workers, prefetch=4 * run.batch,
                                        processes=mode == "processes"):
            got += img is not None
        dt = time.perf_counter() - t
        row = {"mode": mode, "workers": run.workers, "images": got, "img_s": round(got / dt, 1),
               "pool_start_s": round(start_s, 2)}
        run.res["decode_only"].append(row)
        run.log(f"decode {row}")
        run.save()


def labelled_set(run: Run) -> Path:
    """The accuracy stage's labelled UKBench-style set, made once in the work folder."""
    acc_data = run.work / "labelled"
    if not (acc_data / "groundtruth.tsv").exists():
        try:
            from ris.demo_data import make_demo_dataset

            make_demo_dataset(acc_data, n_objects=None if not run.args.cpu_smoke else 10)
            run.res["accuracy_data"] = "ris.demo_data (scikit-image photos, 4 views each, 640x480)"
        except Exception as exc:  # scikit-image missing: synthetic shapes
            from ris.testing import make_tiny_dataset

            make_tiny_dataset(acc_data, n_objects=40, views=4, size=256, seed=run.args.seed)
            run.res["accuracy_data"] = f"ris.testing.make_tiny_dataset 40x4 at 256 px ({type(exc).__name__})"
    return acc_data


def extract_labelled(run: Run, ext, model_name: str, dtype: str) -> None:
    """5. Features of the labelled set with ``ext``, kept in ``run.acc_feats`` for ``compare``."""
    from ris.extract import ExtractOptions, extract_features
    from ris.featuredb import FeatureDB

    out = run.work / f"acc_{model_name}_{dtype}.h5"
    out.unlink(missing_ok=True)
    extract_features(labelled_set(run), out, ext.config,
                     ExtractOptions(labels="auto", batch_size=run.batch, workers=run.workers, progress=False),
                     extractor=ext)
    with FeatureDB(out) as db:
        run.acc_feats[(model_name, dtype)] = (db.image_ids, db.features[:], db.labels)
    out.unlink()


def build_extractor(run: Run, model_name: str, weights: str, dtype: str):
    """(extractor, build seconds, first-batch seconds = compile); the same seeded random weights
    for float32 and bfloat16."""
    import keras
    import numpy as np

    from ris.extractor import ExtractConfig, FeatureExtractor

    keras.utils.set_random_seed(run.args.seed)
    t = time.perf_counter()
    ext = FeatureExtractor(ExtractConfig(model=model_name, weights=weights, input_size=run.size,
                                         pooling="gap", dtype=dtype))
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    ext.embed_async(np.zeros((run.batch, run.size, run.size, 3), np.uint8), pad_to=run.batch)()
    return ext, t_build, time.perf_counter() - t


def trunk_only(run: Run, fwd, dtype: str, flops: float) -> None:
    """3. The compiled forward pass alone on device-resident uint8 batches, per batch size."""
    import numpy as np

    variants = [(b, "default") for b in run.profile["trunk_batches"]]
    if run.profile["highest"] and run.backend == "jax" and dtype == "float32":
        variants.append((run.batch, "highest"))
    iters = run.profile["iters"]
    for b, precision in variants:
        rng = np.random.default_rng(run.args.seed)
        host = [rng.integers(0, 256, (b, run.size, run.size, 3), dtype=np.uint8) for _ in range(3)]
        if run.backend == "jax":
            import jax

            dev = [jax.device_put(x) for x in host]
            ctx = jax.default_matmul_precision(precision) if precision != "default" else None
        elif run.backend == "tensorflow":
            import tensorflow as tf

            dev, ctx = [tf.constant(x) for x in host], None
        else:
            dev, ctx = host, None
        if ctx is not None:
            ctx.__enter__()
        try:
            t = time.perf_counter()
            block(fwd(dev[0]))
            t_first = time.perf_counter() - t
            for i in range(2):
                block(fwd(dev[i % 3]))
            t = time.perf_counter()
            outs = [fwd(dev[i % 3]) for i in range(iters)]
            for o in outs:
                block(o)
            dt = time.perf_counter() - t
            finite = bool(np.isfinite(np.asarray(outs[-1], np.float32)).all())
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        ips = iters * b / dt
        row = {"dtype": dtype, "precision": precision, "batch": b, "iters": iters,
               "img_s": round(ips, 1), "ms_per_batch": round(dt / iters * 1e3, 2),
               "tflop_s": round(ips * flops / 1e12, 1), "first_call_s": round(t_first, 2), "finite": finite}
        run.res["trunk"].append(row)
        run.log(f"trunk {row}")
        run.save()


def end_to_end(run: Run, ext, dtype: str) -> None:
    """4. JPEG files -> HDF5 with ``extract_features``, per decode mode, with the main thread's time
    split into dispatch, waiting for results and HDF5 writes."""
    import numpy as np

    from ris.decoding import iter_decoded
    from ris.extract import ExtractOptions, extract_features
    from ris.featuredb import FeatureDB, FeatureWriter

    for mode in run.decode_modes:
        timers = {"dispatch": 0.0, "wait": 0.0, "write": 0.0}
        real_async, real_add = ext.embed_async, FeatureWriter.add

        def timed_async(images, pad_to=None, _f=real_async):
            t = time.perf_counter()
            finish = _f(images, pad_to=pad_to)
            timers["dispatch"] += time.perf_counter() - t

            def result():
                t2 = time.perf_counter()
                r = finish()
                timers["wait"] += time.perf_counter() - t2
                return r
            return result

        def timed_add(self, *a, _f=real_add, **k):
            t = time.perf_counter()
            r = _f(self, *a, **k)
            timers["write"] += time.perf_counter() - t
            return r

        out = run.work / f"e2e_{dtype}_{mode}.h5"
        out.unlink(missing_ok=True)
        if mode == "processes":  # start the worker pool outside the timed run
            for _ in iter_decoded(run.data, run.files[: 2 * run.workers], run.size, run.workers, 4 * run.batch,
                                  processes=True):
                pass
        ext.embed_async = timed_async
        FeatureWriter.add = timed_add
        try:
            t = time.perf_counter()
            s = extract_features(run.data, out, ext.config,
                                 ExtractOptions(labels="none", batch_size=run.batch, workers=run.workers,
                                                progress=False, decode=mode),
                                 extractor=ext)
            wall = time.perf_counter() - t
        finally:
            del ext.embed_async
            FeatureWriter.add = real_add
        with FeatureDB(out) as db:
            ok = len(db) == len(run.files) and bool(np.isfinite(db.features[: min(len(db), 1024)]).all())
        out.unlink()
        row = {"dtype": dtype, "decode": mode, "batch": run.batch, "workers": run.workers, "images": s.extracted,
               "img_s": round(s.images_per_second, 1), "loop_s": round(s.seconds, 2),
               "call_wall_s": round(wall, 2), "rows_ok": ok,
               **{f"main_{k}_s": round(v, 2) for k, v in timers.items()}}
        run.res["e2e"].append(row)
        run.log(f"e2e {row}")
        run.save()


def compare_precisions(run: Run) -> None:
    """5c. N-S / mAP per model and dtype, and how far the two precisions' descriptors differ."""
    import numpy as np

    from ris.backbones import get_backbone
    from ris.metrics import evaluate_retrieval

    run.res["accuracy"] = []
    for model_name in run.acc_models:
        per = {d: run.acc_feats.get((model_name, d)) for d in run.dtypes}
        if any(v is None for v in per.values()):
            continue
        row = {"model": model_name, "weights": run.args.weights if model_name == run.args.model else
               ("imagenet" if get_backbone(model_name).offline else "none"), "data": run.res.get("accuracy_data")}
        ref_ids = per[run.dtypes[0]][0]
        finite = True
        for d in run.dtypes:
            ids, feats, labels = per[d]
            order = {i: k for k, i in enumerate(ids)}
            idx = np.array([order[i] for i in ref_ids])
            per[d] = (ref_ids, feats[idx], labels[idx])
            row["images"] = len(ref_ids)
            bad = int((~np.isfinite(per[d][1]).all(axis=1)).sum())
            if bad:  # metrics of NaN/inf rows are meaningless
                row[f"nonfinite_rows_{d}"] = bad
                row[f"ns_{d}"] = row[f"map_{d}"] = None
                finite = False
                continue
            sc = evaluate_retrieval(per[d][1], per[d][2])
            row[f"ns_{d}"] = sc.ns_score
            row[f"map_{d}"] = sc.map
        if len(run.dtypes) == 2 and finite:
            a, b = per[run.dtypes[0]][1].astype(np.float64), per[run.dtypes[1]][1].astype(np.float64)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            row["cos_diff_max"] = float(f"{(1 - cos).max():.3g}")
            row["cos_diff_mean"] = float(f"{(1 - cos).mean():.3g}")

            def top4(x):  # the same top-4 neighbours (query excluded) in both precisions, per image
                sim = x @ x.T
                np.fill_diagonal(sim, -np.inf)
                return np.argsort(-sim, axis=1)[:, :4]
            ta, tb = top4(a), top4(b)
            row["same_top4_set"] = round(float(np.mean([set(p) == set(q) for p, q in zip(ta, tb)])), 4)
        run.res["accuracy"].append(row)
        run.log(f"accuracy {row}")
    run.save()


def predict_baseline(run: Run) -> dict:
    """6. ``model.predict()`` on pre-decoded, host-preprocessed float32 arrays; returns the models
    built, by dtype (the blog stage reuses float32's)."""
    import keras
    import numpy as np

    from ris.backbones import get_backbone
    from ris.decoding import iter_decoded
    from ris.layers import GlobalPool

    bb = get_backbone(run.args.model)
    models = {}
    subset = run.files[: run.profile["predict"]]
    imgs = np.stack([img for _, img, _ in iter_decoded(run.data, subset, run.size, run.workers, 4 * run.batch)])
    x = bb.preprocess(imgs)
    for dtype in run.dtypes if not run.args.quick or run.args.cpu_smoke else run.dtypes[:1]:
        if not run.stage(f"predict {dtype}"):
            continue
        keras.utils.set_random_seed(run.args.seed)
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
        try:
            trunk = bb.build(run.args.weights)
            inp = keras.Input((run.size, run.size, 3))
            model = keras.Model(inp, GlobalPool("gap")(keras.ops.cast(trunk(inp), "float32")))
        finally:
            keras.mixed_precision.set_global_policy(previous)
        models[dtype] = model
        t = time.perf_counter()
        model.predict(x[:run.batch], batch_size=run.batch, verbose=0)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        y = model.predict(x, batch_size=run.batch, verbose=0)
        dt = time.perf_counter() - t
        row = {"dtype": dtype, "batch": run.batch, "images": len(x), "img_s": round(len(x) / dt, 1),
               "first_call_s": round(t_first, 2), "finite": bool(np.isfinite(np.asarray(y, np.float32)).all()),
               "note": "host-preprocessed float32 arrays already in RAM; decoding not included"}
        run.res["predict"].append(row)
        run.log(f"predict {row}")
        run.save()
    return models


def blog_loop_stage(run: Run, model) -> None:
    """7. The blog's serial loop (decode + predict per batch of 32), float32."""
    import sys

    from ris.backbones import get_backbone

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from extract_throughput import blog_loop

    bb = get_backbone(run.args.model)
    paths = [run.data / f for f in run.files[: run.profile["blog"]]]
    blog_loop(paths[:64], model, bb, run.size)  # warm-up: compiles batch 32
    dt = blog_loop(paths, model, bb, run.size)
    run.res["blog"] = {"dtype": "float32", "batch": 32, "images": len(paths), "img_s": round(len(paths) / dt, 1)}
    run.log(f"blog {run.res['blog']}")
