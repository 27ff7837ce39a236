"""The resumable extraction run: options, interruption, failures on the way, rows not finite."""
from __future__ import annotations

import re
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from ris.errors import Interrupted, RisError
from ris.extract import ExtractOptions, extract_features
from ris.extractor import ExtractConfig
from ris.featuredb import FeatureDB, partial_path
from ris.featurewriter import FeatureWriter
from ris.sidecars import WriterLock
from ris.testing import make_tiny_dataset

QUIET = dict(progress=False, log=lambda s: None)


class _StandIn:
    """A stand-in extractor (no model): 3-d mean-colour features; NaN for the images whose running
    number is in ``nan_rows``."""

    max_size = 32
    output_shape = (3,)

    def __init__(self, nan_rows=()):
        self.seen = 0
        self.nan_rows = set(nan_rows)

    def attrs(self):
        return ExtractConfig(model="vgg16", weights="none", input_size=32).to_attrs()

    def embed_async(self, images, pad_to=None):
        feats = images.reshape(len(images), -1, 3).mean(1).astype(np.float32) + 1.0
        for row in range(self.seen, self.seen + len(images)):
            if row in self.nan_rows:
                feats[row - self.seen] = np.nan
        self.seen += len(images)
        return lambda: feats


def _lock_is_free(db) -> bool:
    lock = WriterLock(db)
    try:
        lock.acquire()
    except RisError:
        return False
    lock.release()
    return True


