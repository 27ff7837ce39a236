"""ris-extract --engine ray: the same database as the local engine, on a real multi-node Ray cluster.

The cluster is two node processes on this machine (``ray start --head`` and ``ray start --address``),
on loopback (127.0.0.2: Ray rewrites 127.0.0.1 to the interface address), started once for the
module on free ports with its own temp dir, and stopped by killing its own process groups. Faults
are real: a ``kill -9`` of an embedding worker, of the driver, and of a node that joined mid-run.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ris.cli import extract as extract_cli
from ris.cli.common import run
from ris.extract import ExtractOptions, extract_features
from ris.extractor import ExtractConfig
from raycluster import REPO, running_cluster
from ris.testing import committed_rows, make_bad_images, make_mixed_orientation_dataset, make_tiny_dataset

CFG = ExtractConfig(model="mobilenet_v2", weights="none", input_size=32)  # FAST: random init, 32 px
FAST = ["--model", "mobilenet_v2", "--weights", "none", "--resize", "32", "--no-progress"]


# --- no cluster needed ---------------------------------------------------------------------

def test_an_append_with_another_recipe_is_refused_before_the_cluster_starts(tmp_path, monkeypatch):
    """As the local engine: the recipe is compared before Ray starts and the actors build models."""
    pytest.importorskip("ray")
    import ris.ray_engine as ray_engine
    from ris.errors import DatabaseError

    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    extract_features(data, db, CFG, ExtractOptions(progress=False, log=lambda s: None))

    def no_cluster(options):
        raise AssertionError("the cluster was started before refusing")

    monkeypatch.setattr(ray_engine, "connect", no_cluster)
    with pytest.raises(DatabaseError, match="made differently"):
        ray_engine.extract_on_ray(data, db, ExtractConfig(model="vgg16", weights="none", input_size=32), append=True,
                                  progress=False, log=lambda s: None)


def test_a_worker_reason_names_the_file_as_the_local_engine_does():
    from ris.ray_engine import _as_given

    reason = "/abs/d/x.jpg: empty file (0 bytes)"
    assert _as_given(reason, "/abs/d", Path("d"), "x.jpg") == "d/x.jpg: empty file (0 bytes)"
    assert _as_given("something else", "/abs/d", Path("d"), "x.jpg") == "something else"


def test_a_node_without_the_dataset_folder_stops_the_run_instead_of_listing_every_image_as_damaged(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    from ris.errors import RisError
    from ris.ray_engine import _decode

    import ray

    with pytest.raises(RisError, match="not there on node .*same path"):
        _decode(str(tmp_path / "not-mounted"), ["a.jpg"], 32)
    # naming the node outside a Ray worker started a default Ray instance in this process (on the
    # machine's interface address), which every later test then joined instead of its own cluster
    assert not ray.is_initialized()


def test_an_image_a_node_cannot_see_is_reported_as_such_not_as_damaged(tmp_path):
    """A file the driver lists but a node cannot read (a path only the driver sees) was recorded as
    failed ('No such file or directory'), the run exited 0, and --sync/--append never retried it."""
    from ris.errors import RisError
    from ris.ray_engine import _decode_here, refuse_unseen

    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    (data / "cut.jpg").write_bytes(b"\xff\xd8\xff")  # damaged: there, and undecodable
    paths = ["ukbench00000.jpg", "cut.jpg", "elsewhere.jpg"]
    images, errors, digests, unseen, _, _ = _decode_here(str(data), paths, 32)
    assert len(images) == 1 and errors[0] is None and errors[1] and errors[2]
    assert unseen == ["elsewhere.jpg"]  # the damaged one is damaged, the missing one is not seen
    from ris.filestamp import UNKNOWN_DIGEST, file_digest

    # the digest of the bytes the node decoded (the driver reads no file): for --sync
    assert digests == [file_digest(data / "ukbench00000.jpg"), UNKNOWN_DIGEST, UNKNOWN_DIGEST] and digests[0]
    shutil.copy(data / "ukbench00000.jpg", data / "elsewhere.jpg")  # ... while the driver sees it
    with pytest.raises(RisError, match=r"elsewhere\.jpg: node 10\.0\.0\.9 .*cannot (see|read).*same path"):
        refuse_unseen(["elsewhere.jpg"], data, "node 10.0.0.9 (id 0123456789ab)")
    (data / "elsewhere.jpg").unlink()  # gone for the driver too (deleted during the run): listed as
    refuse_unseen(["elsewhere.jpg"], data, "node 10.0.0.9")  # failed, as the local engine lists it


def test_a_node_catches_libjpegs_line_for_a_damaged_jpeg_and_hands_it_back(tmp_path, capfd):
    """A decode task let libjpeg print its unnamed line ('Corrupt JPEG data: 84 extraneous bytes
    before marker 0xd9') into the worker's log (forwarded to the driver only with RIS_VERBOSE=1,
    still unnamed); the driver never named the file. The node now catches it and hands it back."""
    from ris.ray_engine import _decode_here
    from ris.testing import damage_jpeg

    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    damage_jpeg(data / "ukbench00001.jpg")
    capfd.readouterr()
    images, errors, _, _, _, found = _decode_here(str(data), ["ukbench00000.jpg", "ukbench00001.jpg"], 32)
    assert len(images) == 2 and errors == [None, None]
    assert list(found) == ["ukbench00001.jpg"] and found["ukbench00001.jpg"][0].startswith("Corrupt JPEG data: ")
    assert "JPEG" not in capfd.readouterr().err


def test_sync_with_ray_flags_but_not_the_ray_engine_is_one_error(tmp_path, capsys):
    """--sync ran locally whatever --ray-address said."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    db = tmp_path / "f.h5"
    extract_features(data, db, CFG, ExtractOptions(progress=False, log=lambda s: None))
    code = run("ris-extract", extract_cli.main, ["--features-db", str(db), "--sync", "--ray-address", "auto",
                                                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "need --engine ray" in err and len(err.strip().splitlines()) == 1


def test_ray_flags_without_the_ray_engine_are_one_error(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    code = run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(tmp_path / "f.h5"),
                                                 "--ray-address", "auto", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "need --engine ray" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--workers", "4"], ["--decode", "processes"]])
def test_local_decoding_flags_with_the_ray_engine_are_one_error(tmp_path, capsys, flags):
    """--workers/--decode set the local engine's decoding; with --engine ray they were ignored
    (decoding runs as Ray tasks, one CPU each). Refused before Ray is even imported."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    code = run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(tmp_path / "f.h5"),
                                                 "--engine", "ray", *flags, *FAST])
    err = capsys.readouterr().err
    assert code == 2 and f"{flags[0]} {flags[1]}" in err and "--engine ray" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "f.h5").exists()


def test_the_ray_engine_without_ray_installed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    code = run("ris-extract", extract_cli.main, ["--dataset", str(data), "--features-db", str(tmp_path / "f.h5"),
                                                 "--engine", "ray", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'ris[ray]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.lock").exists()


# --- the cluster -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    with running_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 images in 10 chunks of 4, plus damaged ones that both engines must list alike."""
    root = tmp_path_factory.mktemp("raydata")
    data = make_tiny_dataset(root / "images", n_objects=10, views=4, size=64)
    bad = make_bad_images(root / "bad")
    for key in ("truncated", "zero_byte", "text_as_jpg", "gray_png"):
        shutil.copy(bad[key], data / bad[key].name)
    local = root / "local.h5"
    extract_features(data, local, CFG, ExtractOptions(batch_size=4, progress=False))
    return data, local


def _ray(data, db, cluster, **kw):
    from ris.ray_engine import RayOptions, extract_on_ray

    opts = kw.pop("options", None) or RayOptions(address=cluster.address)
    return extract_on_ray(data, db, CFG, batch_size=4, progress=False, options=opts, **kw)


def same_on_ray_as_locally(data: Path, config, cluster, tmp_path: Path) -> Path:
    """Extract ``data`` with ``config`` locally and on the cluster, assert the databases are the
    same, and return the Ray one."""
    from ris.ray_engine import RayOptions, extract_on_ray

    local, on_ray = tmp_path / "local.h5", tmp_path / "r.h5"
    extract_features(data, local, config, ExtractOptions(batch_size=4, progress=False))
    extract_on_ray(data, on_ray, config, batch_size=4, progress=False, options=RayOptions(address=cluster.address))
    assert_same_database(local, on_ray)
    return on_ray


def assert_same_database(local: Path, other: Path, tol: float = 1e-5) -> None:
    """Same rows in the same order, same failures, features within ``tol``, same fingerprint."""
    from ris.featuredb import FeatureDB, fingerprint

    with h5py.File(local) as a, h5py.File(other) as b:
        ids = b["image_ids"][:].tolist()
        assert len(ids) == len(set(ids)), "an image is in the database more than once"
        assert a["image_ids"][:].tolist() == ids
        assert a["labels"][:].tolist() == b["labels"][:].tolist()
        assert a["label_names"][:].tolist() == b["label_names"][:].tolist()
        assert a["failed_ids"][:].tolist() == b["failed_ids"][:].tolist()
        assert a["failed_reasons"][:].tolist() == b["failed_reasons"][:].tolist()
        assert np.abs(a["features"][:] - b["features"][:]).max() <= tol
        assert fingerprint(dict(a.attrs)) == fingerprint(dict(b.attrs))
        assert b.attrs["complete"] and b.attrs["extract_engine"] == "ray"
    with FeatureDB(other) as db:  # what ris-search/-eval/-train read: accepted
        assert len(db.image_ids) == len(ids)


@pytest.mark.slow
def test_ray_on_two_nodes_equals_the_local_engine(cluster, dataset, tmp_path):
    from ris.ray_engine import RayOptions

    data, local = dataset
    s = _ray(data, tmp_path / "r.h5", cluster,
             options=RayOptions(address=cluster.address, actors=2, actor_cpus=0.25, decode_cpus=0.5))
    assert s.extracted == 41 and len(s.skipped) == 3 and s.actors == 2 and s.actor_restarts == 0
    assert sum(s.nodes.values()) == 44
    assert_same_database(local, tmp_path / "r.h5")


@pytest.mark.slow
def test_a_damaged_jpeg_decoded_on_a_node_is_named_by_the_driver_as_the_local_engine_names_it(cluster, tmp_path,
                                                                                               capfd):
    """libjpeg's line for a damaged JPEG stayed in the Ray worker's log (or came unnamed, with
    RIS_VERBOSE=1); the local engine names the file. The driver now says the same line, once."""
    import re

    from ris.testing import damage_jpeg

    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=3, size=48)
    bad = damage_jpeg(data / "ukbench00004.jpg")
    capfd.readouterr()
    s = _ray(data, tmp_path / "r.h5", cluster)
    out, err = capfd.readouterr()
    assert s.extracted == 6 and not s.skipped
    said = [line for line in err.splitlines() if "JPEG" in line]
    assert len(said) == 1 and re.fullmatch(rf"warning: {re.escape(str(bad))}: corrupt JPEG data \(\d+ extraneous "
                                           r"bytes before marker 0xd9\)", said[0]), err


@pytest.mark.slow
def test_a_fused_recipe_on_ray_equals_the_local_engine(cluster, dataset, tmp_path):
    """Two backbones and a colour histogram concatenated (ris.fusion, ris.colour): the actors build
    the fused extractor from the same recipe, and the database records it as the local engine does."""
    from dataclasses import replace

    from ris.colour import colour_config
    from ris.fusion import FusionConfig

    data, _ = dataset
    hist = colour_config(ExtractConfig(model="hsv_hist", input_size=32))
    fused = FusionConfig((CFG, replace(CFG, model="efficientnet_lite0", input_size=48, pooling="gem", flip=True),
                          hist), (1.0, 1.5, 0.5))  # one part also describes the mirrored image (--flip)
    with h5py.File(same_on_ray_as_locally(data, fused, cluster, tmp_path)) as f:
        assert f["features"].shape[1] == 1280 + 1280 + 1000 and "fusion" in f.attrs and f.attrs["flip"]


@pytest.mark.slow
def test_images_kept_at_their_aspect_ratio_on_ray_equal_the_local_engine(cluster, tmp_path):
    """--aspect keep: landscape, portrait and square images decoded on the nodes and embedded by
    the actors one shape at a time give the local engine's rows, and the recipe records it."""
    from dataclasses import replace

    keep = replace(CFG, input_size=128, aspect="keep")
    data = make_mixed_orientation_dataset(tmp_path / "d")
    with h5py.File(same_on_ray_as_locally(data, keep, cluster, tmp_path)) as f:
        assert f.attrs["aspect"] == "keep" and len(f["image_ids"]) == 9


@pytest.mark.slow
def test_a_killed_embedding_worker_is_retried_and_every_image_is_there_once(cluster, dataset, tmp_path, capsys):
    data, local = dataset
    killed: list[int] = []

    def kill_once(state):
        if not killed and state.committed_chunks == 2:  # mid-run: 8 chunks still to go
            killed.append(state.actor_pids[0])
            os.kill(state.actor_pids[0], signal.SIGKILL)

    s = _ray(data, tmp_path / "r.h5", cluster, on_commit=kill_once)
    assert killed and s.actor_restarts == 1
    assert s.extracted == 41 and s.resumed == 0
    assert_same_database(local, tmp_path / "r.h5")
    # Ray prints its own notice of the dead worker on the driver's stdout, where `--json` writes:
    # it must go to stderr, beside ris's line about the restart
    out, err = capsys.readouterr()
    assert out == "" and "restarted" in err


@pytest.mark.slow
def test_a_killed_driver_resumes_without_recomputing_committed_rows(cluster, dataset, tmp_path):
    data, local = dataset
    out_db = tmp_path / "r.h5"
    cmd = [sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset", str(data),
           "--features-db", str(out_db), "--engine", "ray", "--ray-address", "auto", "--batch-size", "4",
           *FAST[:-1]]
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}  # what 'auto' finds first
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and committed_rows(out_db) < 8:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"the driver ended before it could be killed: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = committed_rows(out_db)
    assert not out_db.exists() and committed >= 8
    done = subprocess.run(cmd + ["--json", "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads(done.stdout)
    assert s["engine"] == "ray" and s["resumed"] == committed and s["resumed"] + s["extracted"] == 41
    assert_same_database(local, out_db)


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory):
    """32 large PNGs (no reduced decoding for PNG): decoding outweighs the 32 px network, so several
    decode tasks wait at once and a node that joins gets some of them."""
    import cv2

    root = tmp_path_factory.mktemp("slowdata")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        img = cv2.resize(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), (1000, 1000), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(data / f"img{i:03d}.png"), img)
    local = root / "local.h5"
    extract_features(data, local, CFG, ExtractOptions(batch_size=4, progress=False))
    return data, local


@pytest.mark.slow
def test_a_node_that_joins_and_then_dies_mid_run_loses_no_rows(cluster, slow_dataset, tmp_path):
    import ray

    data, local = slow_dataset
    new = {}

    def churn(state):
        if state.committed_chunks == 1:  # a third node joins ...
            before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            new["pgid"] = cluster.start_node()
            new["id"] = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before)
        elif "id" in new and "killed" not in new and (new["id"][:12] in state.nodes or state.committed_chunks >= 4):
            # ... and dies (kill -9 of its raylet and workers) once it decoded, or half-way through the
            # run if Ray's scheduler gave it nothing yet (a busy machine): its death must cost no row either
            cluster.kill_group(new["pgid"])
            new["killed"] = state.committed_chunks
            new["took_work"] = new["id"][:12] in state.nodes

    s = _ray(data, tmp_path / "r.h5", cluster, on_commit=churn)
    assert "killed" in new, f"the new node never joined: {s.nodes}"
    assert new["killed"] < 8, "killed after the last chunk: nothing left to lose"
    assert s.extracted == 32 and sum(s.nodes.values()) >= 32
    assert_same_database(local, tmp_path / "r.h5")


@pytest.mark.slow
def test_ukbench_on_ray_equals_the_local_engine(cluster, tmp_path):
    from ris.metrics import ns_score
    from ris.ray_engine import RayOptions, extract_on_ray
    from conftest import shared_dataset

    src = shared_dataset("ukbench1000")
    data = tmp_path / "ukbench100"
    data.mkdir()
    for i in range(100):  # links, not copies
        (data / f"ukbench{i:05d}.jpg").symlink_to(src / f"ukbench{i:05d}.jpg")
    cfg = ExtractConfig(model="mobilenet_v2")  # offline ImageNet weights, 224 px
    extract_features(data, tmp_path / "local.h5", cfg, ExtractOptions(labels="ukbench", progress=False))
    extract_on_ray(data, tmp_path / "ray.h5", cfg, labels="ukbench", progress=False,
                   options=RayOptions(address=cluster.address))
    assert_same_database(tmp_path / "local.h5", tmp_path / "ray.h5")
    with h5py.File(tmp_path / "local.h5") as a, h5py.File(tmp_path / "ray.h5") as b:
        assert ns_score(a["features"][:], a["labels"][:]) == ns_score(b["features"][:], b["labels"][:])


@pytest.mark.slow
def test_the_command_starts_a_local_cluster_in_a_fresh_process(tmp_path):
    """As a user runs it: a new process, no Ray settings in the environment, no address: a local
    cluster of one node is started, used and stopped. (Ray reads its auth mode when it is imported:
    a mode set after the import made the driver and the cluster it started disagree, and the
    command failed with 'InvalidAuthToken'.) In-process, the cluster's stop is checked by
    test_a_one_cpu_local_cluster_extracts_everything."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=4, size=48)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset", str(data),
                           "--features-db", str(tmp_path / "f.h5"), "--engine", "ray", "--json", *FAST],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads(done.stdout)
    assert s["engine"] == "ray" and s["extracted"] == 8 and len(s["nodes"]) == 1


@pytest.mark.slow
def test_a_workers_error_at_start_up_is_one_line(cluster, dataset, tmp_path, monkeypatch):
    """A node without the dataset folder fails the decoders' warm-up; the error printed was Ray's
    multi-line remote traceback (the worker's RisError came back wrapped, and was re-raised as is)."""
    import ris.ray_engine as ray_engine
    from ris.errors import RisError

    def not_mounted(root, rel_paths, size, aspect="squash"):
        raise RisError(f"{root}: the dataset folder is not there on node N; every node must see it at the same path")

    monkeypatch.setattr(ray_engine, "_decode", not_mounted)
    with pytest.raises(RisError) as caught:
        _ray(dataset[0], tmp_path / "r.h5", cluster)
    message = str(caught.value)
    assert "not there on node N" in message and len(message.splitlines()) == 1 and "Traceback" not in message
    assert not (tmp_path / "r.h5").exists()


def _hung(signum, frame):
    raise KeyboardInterrupt  # -> Interrupted: not the error the test waits for


@pytest.mark.slow
def test_a_node_dying_on_a_cluster_of_two_cpus_never_hangs_the_run(slow_dataset, tmp_path):
    """Two nodes of one CPU: the actor holds one, decoding the other. When a node dies, Ray places
    the restarted actor and the waiting decode tasks on the last CPU in either order: decodes
    first, the run completes; the actor first, no decode task can be placed again and the run
    waited for ever. Now that order stops the run in one line with its rows kept (the other order
    must still complete whole). The alarm only keeps a regression from hanging the suite."""
    from ris.errors import RisError
    from ris.ray_engine import RayOptions

    data, local = slow_dataset
    with running_cluster(2) as c:
        def kill_the_second_node(state):
            if state.committed_chunks == 1:
                c.kill_group(c.groups[1])  # the driver is on the head (Ray prefers it)

        previous = signal.signal(signal.SIGALRM, _hung)
        signal.alarm(420)
        try:
            s = _ray(data, tmp_path / "r.h5", c, options=RayOptions(address=c.address, stall_s=10),
                     on_commit=kill_the_second_node)
        except RisError as exc:
            message = str(exc)
            assert "CPU" in message and "resume" in message and len(message.splitlines()) == 1, message
            with h5py.File(tmp_path / "r.h5.partial") as f:
                assert int(f.attrs["rows_done"]) >= 4
        else:
            assert s.extracted == 32
            assert_same_database(local, tmp_path / "r.h5")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_sync_with_the_ray_engine_extracts_the_new_images_on_the_cluster(cluster, tmp_path, capsys):
    """--sync ran locally whatever --engine said (and the database kept extract_engine='ray')."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=48)
    db = tmp_path / "f.h5"
    extract_features(data, db, CFG, ExtractOptions(batch_size=4, progress=False, log=lambda s: None))
    more = make_tiny_dataset(tmp_path / "more", n_objects=1, views=2, size=48, seed=7)
    for i, f in enumerate(sorted(more.glob("*.jpg"))):
        shutil.copy(f, data / f"new{i}.jpg")
    code = run("ris-extract", extract_cli.main, ["--features-db", str(db), "--sync", "--engine", "ray",
                                                 "--ray-address", cluster.address, "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["added"] == 2
    with h5py.File(db) as f:
        assert f.attrs["extract_engine"] == "ray" and len(f["image_ids"]) == 6


@pytest.mark.slow
def test_sigterm_while_the_local_cluster_starts_exits_as_interrupted(tmp_path):
    """SIGTERM during Ray's start-up ended the command with 'ray: SystemExit: 1', exit 2."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=4, size=48)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset",
                             str(data), "--features-db", str(tmp_path / "f.h5"), "--engine", "ray", *FAST],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _children(proc.pid):  # Ray's first server process: start-up
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "SystemExit" not in err, err[-3000:]


def _children(pid: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


@pytest.mark.slow
def test_a_one_cpu_local_cluster_extracts_everything(tmp_path):
    """One CPU: the actor held half of it and each decode task asked for a whole one, so no decode
    task was ever placed and the run waited for ever. The alarm only keeps a regression from
    hanging the suite."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    from ris.ray_engine import RayOptions, extract_on_ray

    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=4, size=48)
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(300)
    try:
        s = extract_on_ray(data, tmp_path / "f.h5", CFG, batch_size=4, progress=False, options=RayOptions(num_cpus=1))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert s.extracted == 8 and s.actors == 1
    assert not ray.is_initialized()
    from ris.featuredb import FeatureDB

    with FeatureDB(tmp_path / "f.h5") as f:  # stamped by the driver before the nodes read the files
        stamps = dict(zip(f.image_ids, f.file_stamps.tolist()))
        digests = dict(zip(f.image_ids, f.file_digests.tolist()))  # and digested by the nodes, for --sync
    assert all(stamps[p.name] == [p.stat().st_size, p.stat().st_mtime_ns] for p in data.glob("*.jpg"))
    from ris.filestamp import file_digest

    assert all(digests[p.name] == file_digest(p) != 0 for p in data.glob("*.jpg"))


@pytest.mark.slow
def test_ctrl_c_mid_run_prints_one_line_and_no_ray_noise(tmp_path):
    """Ctrl-C while batches were in flight: Ray's driver logged 'task_manager.cc: Failed to push
    error to driver for task ...' for each, before the command's own line. Pending tasks are
    cancelled before the cluster goes."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    data = make_tiny_dataset(tmp_path / "d", n_objects=300, views=4, size=96)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    db = tmp_path / "f.h5"
    proc = subprocess.Popen([sys.executable, "-c", "from ris.cli.extract import entry; entry()", "--dataset",
                             str(data), "--features-db", str(db), "--engine", "ray", "--model", "vgg16", "--weights",
                             "none", "--resize", "64", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "f.h5.partial"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (partial.exists() and partial.stat().st_size > 300_000):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ris-extract: interrupted after"), err[-3000:]
