"""libjpeg's warnings named by file (ris.jpeg_noise): attributed to the right image among
concurrent decodes, dropped from stderr; anything else written there is passed on."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from ris.images import decode_image
from ris.jpeg_noise import capture, decoded_noting, warnings_for


def _jpegs(tmp_path, n_good: int = 12):
    img = np.random.default_rng(0).integers(0, 255, (240, 320, 3)).astype(np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    good = [tmp_path / f"good{k}.jpg" for k in range(n_good)]
    for p in good:
        p.write_bytes(data)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[:-2] + b"\0" * 100 + data[-2:])
    return good, bad


def test_concurrent_decodes_name_only_the_damaged_jpeg(tmp_path, capfd):
    good, bad = _jpegs(tmp_path)
    paths = good[:6] + [bad] + good[6:]
    capfd.readouterr()
    with capture() as on:
        with ThreadPoolExecutor(4) as pool:
            images = list(pool.map(lambda p: decode_image(p, 32), paths))
        found = {p.name: warnings_for(p) for p in paths}
        assert warnings_for(bad) == []  # each is said once
    assert on and all(im.shape[2] == 3 for im in images)
    assert found.pop("bad.jpg")[0].startswith("corrupt JPEG data (") and not any(found.values()), found
    assert "Corrupt JPEG data" not in capfd.readouterr().err


def test_other_lines_written_to_stderr_meanwhile_are_passed_on(capfd):
    capfd.readouterr()
    with capture():
        os.write(2, b"a C library's notice\nCorrupt JPEG data: 3 extraneous bytes before marker 0xd9\n")
    assert capfd.readouterr().err == "a C library's notice\n"


def test_without_a_capture_decoding_is_as_before(tmp_path):
    _, bad = _jpegs(tmp_path, 0)
    assert decode_image(bad).shape == (240, 320, 3) and warnings_for(bad) == []


def test_a_capture_in_a_worker_thread_names_its_image_and_gives_stderr_back(tmp_path, capfd):
    """ris-serve decodes uploads (and a program using the API may query) in worker threads; a
    capture there was refused (main thread only), so libjpeg's line reached the log unnamed."""
    _, bad = _jpegs(tmp_path, 0)
    seen: dict = {}

    def work() -> None:
        with capture() as on:
            seen["shape"] = decode_image(bad).shape
            seen["on"], seen["found"] = on, warnings_for(bad)

    capfd.readouterr()
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    os.write(2, b"after\n")
    assert seen["on"] and seen["shape"] == (240, 320, 3) and seen["found"][0].startswith("corrupt JPEG data (")
    assert capfd.readouterr().err == "after\n"


def test_uploads_of_one_name_decoded_at_once_keep_their_own_warnings(tmp_path, capfd):
    """Overlapping captures of several threads share descriptor 2 (the last one out gives it back);
    an upload held in memory is keyed by its decode, not its name (phones send 'image.jpg')."""
    good, bad = _jpegs(tmp_path, 1)
    data = {"good": good[0].read_bytes(), "bad": bad.read_bytes()}

    def one(kind: str):
        img, warned = decoded_noting(lambda: cv2.imdecode(np.frombuffer(data[kind], np.uint8), cv2.IMREAD_COLOR))
        return kind, img.shape, warned

    capfd.readouterr()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, ["good", "bad", "good", "good"] * 6))
    os.write(2, b"after\n")
    said = {tuple(w) for kind, _, w in results if kind == "bad"}
    assert len(said) == 1 and len(next(iter(said))) == 1 and next(iter(said))[0].startswith("corrupt JPEG data (")
    assert all(shape == (240, 320, 3) for _, shape, _ in results)
    assert all(w == [] for kind, _, w in results if kind == "good")
    assert capfd.readouterr().err == "after\n"


def test_with_ris_verbose_a_damaged_jpeg_is_named_and_other_lines_come_as_they_are_written(tmp_path, capfd,
                                                                                             monkeypatch):
    """RIS_VERBOSE=1 left stderr alone: libjpeg's line came raw and unnamed ('Corrupt JPEG data: 84
    extraneous bytes before marker 0xd9'). The file is named as without it; what else C code writes
    (what RIS_VERBOSE is for) still reaches stderr while the capture runs, not only at its end."""
    import time

    monkeypatch.setenv("RIS_VERBOSE", "1")
    _, bad = _jpegs(tmp_path, 0)
    capfd.readouterr()
    with capture() as on:
        decode_image(bad, 32)
        os.write(2, b"a C library's notice\n")
        for _ in range(100):  # passed on by a thread beside the decodes
            if "notice" in capfd.readouterr().err:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the notice waited for the end of the capture")
        found = warnings_for(bad)
    assert on and len(found) == 1 and found[0].startswith("corrupt JPEG data ("), found
    assert "JPEG" not in capfd.readouterr().err


def test_two_threads_noting_the_same_damaged_file_at_once_each_get_its_warning(tmp_path, capfd):
    """Two queries of one path at once (ris-serve's workers, a program's threads over one engine):
    the first to end took the lines of both, so the other query's warning was never said."""
    from ris.jpeg_noise import noting

    _, bad = _jpegs(tmp_path, 0)
    both = threading.Barrier(2)
    said: dict[int, list[str]] = {}

    def query(n: int) -> None:
        with noting(bad) as found:
            both.wait(timeout=30)
            decode_image(bad, 32)
            both.wait(timeout=30)  # each decode is done before either block ends
        said[n] = found

    threads = [threading.Thread(target=query, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(said[0]) == len(said[1]) == 1 and said[0] == said[1], said
    assert said[0][0].startswith("corrupt JPEG data (")
    assert "JPEG" not in capfd.readouterr().err


def test_a_jpeg_of_an_unknown_jfif_revision_is_named_in_ris_words(tmp_path, capfd):
    """libjpeg's 'Warning: unknown JFIF revision number 2.01' (a JFIF header of major version 2,
    as some cameras and editors write) reached stderr unnamed, in ris-extract and ris-serve alike."""
    good, _ = _jpegs(tmp_path, 1)
    data = good[0].read_bytes()
    at = data.index(b"JFIF\0") + 5
    odd = tmp_path / "jfif2.jpg"
    odd.write_bytes(data[:at] + b"\x02" + data[at + 1:])
    capfd.readouterr()
    with capture():
        image = decode_image(odd, 32)
        found = warnings_for(odd)
    assert image.shape[2] == 3
    assert found == ["unknown JFIF revision number 2.01"], found
    assert "JFIF" not in capfd.readouterr().err