def test_an_image_with_non_finite_features_is_skipped_said_and_tried_again_by_append(tmp_path, capsys):
    """A model that gave NaN/inf for an image: the row was left out but listed among the failed
    images without a 'skipped:' line as the run went, and --append never tried it again (a failed
    id counts as done). It is skipped like an undecodable image, said in one line naming the file,
    counted in the summary, and not recorded, so --append (and --sync) try it again."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=48)
    db = tmp_path / "f.h5"
    s = extract_features(data, db, ExtractConfig(), ExtractOptions(batch_size=2, progress=False),
                         extractor=_StandIn(nan_rows={1}))
    bad = sorted(p.name for p in data.glob("*.jpg"))[1]
    reason = f"{data / bad}: the model gave non-finite features (NaN/inf)"
    assert s.extracted == 3 and s.skipped == [(bad, reason)]
    assert f"skipped: {reason}" in capsys.readouterr().err.splitlines()
    assert f"  skipped: {reason}" in s.report()
    with FeatureDB(db) as f:
        assert bad not in f.image_ids and len(f) == 3
        assert np.isfinite(f.features[:]).all()
        assert f.failures == []
    with h5py.File(db) as f:
        assert f.attrs["num_failed"] == 0
    again = extract_features(data, db, ExtractConfig(), ExtractOptions(append=True, **QUIET), extractor=_StandIn())
    assert again.extracted == 1 and again.skipped == []
    with FeatureDB(db) as f:
        assert bad in f.image_ids and len(f) == 4


def test_a_run_whose_every_image_gave_non_finite_features_says_so(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    with pytest.raises(RisError, match="none of the 2 images gave features .*non-finite"):
        extract_features(data, tmp_path / "f.h5", ExtractConfig(), ExtractOptions(**QUIET),
                         extractor=_StandIn(nan_rows={0, 1}))
    assert not (tmp_path / "f.h5").exists()


def ctrl_c_at_second_batch(monkeypatch):
    """Ctrl-C as the second batch is written (the first is committed); returns the real ``add``."""
    real_add = FeatureWriter.add
    calls = {"n": 0}

    def flaky_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(FeatureWriter, "add", flaky_add)
    return real_add


def test_interrupted_is_its_own_error_type_and_the_next_run_resumes(tmp_path, monkeypatch):
    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=4, size=80)
    out_db = tmp_path / "f.h5"
    options = ExtractOptions(batch_size=4, **QUIET)
    real_add = ctrl_c_at_second_batch(monkeypatch)
    with pytest.raises(Interrupted, match="^interrupted after 4 images; run the same command again"):
        extract_features(data, out_db, ExtractConfig(), options, extractor=_StandIn())
    assert not out_db.exists() and partial_path(out_db).exists() and _lock_is_free(out_db)
    monkeypatch.setattr(FeatureWriter, "add", real_add)
    s = extract_features(data, out_db, ExtractConfig(), options, extractor=_StandIn())
    assert s.resumed == 4 and s.extracted == 8
    with h5py.File(out_db) as f:
        assert sorted(x.decode() for x in f["image_ids"][:]) == sorted(p.name for p in data.glob("*.jpg"))


def test_a_sigterm_handled_inside_a_gc_callback_still_stops_the_run(tmp_path):
    """Keras' JAX backend runs a garbage-collector callback (jax's _xla_gc_callback) between the
    batches; a SIGTERM whose handler ran inside it raised KeyboardInterrupt there, which Python
    prints ('Exception ignored in ...') and drops: the run went on to the end. It is now delivered
    again once the callback has returned, and the run stops with the committed batches kept."""
    import gc
    import signal

    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=4, size=48)
    sent: list[str] = []

    def in_gc(phase, info):
        if not sent:
            sent.append(phase)
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the collector's callback

    class Collecting(_StandIn):
        def embed_async(self, images, pad_to=None):
            if self.seen == 4:  # the second batch
                gc.callbacks.append(in_gc)
                try:
                    gc.collect()
                finally:
                    gc.callbacks.remove(in_gc)
            return super().embed_async(images, pad_to)

    saved = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Interrupted, match="^interrupted after [0-9]+ images"):
            extract_features(data, tmp_path / "f.h5", ExtractConfig(), ExtractOptions(batch_size=4, **QUIET),
                             extractor=Collecting())
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert sent and not (tmp_path / "f.h5").exists() and partial_path(tmp_path / "f.h5").exists()


def test_a_failure_mid_run_keeps_the_committed_batches_and_frees_the_lock(tmp_path, monkeypatch):
    """Any error after the writer opened (here a bug in a batch) closes it: the lock is released at
    once, not when the process ends, and the next run resumes from the committed batches."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=4, size=48)
    db = tmp_path / "f.h5"
    real_add = FeatureWriter.add
    calls = {"n": 0}

    def broken_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ZeroDivisionError("a bug")
        return real_add(self, *a, **k)

    monkeypatch.setattr(FeatureWriter, "add", broken_add)
    with pytest.raises(ZeroDivisionError) as raised:
        extract_features(data, db, ExtractConfig(), ExtractOptions(batch_size=4, **QUIET), extractor=_StandIn())
    # the traceback (kept here, as a debugger or a long-lived worker keeps it) holds the run's frames:
    # the lock must have been released by the run itself, not by garbage collection
    assert raised.tb is not None and _lock_is_free(db) and partial_path(db).exists() and not db.exists()
    monkeypatch.setattr(FeatureWriter, "add", real_add)
    s = extract_features(data, db, ExtractConfig(), ExtractOptions(batch_size=4, **QUIET), extractor=_StandIn())
    assert s.resumed == 4 and s.extracted == 8


def test_a_bad_decode_budget_is_refused_before_anything_is_locked_or_written(tmp_path, monkeypatch):
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    db = tmp_path / "f.h5"
    monkeypatch.setenv("RIS_DECODE_BUDGET", "lots")
    with pytest.raises(RisError, match="RIS_DECODE_BUDGET"):
        extract_features(data, db, ExtractConfig(), ExtractOptions(**QUIET), extractor=_StandIn())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("bad,needle", [(dict(decode="fork"), "decode"), (dict(batch_size=0), "batch_size"),
                                        (dict(workers=-1), "workers"), (dict(prefetch=2.5), "prefetch"),
                                        (dict(append=True, overwrite=True), "append and overwrite")])
def test_options_that_cannot_run_are_refused_first(tmp_path, bad, needle):
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    with pytest.raises(RisError, match=needle):
        extract_features(data, tmp_path / "f.h5", ExtractConfig(), ExtractOptions(**bad, **QUIET),
                         extractor=_StandIn())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_run_in_another_thread_works(tmp_path):
    """Only the main thread may set signal handlers: a run in a worker thread (a serving or
    distributed engine) must not fail setting the SIGTERM handler, nor change it."""
    import signal

    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=48)
    handler = signal.getsignal(signal.SIGTERM)
    result = {}

    def work():
        try:
            result["summary"] = extract_features(data, tmp_path / "f.h5", ExtractConfig(),
                                                 ExtractOptions(batch_size=2, **QUIET), extractor=_StandIn())
        except BaseException as exc:  # reported below
            result["error"] = exc

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert "error" not in result, repr(result.get("error"))
    assert result["summary"].extracted == 4
    assert signal.getsignal(signal.SIGTERM) is handler


def test_summary_report_counts_files_not_read_and_lists_them_when_verbose(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    (data / "notes.txt").write_text("x")
    (data / ".hidden.jpg").write_text("x")
    s = extract_features(data, tmp_path / "f.h5", ExtractConfig(), ExtractOptions(labels="none", **QUIET),
                         extractor=_StandIn())
    short, full = s.report(), s.report(verbose=True)
    assert short[0].startswith(f"{tmp_path / 'f.h5'}: 2 images extracted")
    assert "not read: 2 files with other extensions, 1 hidden file (--verbose lists them)" in short
    assert "  not read (hidden): .hidden.jpg" in full and "  not read (extension): notes.txt" in full


def test_an_append_with_another_recipe_is_refused_before_the_network_is_built(tmp_path, monkeypatch):
    """``ris-extract --append`` with the default VGG16 on a MobileNetV2 database built VGG16 first
    (a 528 MB download online; offline it failed with "cannot get Keras ImageNet weights") before
    the recipe check refused it. The recipe is compared first now, for appends and resumes."""
    import ris.extract as extract_module
    from ris.errors import DatabaseError
    from ris.featurewriter import FeatureWriter
    from ris.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    quiet = dict(progress=False, log=lambda s: None)
    extract_features(data, db, ExtractConfig(model="vgg16", weights="none", input_size=64), ExtractOptions(**quiet))

    def no_build(config):
        raise AssertionError(f"built {config.model} before refusing")

    monkeypatch.setattr(extract_module, "build_extractor", no_build)
    for other in (ExtractConfig(model="mobilenet_v2", weights="none", input_size=64),
                  ExtractConfig(model="vgg16", weights="none", input_size=96),
                  ExtractConfig(model="vgg16", weights="none", input_size=64, pooling="gem")):
        with pytest.raises(DatabaseError, match="made differently"):
            extract_features(data, db, other, ExtractOptions(append=True, **quiet))
    # an interrupted run's partial is checked the same way before a resume builds anything
    writer = FeatureWriter(tmp_path / "g.h5", {"model": "vgg16", "weights": "none", "input_size": 64, "scales": [1.0],
                                               "pooling": "gap", "layer": "block5_conv3"}, (512,), [])
    writer.close()
    with pytest.raises(DatabaseError, match="made differently"):
        extract_features(data, tmp_path / "g.h5", ExtractConfig(model="mobilenet_v2", weights="none"),
                         ExtractOptions(**quiet))


def test_a_batch_whose_images_all_failed_checks_no_rows():
    """--engine ray with a batch (--batch-size) of damaged images only: 'cannot reshape array of size
    0 into shape (0,newaxis)', and every resume failed at the same batch."""
    from ris.extract import _finite_rows

    ids, feats, bad = _finite_rows([], np.zeros((0, 1280), np.float32), Path("."))
    assert ids == [] and feats.shape == (0, 1280) and bad == []


def test_an_append_says_it_adds_not_that_it_resumes(tmp_path):
    """``ris-extract --append`` (and ``--sync``) printed "resuming: 40 images already in f.h5, 1 to
    go", as after an interrupted run, where nothing had been interrupted."""
    from ris.testing import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "photos", n_objects=2, views=2, size=64)
    db = tmp_path / "f.h5"
    cfg = ExtractConfig(model="vgg16", weights="none", input_size=32)
    extract_features(data, db, cfg, ExtractOptions(progress=False, log=lambda s: None))
    (data / "ukbench00003.jpg").rename(data / "ukbench00004.jpg")
    said: list[str] = []
    extract_features(data, db, cfg, ExtractOptions(append=True, progress=False, log=said.append))
    assert not [s for s in said if s.startswith("resuming")], said
    assert any(s == "adding: 4 images already in f.h5, 1 to go" for s in said), said


def test_a_skipped_file_whose_name_holds_a_newline_is_one_line(tmp_path, capsys):
    """'skipped: {reason}' (as the run goes and in the closing summary) split in two for a file
    named 'bad<newline>photo.jpg', and an escape sequence in a name reached the terminal: the names
    are printed escaped ('bad\\nphoto.jpg'), as ris-search prints them; the JSON summary keeps them."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    (data / "bad\nphoto.jpg").write_bytes(b"not an image")
    (data / "notes\x1b[2J.txt").write_text("x")
    s = extract_features(data, tmp_path / "f\nx.h5", ExtractConfig(), ExtractOptions(labels="none", **QUIET),
                         extractor=_StandIn())
    err = capsys.readouterr().err
    assert err.startswith("skipped: ") and err.count("\n") == 1 and "bad\\nphoto.jpg" in err, err
    lines = s.report(verbose=True)
    assert all("\n" not in line and "\x1b" not in line for line in lines), lines
    assert lines[0].startswith(f"{tmp_path}/f\\nx.h5: 2 images extracted")
    assert [line for line in lines if line.startswith("  skipped: ")] == [f"  skipped: {s.skipped[0][1]}"
                                                                          .replace("\n", "\\n")]
    assert "  not read (extension): notes\\x1b[2J.txt" in lines
    assert s.to_dict()["skipped"][0]["image"] == "bad\nphoto.jpg"


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_a_corrupt_but_decodable_jpeg_is_named_in_a_warning_without_libjpegs_own_line(tmp_path, capfd, decode):
    """libjpeg (inside OpenCV) printed 'Corrupt JPEG data: 100 extraneous bytes before marker 0xd9'
    straight to stderr, without the file's name: among thousands of photos the bad one could not be
    found. The run names it in one 'warning:' line and the raw line is gone; the image is used."""
    import cv2

    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=4, size=48)
    img = np.random.default_rng(0).integers(0, 255, (240, 320, 3)).astype(np.uint8)
    good = cv2.imencode(".jpg", img)[1].tobytes()
    (data / "ukbench00005.jpg").write_bytes(good[:-2] + b"\0" * 100 + good[-2:])  # before the end marker
    capfd.readouterr()
    s = extract_features(data, tmp_path / "f.h5", ExtractConfig(), ExtractOptions(workers=4, batch_size=4,
                                                                                  decode=decode, progress=False),
                         extractor=_StandIn())
    err = capfd.readouterr().err
    assert s.extracted == 12 and s.skipped == []
    assert "Corrupt JPEG data" not in err, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and re.fullmatch(rf"warning: {re.escape(str(data / 'ukbench00005.jpg'))}: corrupt JPEG "
                                             r"data \(\d+ extraneous bytes before marker 0xd9\)", warned[0]), err


def test_a_label_file_that_names_none_of_the_images_is_refused_before_any_work(tmp_path):
    """UKBench objects 1000-1999 copied beside the groundtruth.tsv of objects 0-999: auto read that
    file, labelled none of the images, extracted them all unlabelled without a word, and ris-eval
    then said only 'no labels to evaluate against'."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=64)
    (data / "groundtruth.tsv").write_text("file\tobject_id\nukbench09000.jpg\t2250\nukbench09001.jpg\t2250\n")
    db = tmp_path / "f.h5"
    config = ExtractConfig(model="vgg16", weights="none", input_size=32)
    for labels in ("auto", str(data / "groundtruth.tsv")):
        with pytest.raises(RisError) as exc:
            extract_features(data, db, config, ExtractOptions(labels=labels, progress=False))
        msg = str(exc.value)
        assert msg.startswith(f"{data / 'groundtruth.tsv'}: labels none of the 4 images") and "\n" not in msg
        assert "ukbench00000.jpg" in msg and "--labels ukbench" in msg
        assert not db.exists() and not partial_path(db).exists()
    (data / "groundtruth.tsv").write_text("ukbench00000.jpg\ta\nukbench00001.jpg\ta\n")  # some: the rest unlabelled
    extract_features(data, db, config, ExtractOptions(labels="auto", progress=False))
    with FeatureDB(db) as fdb:
        assert fdb.labels.tolist() == [0, 0, -1, -1]


def _count_bytes_read(monkeypatch, data: Path) -> dict:
    """Bytes read with ``os.read`` from each file of ``data`` that ris opens as an image (whole-file
    reads: the decoder's ``read_file``, a digest's hashing; headers are read through a file object)."""
    import os

    import ris.imagefile

    read: dict[str, int] = {}
    fd_name: dict[int, str] = {}
    open_regular, os_read = ris.imagefile._open_regular, os.read

    def opened(path, max_bytes):
        fd, size = open_regular(path, max_bytes)
        if Path(path).parent == data and Path(path).suffix == ".jpg":
            fd_name[fd] = Path(path).name
        return fd, size

    def counted(fd, n):
        chunk = os_read(fd, n)
        if fd in fd_name:
            read[fd_name[fd]] = read.get(fd_name[fd], 0) + len(chunk)
        return chunk

    monkeypatch.setattr(ris.imagefile, "_open_regular", opened)
    monkeypatch.setattr(os, "read", counted)
    return read


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_each_image_is_read_once_and_its_digest_is_of_the_decoded_bytes(tmp_path, monkeypatch, decode):
    """The row's file digest (for --sync) was taken by reading every file a second time on the main
    thread, apart from the decoder's read: twice the reads, one at a time (slow on network storage).
    It is now taken from the bytes the decoder read, in its worker."""
    import ris.filestamp
    from ris.filestamp import file_digest

    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=3, size=48)
    images = sorted(p.name for p in data.glob("*.jpg"))
    digested = []
    real = ris.filestamp.file_digest
    monkeypatch.setattr(ris.filestamp, "file_digest", lambda p: digested.append(p) or real(p))
    read = _count_bytes_read(monkeypatch, data)
    s = extract_features(data, tmp_path / "f.h5", ExtractConfig(),
                         ExtractOptions(batch_size=2, decode=decode, workers=2, **QUIET), extractor=_StandIn())
    assert s.extracted == len(images)
    assert digested == []  # no file hashed apart from its decoding
    if decode == "threads":  # (worker processes read outside this process's patches)
        assert read == {n: (data / n).stat().st_size for n in images}  # each image's bytes read once
    with FeatureDB(tmp_path / "f.h5") as f:
        digests = dict(zip(f.image_ids, f.file_digests.tolist()))
    assert digests == {n: file_digest(data / n) for n in images} and 0 not in digests.values()


def test_a_file_rewritten_before_its_decoding_is_recorded_with_the_digest_of_what_was_decoded(tmp_path, monkeypatch):
    """A file replaced between the listing and its decoding: the row's digest must name the bytes the
    features were made from, never the file as it was before (--sync would keep a row whose
    features are of other bytes than its digest vouches for)."""
    import shutil

    import ris.imagefile
    from ris.filestamp import file_digest

    data = make_tiny_dataset(tmp_path / "d", n_objects=2, views=2, size=48)
    other = data / "ukbench00003.jpg"
    target = data / "ukbench00000.jpg"
    real_read = ris.imagefile.read_file
    swapped = []

    def read_file(path, max_bytes=None):
        if Path(path) == target and not swapped:  # rewritten just before the decoder reads it
            shutil.copyfile(other, target)
            swapped.append(path)
        return real_read(path, max_bytes)

    monkeypatch.setattr(ris.imagefile, "read_file", read_file)
    import ris.images

    monkeypatch.setattr(ris.images, "read_file", read_file)
    extract_features(data, tmp_path / "f.h5", ExtractConfig(), ExtractOptions(batch_size=2, **QUIET),
                     extractor=_StandIn())
    assert swapped
    with FeatureDB(tmp_path / "f.h5") as f:
        digests = dict(zip(f.image_ids, f.file_digests.tolist()))
        feats = dict(zip(f.image_ids, f.features[:]))
    assert digests["ukbench00000.jpg"] == file_digest(target) == file_digest(other)
    np.testing.assert_array_equal(feats["ukbench00000.jpg"], feats["ukbench00003.jpg"])  # decoded: the new bytes


def test_images_skipped_by_an_earlier_run_are_counted_in_the_summary(tmp_path, monkeypatch):
    """A resumed run (after Ctrl-C) and an --append summed to fewer images than were found: the files
    an earlier run had skipped (recorded as failed, not decoded again) were in no count, and the
    resumed run's closing summary did not name them. They are counted and listed as skipped before,
    in the report and in ``to_dict``, so found = extracted + already there + skipped + skipped before."""
    data = make_tiny_dataset(tmp_path / "d", n_objects=3, views=4, size=80)
    (data / "aaa_empty.jpg").write_bytes(b"")  # sorts first: skipped before the interruption
    db = tmp_path / "f.h5"
    options = ExtractOptions(batch_size=4, **QUIET)
    real_add = ctrl_c_at_second_batch(monkeypatch)
    with pytest.raises(Interrupted):
        extract_features(data, db, ExtractConfig(), options, extractor=_StandIn())
    monkeypatch.setattr(FeatureWriter, "add", real_add)
    reason = f"{data / 'aaa_empty.jpg'}: empty file (0 bytes)"
    s = extract_features(data, db, ExtractConfig(), options, extractor=_StandIn())
    assert (s.images_found, s.resumed, s.extracted, s.skipped) == (13, 4, 8, [])
    assert s.skipped_before == [("aaa_empty.jpg", reason)]
    assert s.images_found == s.extracted + s.resumed + len(s.skipped) + len(s.skipped_before)
    report = s.report()
    assert "1 skipped before (not tried again)" in report[0], report
    assert f"  skipped before: {reason}" in report
    assert s.to_dict()["skipped_before"] == [{"image": "aaa_empty.jpg", "reason": reason}]
    again = extract_features(data, db, ExtractConfig(), ExtractOptions(append=True, **QUIET), extractor=_StandIn())
    assert (again.images_found, again.resumed, again.extracted, again.skipped) == (13, 12, 0, [])
    assert again.skipped_before == [("aaa_empty.jpg", reason)]


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over_in_silence(tmp_path, monkeypatch):
    """A sub-folder ris-extract could not list (no read permission) was passed over without a word:
    its images were simply not in the database. One warning line names it and the reason, and the
    summary counts it among what was not read (listed with --verbose; in --json)."""
    import os

    data = make_tiny_dataset(tmp_path / "d", n_objects=1, views=2, size=48)
    (data / "locked").mkdir()
    real = os.scandir

    def scandir(path="."):
        if Path(path) == data / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    said: list[str] = []
    s = extract_features(data, tmp_path / "f.h5", ExtractConfig(), ExtractOptions(progress=False, log=said.append),
                         extractor=_StandIn())
    assert f"warning: {data / 'locked'}: cannot list this folder (Permission denied); the images in it are not read" \
        in said, said
    assert s.unlisted_folders == ["locked/"] and s.to_dict()["unlisted_folders"] == ["locked/"]
    assert "not read: 1 folder that could not be listed (--verbose lists them)" in s.report()
    assert "  not read (cannot list): locked/" in s.report(verbose=True)
