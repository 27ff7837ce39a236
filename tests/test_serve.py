"""ris-serve's API: searches, files by row only, upload caps, API key, overload, reloads.

A tiny generated dataset and a random-init VGG16 at 64 px (no network) keep this fast; the page
in a real browser over real photos is tests/test_serve_browser.py.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ris-serve needs the serve extra: pip install 'ris[serve]'")
pytest.importorskip("httpx", reason="the API tests need httpx (the test extra)")
warnings.filterwarnings("ignore", message=".*httpx.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*httpx2.*")

from fastapi.testclient import TestClient  # noqa: E402

from ris.cli import serve as serve_cli  # noqa: E402
from ris.cli.common import run  # noqa: E402
from ris.extract import ExtractConfig, ExtractOptions, extract_features  # noqa: E402
from ris.search import SearchEngine  # noqa: E402
from ris.serve import SearchService, ServeConfig, create_app  # noqa: E402
from ris.serve.limits import Guard, Limiter, Overloaded  # noqa: E402
from ris.serve.process import ServerProcess  # noqa: E402
from ris.testing import _huge_png, make_bad_images, make_tiny_dataset  # noqa: E402

FAST = ExtractConfig(model="vgg16", weights="none", input_size=64)
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_tiny_dataset(root / "images", n_objects=6, views=4, size=96)
    db = root / "feats.h5"
    extract_features(data, db, FAST, ExtractOptions(labels="ukbench", progress=False, log=lambda s: None))
    return root, data, db


@pytest.fixture(scope="module")
def engine(tiny):
    return SearchEngine(tiny[2])


def client_for(engine, db, raise_server_exceptions: bool = True, **cfg) -> TestClient:
    svc = SearchService(ServeConfig(str(db), reload_interval=0, **cfg), log=lambda s: None)
    svc.use_engine(engine)
    return TestClient(create_app(svc), raise_server_exceptions=raise_server_exceptions)


@pytest.fixture()
def client(engine, tiny):
    with client_for(engine, tiny[2]) as c:
        yield c


def upload(c, data: bytes, name="q.jpg", headers=None, **fields):
    return c.post("/api/search", files={"image": (name, data, "application/octet-stream")},
                  data={k: str(v) for k, v in fields.items()}, headers=headers or {})


def sentence(r) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and "Traceback" not in detail
    return detail


# --- searching ------------------------------------------------------------------------------

def test_health_says_ready_with_size_model_dimension_index(client):
    h = client.get("/api/health").json()
    assert h["ready"] and h["status"] == "ready"
    assert (h["rows"], h["model"], h["dimension"], h["index"]) == (24, "vgg16", 512, "exact")
    assert h["rerank"][0] == "none" and "qe" in h["rerank"] and h["generation"] == 1


def test_upload_finds_the_objects_views_with_distances_labels_timing(client, tiny):
    r = upload(client, (tiny[1] / "ukbench00005.jpg").read_bytes(), k=6)
    assert r.status_code == 200, r.text
    out = r.json()
    hits = out["results"]
    assert len(hits) == 6 and [h["rank"] for h in hits] == list(range(1, 7))
    assert {h["id"] for h in hits[:4]} == {4, 5, 6, 7} and hits[0]["id"] == 5
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-4)  # decoded exactly as the database was
    assert all(a["distance"] <= b["distance"] for a, b in zip(hits, hits[1:]))
    assert hits[1]["label"] == "1" and hits[1]["path"].startswith("ukbench0000")
    assert hits[1]["thumb_url"] == f"/api/thumbs/{hits[1]['id']}"
    assert out["query"]["kind"] == "upload" and out["query"]["width"] == 96
    assert {"decode", "embed", "search", "total", "queue"} <= set(out["timing_ms"])


def test_rotations_find_a_turned_upload_as_its_original(tiny):
    """ris-serve --rotations: an upload turned by 90 degrees is described at 0/90/180/270 degrees,
    so the database image it was turned from comes back first at distance ~0 (as ris-search
    --rotations does); re-rankers whose scores cannot be compared across copies are not offered."""
    import cv2

    svc = SearchService(ServeConfig(str(tiny[2]), reload_interval=0, rotations=True), log=lambda s: None)
    svc.load()
    with TestClient(create_app(svc)) as c:
        h = c.get("/api/health").json()
        assert h["rotations"] is True and "diffusion" not in h["rerank"] and "kreciprocal" not in h["rerank"]
        assert "dba+qe" in h["rerank"]
        img = cv2.imread(str(tiny[1] / "ukbench00013.jpg"))
        turned = cv2.imencode(".png", cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE))[1].tobytes()
        hits = upload(c, turned, name="turned.png", k=4).json()["results"]
        assert hits[0]["id"] == 13 and hits[0]["distance"] == pytest.approx(0.0, abs=1e-3)
        assert upload(c, turned, name="turned.png", k=4, rerank="diffusion").status_code == 400
    with client_for(SearchEngine(tiny[2]), tiny[2]) as plain:
        assert plain.get("/api/health").json()["rotations"] is False


def test_one_search_asks_for_turned_copies_on_a_service_started_without_them(tiny, engine):
    """The page's "turned copies" box: a request's rotations field overrides the service's
    --rotations default for that upload only; a re-ranker whose scores cannot be compared across
    the copies is refused for it in one line, and stays offered for uploads without it."""
    import cv2

    img = cv2.imread(str(tiny[1] / "ukbench00013.jpg"))
    turned = cv2.imencode(".png", cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE))[1].tobytes()
    with client_for(engine, tiny[2]) as c:
        h = c.get("/api/health").json()
        assert h["rotations"] is False
        assert h["rerank_rotations"] == [m for m in h["rerank"] if m not in ("diffusion", "kreciprocal")]
        for method in h["rerank_rotations"]:  # what the page lets a search with turned copies use
            assert upload(c, turned, name="turned.png", k=4, rotations="true", rerank=method).status_code == 200
        asked = upload(c, turned, name="turned.png", k=4, rotations="true").json()
        assert asked["rotations"] is True
        assert asked["results"][0]["id"] == 13 and asked["results"][0]["distance"] == pytest.approx(0.0, abs=1e-3)
        default = upload(c, turned, name="turned.png", k=4).json()
        assert default["rotations"] is False and default["results"][0]["distance"] > 1e-3
        refused = upload(c, turned, name="turned.png", k=4, rotations="true", rerank="diffusion")
        assert refused.status_code == 400 and "diffusion" in sentence(refused) and "turned" in sentence(refused)
        assert upload(c, turned, name="turned.png", k=4, rerank="diffusion").status_code == 200
        assert upload(c, turned, name="turned.png", k=4, rotations="maybe").status_code == 422


@pytest.mark.parametrize("kind,name", [("ivfpq", "ivfpq"), ("milvus:{tmp}/m.db", "milvus"), ("milvus://{server}", "milvus")],
                         ids=["ivfpq", "milvus-lite", "milvus-server"])
def test_the_service_searches_through_every_index_kind_of_ris_search(tiny, tmp_path, kind, name, request):
    """ris-serve --index takes what ris-search --index takes (it offered only auto/exact/hnsw), and
    the answers are the exact search's."""
    pytest.importorskip("faiss" if name == "ivfpq" else "pymilvus", reason=f"the {name} extra is not installed")
    server = request.getfixturevalue("milvus_server") if "{server}" in kind else ""
    spec = kind.format(tmp=tmp_path, server=server)
    assert serve_cli.build_parser().parse_args(["--index", spec]).index == spec
    db = tmp_path / "feats.h5"
    shutil.copy(tiny[2], db)
    svc = SearchService(ServeConfig(str(db), reload_interval=0, index=spec), log=lambda s: None)
    svc.load()
    with TestClient(create_app(svc)) as c, client_for(SearchEngine(db), db) as exact:
        assert c.get("/api/health").json()["index"] == name
        for row in (3, 17):
            got = [h["id"] for h in c.get("/api/search", params={"id": row, "k": 3}).json()["results"]]
            want = [h["id"] for h in exact.get("/api/search", params={"id": row, "k": 3}).json()["results"]]
            assert got == want


def test_search_by_id_is_more_like_this_without_the_query(client):
    out = client.get("/api/search", params={"id": 9, "k": 5}).json()
    ids = [h["id"] for h in out["results"]]
    assert 9 not in ids and set(ids[:3]) == {8, 10, 11}
    assert out["query"] == {"kind": "id", "id": 9, "path": "ukbench00009.jpg", "label": "2",
                            "image_url": "/api/images/9", "thumb_url": "/api/thumbs/9"}


def test_an_upload_of_two_images_is_refused_not_half_searched(client, tiny):
    """Two files in the field `image` (a form built in a loop, `curl -F image=@a.jpg -F image=@b.jpg`):
    the last was searched, silently, and the answer did not say which."""
    root, data, _ = tiny
    files = sorted(p for p in data.rglob("*.jpg"))[:2]
    r = client.post("/api/search", files=[("image", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
    assert r.status_code == 400, r.text
    assert sentence(r).startswith("the upload holds 2 files in the field image; send one")


def test_a_search_by_id_answers_the_same_fields_as_an_upload(client, tiny):
    """The README's answer has "rotations"; a search by id left it out, so a client reading it for
    every search failed on "more like this" answers."""
    by_id = client.get("/api/search", params={"id": 9, "k": 2}).json()
    uploaded = upload(client, (tiny[1] / "ukbench00009.jpg").read_bytes(), k=2).json()
    assert set(by_id) == set(uploaded), set(by_id) ^ set(uploaded)
    assert by_id["rotations"] is False


def test_engine_search_by_array_matches_search_by_file(engine, tiny):
    import cv2

    path = tiny[1] / "ukbench00005.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    by_file, by_array = engine.search(path, 5), engine.search(rgb, 5)
    assert [h.row for h in by_file] == [h.row for h in by_array]
    assert [h.image_id for h in engine.query(path, 5)] == [h.image_id for h in by_file]
    assert [h.row for h in engine.search_row(5, 3)] == [h.row for h in by_file[1:4]]


@pytest.mark.parametrize("method", ["qe", "dba+qe", "diffusion", "kreciprocal"])
def test_rerank_per_request(client, method):
    out = client.get("/api/search", params={"id": 0, "k": 3, "rerank": method}).json()
    assert out["rerank"] == method and {h["id"] for h in out["results"]} == {1, 2, 3}


def test_a_service_for_the_accurate_preset_re_ranks_every_search_by_default(engine, tiny):
    """ris-serve --preset accurate: a database made for dba+qe was searched without re-ranking by
    every request that did not ask (the page's menu started at none), unlike ris-search --preset
    accurate. The service's default re-ranker now answers a request that names none; a request
    may still ask for none; the default is offered even where 'auto' would not offer it."""
    args = serve_cli.build_parser().parse_args(["--preset", "accurate"])
    cfg = serve_cli.config_from_args(args, str(tiny[2]), None, rerank=args.rerank,
                                     default_rerank=args.default_rerank)
    assert cfg.default_rerank == "dba+qe"
    with client_for(engine, tiny[2], default_rerank="dba+qe", rerank=("qe",)) as c:
        health = c.get("/api/health").json()
        assert health["default_rerank"] == "dba+qe" and health["rerank"] == ["none", "qe", "dba+qe"]
        assert c.get("/api/search", params={"id": 0, "k": 3}).json()["rerank"] == "dba+qe"
        assert c.get("/api/search", params={"id": 0, "k": 3, "rerank": "none"}).json()["rerank"] == "none"
        img = (tiny[1] / "ukbench00013.jpg").read_bytes()
        assert upload(c, img, k=4).json()["rerank"] == "dba+qe"
    with client_for(engine, tiny[2]) as c:  # no preset: as before
        assert c.get("/api/health").json()["default_rerank"] == "none"
        assert c.get("/api/search", params={"id": 0, "k": 3}).json()["rerank"] == "none"


@pytest.mark.parametrize("flags,needle", [
    (["--default-rerank", "dba+qe", "--rerank", "qe"], "--default-rerank dba+qe is not among --rerank qe"),
    (["--default-rerank", "diffusion", "--rotations"], "--rotations does not work with --rerank diffusion"),
    (["--default-rerank", "bogus"], "invalid choice"),
])
def test_a_default_re_ranker_the_service_could_not_use_is_refused(tiny, flags, needle, capsys):
    from ris.errors import RisError

    try:
        args = serve_cli.build_parser().parse_args(flags)
        serve_cli.config_from_args(args, str(tiny[2]), None, rerank=args.rerank, default_rerank=args.default_rerank)
    except SystemExit:
        assert needle in capsys.readouterr().err
        return
    except RisError as exc:
        assert needle in str(exc)
        return
    raise AssertionError(f"{flags} accepted")


def test_bad_parameters_are_one_sentence(engine, tiny):
    with client_for(engine, tiny[2], rerank=("qe",)) as c:
        for params, status in (({"id": 0, "k": 0}, 422), ({"id": 0, "k": 101}, 422), ({"id": 0, "k": "x"}, 422),
                               ({"id": "x"}, 422), ({"id": 24}, 404), ({"id": -1}, 422),
                               ({"id": 0, "rerank": "diffusion"}, 400), ({"id": 0, "rerank": "bogus"}, 400)):
            r = c.get("/api/search", params=params)
            assert r.status_code == status, (params, r.text)
            sentence(r)
        assert "no image with id 24" in c.get("/api/search", params={"id": 24}).json()["detail"]
        assert c.get("/api/health").json()["rerank"] == ["none", "qe"]


# --- files by row only ------------------------------------------------------------------------

def test_images_and_thumbnails_by_row(client, tiny):
    import cv2

    r = client.get("/api/images/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (tiny[1] / "ukbench00003.jpg").read_bytes()
    t = client.get("/api/thumbs/3")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    thumb = cv2.imdecode(np.frombuffer(t.content, np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape[:2] == (96, 96)  # small images are not enlarged
    for bad in ("/api/images/24", "/api/thumbs/99999"):
        assert client.get(bad).status_code == 404


def test_a_negative_id_is_a_malformed_id_everywhere(client):
    """/api/images/-1 and /api/thumbs/-1 answered 404 (no such image) where /api/search?id=-1
    answered 422; the README says 422 for a bad id: an id is a whole number >= 0."""
    for url in ("/api/search?id=-1", "/api/images/-1", "/api/thumbs/-1", "/api/images/x", "/api/thumbs/1.5"):
        r = client.get(url)
        assert r.status_code == 422 and sentence(r).startswith("id: "), (url, r.text)


@pytest.mark.parametrize("url", [
    "/api/images/..%2F..%2F..%2Fetc%2Fpasswd", "/api/images/%2Fetc%2Fpasswd", "/api/images/../../etc/passwd",
    "/api/thumbs/..%2Fimages%2Fukbench00000.jpg", "/api/images/1%2F..%2F2", "/static/..%2F__init__.py",
    "/static/../app.py", "/api/images/ukbench00000.jpg", "/api/search?path=/etc/passwd",
])
def test_no_path_from_a_request_is_opened(client, url):
    r = client.get(url)
    assert r.status_code in (404, 422), (url, r.status_code)
    assert b"root:" not in r.content and b"import" not in r.content


def test_rows_whose_file_leaves_the_collection_are_refused(engine, tiny, tmp_path):
    root = tmp_path / "collection"
    root.mkdir()
    good = (tiny[1] / "ukbench00000.jpg").read_bytes()
    (root / "ok.jpg").write_bytes(good)
    (tmp_path / "outside.jpg").write_bytes(good)
    (root / "link_out.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "link_in.jpg").symlink_to(root / "ok.jpg")
    (root / "folder.jpg").mkdir()
    (root / "notes.txt").write_text("secret")
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would wait for a writer forever
    rows = ["ok.jpg", "../outside.jpg", "/etc/passwd", "link_out.jpg", "link_in.jpg", "folder.jpg",
            "notes.txt", "missing.jpg", "sub/../../outside.jpg", "pipe.jpg"]
    crafted = copy.copy(engine)  # the same vectors, a database whose paths were tampered with
    crafted.image_ids = rows + engine.image_ids[len(rows):]
    crafted.root = root
    with client_for(crafted, tiny[2]) as c:
        status = {rel: c.get(f"/api/images/{i}").status_code for i, rel in enumerate(rows)}
        thumbs = {rel: c.get(f"/api/thumbs/{i}").status_code for i, rel in enumerate(rows)}
        detail = sentence(c.get("/api/images/3"))
    assert status == {"ok.jpg": 200, "../outside.jpg": 403, "/etc/passwd": 403, "link_out.jpg": 403,
                      "link_in.jpg": 200, "folder.jpg": 403, "notes.txt": 403, "missing.jpg": 404,
                      "sub/../../outside.jpg": 403, "pipe.jpg": 403}
    assert thumbs == status
    assert "outside the collection" in detail and str(tmp_path) not in detail


def test_a_folder_swapped_for_a_link_out_after_the_check_is_not_followed(engine, tiny, tmp_path, monkeypatch):
    """The file's path was checked (resolved inside the collection), then opened by name: a folder
    of the collection replaced by a symlink out of it between the two (a race anyone who can write
    to the collection may run, request after request) had the server read the outside file."""
    from ris.serve import service

    root, outside = tmp_path / "collection", tmp_path / "outside"
    good = (tiny[1] / "ukbench00000.jpg").read_bytes()
    secret = (tiny[1] / "ukbench00001.jpg").read_bytes()
    for folder, data in ((root / "sub", good), (outside / "sub", secret)):
        folder.mkdir(parents=True)
        (folder / "a.jpg").write_bytes(data)
    checked = service.row_file

    def checked_then_swapped(*args):
        path = checked(*args)
        if not (root / "sub").is_symlink():
            (root / "sub").rename(root / "sub_was")
            (root / "sub").symlink_to(outside / "sub")
        return path

    monkeypatch.setattr(service, "row_file", checked_then_swapped)
    crafted = copy.copy(engine)
    crafted.image_ids = ["sub/a.jpg"] + engine.image_ids[1:]
    crafted.root = root
    with client_for(crafted, tiny[2]) as c:
        for url in ("/api/images/0", "/api/thumbs/0"):
            r = c.get(url)
            assert r.status_code == 403 and "changed on disk" in sentence(r), (url, r.text[:200])
            (root / "sub").unlink()
            (root / "sub_was").rename(root / "sub")


def test_a_file_removed_after_the_check_is_a_404_not_a_500(engine, tiny, tmp_path, monkeypatch):
    """The thumbnail's cache key came from a stat of its own, between the check and the open: a file
    removed then (a --sync under way) was a 500 'internal error (FileNotFoundError)'."""
    from ris.serve import service

    root = tmp_path / "collection"
    root.mkdir()
    shutil.copy(tiny[1] / "ukbench00000.jpg", root / "a.jpg")
    checked = service.row_file

    def checked_then_removed(*args):
        path = checked(*args)
        (root / "a.jpg").unlink(missing_ok=True)
        return path

    monkeypatch.setattr(service, "row_file", checked_then_removed)
    crafted = copy.copy(engine)
    crafted.image_ids = ["a.jpg"] + engine.image_ids[1:]
    crafted.root = root
    with client_for(crafted, tiny[2], raise_server_exceptions=False) as c:
        for url in ("/api/thumbs/0", "/api/images/0"):
            shutil.copy(tiny[1] / "ukbench00000.jpg", root / "a.jpg")
            r = c.get(url)
            assert r.status_code == 404 and "cannot be opened" in sentence(r), (url, r.text)


def test_a_file_name_with_a_backslash_is_served(engine, tiny, tmp_path):
    """A backslash is an ordinary character of a POSIX file name: ris-extract read 'a\\b.jpg' and
    the search found it, yet its image and thumbnail were refused (403 'not inside the collection')."""
    root = tmp_path / "collection"
    root.mkdir()
    data = (tiny[1] / "ukbench00000.jpg").read_bytes()
    (root / "a\\b.jpg").write_bytes(data)
    crafted = copy.copy(engine)
    crafted.image_ids = ["a\\b.jpg", "..\\a\\b.jpg"] + engine.image_ids[2:]
    crafted.root = root
    with client_for(crafted, tiny[2]) as c:
        r = c.get("/api/images/0")
        assert r.status_code == 200 and r.content == data, r.text
        assert c.get("/api/thumbs/0").status_code == 200
        assert c.get("/api/images/1").status_code == 404  # a name of its own, not a way up: not on disk


# --- uploads ------------------------------------------------------------------------------

def test_unfit_uploads_get_4xx_with_the_reason(client, tmp_path, monkeypatch):
    bad = make_bad_images(tmp_path)
    expect = {"text_as_jpg": (415, "not an image"), "zero_byte": (400, "empty"),
              "truncated": (400, "truncated"), "corrupt": (400, "damaged JPEG")}
    for key, (status, words) in expect.items():
        r = upload(client, bad[key].read_bytes(), bad[key].name)
        assert r.status_code == status and words in sentence(r), (key, r.text)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "ICO")
    ico = upload(client, buf.getvalue(), "a.ico")
    assert ico.status_code == 415 and sentence(ico).startswith("a.ico is an ICO image;")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")  # what ris-extract reads is searchable
    assert upload(client, buf.getvalue(), "a.gif", k=2).status_code == 200
    assert "../../etc" not in sentence(upload(client, b"text", "../../etc/x.jpg"))
    for key in ("gray_png", "rgba_png", "png16", "webp", "bmp", "tif", "non_ascii", "upper_ext"):
        assert upload(client, bad[key].read_bytes(), bad[key].name, k=2).status_code == 200, key


def test_an_upload_that_is_not_a_multipart_file_is_one_sentence(client):
    """A form-urlencoded body (a text field where the file should be) answered 422 "Expected
    UploadFile, received: <class 'str'>": a Python type name, no advice."""
    for r, status in ((client.post("/api/search", data={"image": "photo.jpg"}), 415),
                      (client.post("/api/search", json={"image": "photo.jpg"}), 415),
                      (client.post("/api/search", content=b"\xff\xd8\xff", headers={"content-type": "image/jpeg"}), 415),
                      (client.post("/api/search"), 415),
                      (client.post("/api/search", files={"image": (None, "photo.jpg")}), 422),
                      (client.post("/api/search", files={"photo": ("q.jpg", b"x")}), 422),
                      (client.post("/api/search", content=b"--x--", headers={"content-type": "multipart/form-data; "
                                                                                         "boundary=b"}), 400)):
        text = sentence(r)
        assert r.status_code == status, r.text
        assert "multipart/form-data" in text and "named image" in text, text
        assert "class" not in text and "UploadFile" not in text, text


def test_a_multipart_content_type_without_its_boundary_says_so_and_how(client, tiny):
    """A Content-Type of multipart/form-data set by hand (requests' files= with that header: the
    header loses the boundary the body uses) answered Starlette's bare "Missing boundary in
    multipart.", with no word on the cause or what to send."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n\r\n"
            + (tiny[1] / "ukbench00000.jpg").read_bytes() + b"\r\n--b--\r\n")
    r = client.post("/api/search", content=body, headers={"content-type": "multipart/form-data"})
    text = sentence(r)
    assert r.status_code == 400, r.text
    assert "boundary" in text and "Content-Type" in text and "named image" in text, text


def test_a_malformed_upload_leaves_the_server_log_alone(client, caplog):
    """python-multipart logged each malformed body to the server's stderr ('Expected boundary
    character 45, got 255 at index 2': no prefix, no client), beside the 400 that already says it,
    so any client could fill the log with such lines."""
    import logging

    caplog.set_level(logging.INFO)
    r = client.post("/api/search", content=b"\xff\xd8\xff" * 100,
                    headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 400 and "malformed" in sentence(r)
    assert [rec.getMessage() for rec in caplog.records if "multipart" in rec.name] == []


def test_a_long_file_name_is_accepted_and_shown_short(client, tiny):
    """A 5,000-character file name got 400 "Invalid multipart data." (python-multipart's 4 kB limit
    on a part's header line); the name is not needed to search. One beyond 64 kB is refused in one
    sentence that names the reason."""
    jpeg = (tiny[1] / "ukbench00005.jpg").read_bytes()
    r = upload(client, jpeg, name="a" * 5000 + ".jpg", k=2)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == 5 and len(r.json()["query"]["filename"]) <= 80
    r = upload(client, jpeg, name="b" * 70_000 + ".jpg", k=2)
    assert r.status_code == 400 and "file name" in sentence(r) and "Invalid multipart" not in sentence(r)


def test_a_truncated_tiff_upload_is_one_sentence_and_leaves_the_server_log_alone(client, capfd):
    """A TIFF cut short made Pillow warn 'TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data'
    (two lines, a source path) into the server's log for each such upload, beside the 4xx answer."""
    import cv2

    ok, buf = cv2.imencode(".tif", np.random.default_rng(3).integers(0, 65535, (60, 80, 3), dtype=np.uint16))
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, recorded
        r = upload(client, buf.tobytes()[: len(buf) // 2], "cut.tif")
    assert r.status_code in (400, 415) and sentence(r).startswith("cut.tif ")
    assert [str(w.message) for w in caught] == [] and capfd.readouterr().err == ""


def _damaged(jpeg: bytes) -> bytes:
    """90 bytes of junk before the end marker: it decodes, and libjpeg warns 'Corrupt JPEG data: N
    extraneous bytes before marker 0xd9' (N as libjpeg counts them)."""
    return jpeg[:-2] + bytes(range(1, 91)) + jpeg[-2:]


def test_a_damaged_jpeg_upload_is_named_in_the_log_and_in_the_answer(engine, tiny, capfd):
    """libjpeg printed its own line into the server's log, unnamed ('Corrupt JPEG data: 87
    extraneous bytes before marker 0xd9'), for an upload with junk before its end marker; ris-extract
    names such files. The log now names the upload, and the answer carries the warning."""
    import re

    logged: list[str] = []
    svc = SearchService(ServeConfig(str(tiny[2]), reload_interval=0), log=logged.append)
    svc.use_engine(engine)
    jpeg = (tiny[1] / "ukbench00005.jpg").read_bytes()
    with TestClient(create_app(svc)) as c:
        clean = upload(c, jpeg, "image.jpg", k=4)
        capfd.readouterr()
        r = upload(c, _damaged(jpeg), "image.jpg", k=4)
    assert r.status_code == 200 and clean.status_code == 200, r.text
    assert r.json()["results"] == clean.json()["results"] and "warnings" not in clean.json()["query"]
    warned = r.json()["query"]["warnings"]
    assert len(warned) == 1 and re.fullmatch(r"corrupt JPEG data \(\d+ extraneous bytes before marker 0xd9\)",
                                             warned[0]), warned
    assert logged == [f"ris-serve: warning: image.jpg: {warned[0]}"]
    assert "Corrupt JPEG data" not in capfd.readouterr().err


def test_a_damaged_stored_jpeg_gets_its_thumbnail_without_libjpegs_line_in_the_log(tiny, tmp_path, capfd):
    """A database image with junk before its end marker (named by ris-extract when it was described)
    printed libjpeg's unnamed line into the server's log when its thumbnail was made."""
    data, db, _ = _served_copy(tiny, tmp_path, reload_interval=0)
    (data / "ukbench00003.jpg").write_bytes(_damaged((data / "ukbench00003.jpg").read_bytes()))
    svc = SearchService(ServeConfig(str(db), dataset_root=str(data), reload_interval=0), log=lambda s: None)
    svc.load()
    with TestClient(create_app(svc)) as c:
        capfd.readouterr()
        assert c.get("/api/thumbs/3").status_code == 200
    assert "Corrupt JPEG data" not in capfd.readouterr().err


def test_a_damaged_database_jpeg_is_named_in_the_log_when_a_shallow_heads_thumbnails_are_made(tiny, tmp_path,
                                                                                                capfd):
    """A head with a thumbnail branch (ris-train --shallow) makes the database's thumbnails when the
    service loads it: a damaged JPEG among them printed libjpeg's unnamed line into the log. The log
    names it once, with the server's prefix."""
    import re

    pytest.importorskip("keras")
    from ris.train import TrainConfig, train_head

    data, db, _ = _served_copy(tiny, tmp_path, reload_interval=0)
    model = tmp_path / "h.keras"
    train_head(db, model, TrainConfig(arch="mlp", shallow=8, epochs=1, hidden=(8,), out_dim=8, p=2, k=2),
               progress=False, log=lambda s: None)
    Path(f"{db}.thumbs8.h5").unlink()  # made again when the service loads the head
    (data / "ukbench00003.jpg").write_bytes(_damaged((data / "ukbench00003.jpg").read_bytes()))
    logged: list[str] = []
    capfd.readouterr()
    svc = SearchService(ServeConfig(str(db), model=str(model), dataset_root=str(data), reload_interval=0),
                        log=logged.append)
    svc.load()
    said = [line for line in logged if "JPEG" in line]
    assert len(said) == 1 and re.fullmatch(rf"ris-serve: warning: {re.escape(str(data / 'ukbench00003.jpg'))}: "
                                           r"corrupt JPEG data \(\d+ extraneous bytes before marker 0xd9\)",
                                           said[0]), logged
    assert "JPEG" not in capfd.readouterr().err


@pytest.mark.parametrize("ext,shown", [(".tif", "TIFF"), (".webp", "WebP"), (".bmp", "BMP")])
def test_an_upload_cut_short_in_its_header_is_a_damaged_image_of_its_format(client, ext, shown):
    """A TIFF or WebP cut short got 415 'cut.tif is not an image; send a JPEG, PNG, GIF, BMP, WebP or
    TIFF file': its format is known from its first bytes, so it is a damaged one (400)."""
    import cv2

    ok, buf = cv2.imencode(ext, np.random.default_rng(4).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    data = buf.tobytes()
    cut = data[:40] if ext == ".webp" else data[:len(data) // 2]
    r = upload(client, cut, f"cut{ext}")
    if r.status_code == 400 and "cannot decode" in sentence(r):  # the header was whole: the decoder said why
        return
    assert r.status_code == 400 and sentence(r) == f"cut{ext} is a damaged {shown} file (its header cannot be read).", r.text


def test_a_turned_phone_photo_is_described_as_it_is_shown(client, tiny):
    """A photo stored landscape with EXIF orientation 6 (a phone held upright) is decoded and
    searched upright, as the page shows it, yet the answer gave the stored width and height: the page
    said "96 x 64" under a 64 px wide, 96 px tall picture."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(tiny[1] / "ukbench00000.jpg").resize((96, 64)).save(buf, "JPEG", exif=exif.tobytes())
    query = upload(client, buf.getvalue(), "upright.jpg", k=1).json()["query"]
    assert (query["width"], query["height"]) == (64, 96), query


def test_a_heic_upload_is_named_for_what_it_is(client):
    """An iPhone photo (HEIC) got 415 'IMG_0001.jpg is not an image': it is one, of a format the
    service does not take."""
    r = upload(client, b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200), "IMG_0001.jpg")
    assert r.status_code == 415
    assert sentence(r) == "IMG_0001.jpg is a HEIC image; send a JPEG, PNG, GIF, BMP, WebP or TIFF file."


def test_pixel_bombs_are_refused_from_the_header_without_decoding(client, monkeypatch):
    import cv2

    import ris.images

    def no_decoding(*a, **k):
        raise AssertionError("a refused image was decoded")

    for module, name in ((cv2, "imdecode"), (ris.images, "_pillow_decode"), (ris.images, "_opencv_decode")):
        monkeypatch.setattr(module, name, no_decoding)
    big = upload(client, _huge_png(8000), "big.png")  # 64 MP, a 60 kB file
    assert big.status_code == 413 and "8000 x 8000 pixels" in sentence(big)
    bomb = upload(client, _huge_png(20000), "bomb.png")  # 400 MP: 1.2 GB decoded
    assert bomb.status_code == 413 and "20000 x 20000 pixels" in sentence(bomb)
    huge = upload(client, _huge_png(60000), "huge.png")  # over Pillow's own refusal: the same limit is named
    assert huge.status_code == 413 and "over the limit of 50,000,000 pixels" in sentence(huge)


def test_a_bomb_over_pillows_own_limit_is_named_by_its_real_size(client):
    """An upload over Pillow's own refusal (2 x MAX_PIXELS) was refused saying 'its header says over
    400,000,000', not its size: it is named width x height, as a smaller one is, from its header (a
    PNG's IHDR, or the header Pillow's format plugin reads, here a BMP's)."""
    import struct

    from ris.testing import _png_chunk

    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", b"x") + _png_chunk(b"IEND", b""))
    r = upload(client, png, "huge.png")
    assert r.status_code == 413
    assert sentence(r) == "huge.png is 60000 x 60000 pixels, over the limit of 50,000,000 pixels."
    bmp = (b"BM" + struct.pack("<IHHI", 1000, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 70000, 65000, 1, 24, 0, 0,
                                                                       2835, 2835, 0, 0) + bytes(64))
    r = upload(client, bmp, "huge.bmp")
    assert r.status_code == 413
    assert sentence(r) == "huge.bmp is 70000 x 65000 pixels, over the limit of 50,000,000 pixels."


def test_upload_over_the_byte_cap_is_413(engine, tiny):
    with client_for(engine, tiny[2], max_upload_bytes=20_000) as c:
        r = upload(c, os.urandom(120_000), "big.jpg")
        assert r.status_code == 413 and "0.02 MB" in sentence(r)
        assert upload(c, (tiny[1] / "ukbench00000.jpg").read_bytes()).status_code == 200


def test_byte_cap_is_enforced_while_the_body_streams():
    """The guard stops reading at the first chunk past the cap, whatever the app would do."""
    pulled = []
    sent = []

    async def app(scope, receive, send):  # reads everything it is given, like a form parser
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # endless, no length

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/search", "headers": []}
    asyncio.run(Guard(app, max_body=10_000)(scope, receive, send))
    assert len(pulled) == 11 and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["detail"].startswith("request body over")
    sent.clear()
    pulled.clear()
    declared = {**scope, "headers": [(b"content-length", b"999999999")]}
    asyncio.run(Guard(app, max_body=10_000)(declared, receive, send))
    assert pulled == [] and sent[0]["status"] == 413  # refused before a byte is read


# --- API key --------------------------------------------------------------------------------

def test_api_key_guards_every_api_call_but_not_the_page(engine, tiny):
    with client_for(engine, tiny[2], api_key=KEY) as c:
        for url in ("/api/health", "/api/search?id=0", "/api/images/0", "/api/thumbs/0"):
            r = c.get(url)
            assert r.status_code == 401 and "API key" in sentence(r), url
            assert c.get(url, headers={"X-API-Key": "wrong"}).status_code == 401
            assert c.get(url, headers={"X-API-Key": KEY}).status_code == 200, url
            assert c.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, url
        assert upload(c, (tiny[1] / "ukbench00000.jpg").read_bytes()).status_code == 401
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("flags, allowed", [([], True), (["--host", "localhost"], True),
                                            (["--host", "0.0.0.0"], False), (["--allow-host", "*"], False)])
def test_a_loopback_server_answers_only_requests_addressed_to_it(engine, tiny, flags, allowed):
    """On 127.0.0.1 without a key (the default) the server answered a request whatever its Host
    named: a web page on another site whose name it points at 127.0.0.1 (DNS rebinding) is then
    the same origin as the server and can read the collection's images and searches. Now a loopback
    server answers only a Host of localhost or an IP address (and names given with --allow-host)."""
    args = serve_cli.build_parser().parse_args(["--features-db", "x.h5", *flags])
    cfg = serve_cli.config_from_args(args, "x.h5", None)
    assert (cfg.allowed_hosts is not None) == allowed
    with client_for(engine, tiny[2], allowed_hosts=cfg.allowed_hosts) as c:
        for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example"):
            for url in ("/api/images/3", "/api/search?id=3", "/api/health", "/", "/static/app.js"):
                r = c.get(url, headers={"Host": host})
                if allowed:
                    assert r.status_code == 403 and "--allow-host" in sentence(r), (host, url, r.text[:100])
                    assert b"JFIF" not in r.content and b"results" not in r.content
                else:
                    assert r.status_code == 200, (host, url)
        for host in ("127.0.0.1:8000", "localhost:8000", "localhost", "[::1]:8000", "app.localhost:8000",
                     "192.168.1.20:8000", "LOCALHOST"):
            assert c.get("/api/images/3", headers={"Host": host}).status_code == 200, host
    args = serve_cli.build_parser().parse_args(["--allow-host", "photos.lan,Other.example", *flags])
    if allowed:
        with client_for(engine, tiny[2], allowed_hosts=serve_cli.config_from_args(args, "x.h5", None).allowed_hosts) as c:
            assert c.get("/api/images/3", headers={"Host": "photos.lan:8000"}).status_code == 200
            assert c.get("/api/images/3", headers={"Host": "other.example"}).status_code == 200
            assert c.get("/api/images/3", headers={"Host": "attacker.example"}).status_code == 403


def test_the_page_has_its_security_headers_at_every_address(client):
    """/static/index.html served the page without the Content-Security-Policy (frame-ancestors
    'none': no framing) and the other headers that / sends."""
    page = client.get("/")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for url in ("/static/index.html", "/static/app.js", "/static/style.css"):
        for r in (client.get(url), client.head(url)):
            assert r.status_code == 200, url
            for name in ("content-security-policy", "x-content-type-options", "referrer-policy"):
                assert r.headers.get(name) == page.headers[name], (url, name)


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("RIS_API_KEY", KEY)
    args = serve_cli.build_parser().parse_args(["--features-db", "x.h5"])
    assert serve_cli.config_from_args(args, "x.h5", None).api_key == KEY
    args = serve_cli.build_parser().parse_args(["--api-key", "other"])
    assert serve_cli.config_from_args(args, "x.h5", None).api_key == "other"


@pytest.mark.parametrize("key", ["clé", "two words\t", "x\ny"])
def test_an_api_key_a_header_cannot_carry_is_refused_at_start(monkeypatch, key):
    """A non-ASCII key was accepted; clients sending it as UTF-8 (curl in a UTF-8 shell) got 401
    'wrong API key' for ever, only Latin-1 bytes matched (HTTP headers are read as Latin-1)."""
    from ris.errors import RisError

    monkeypatch.setenv("RIS_API_KEY", key)
    args = serve_cli.build_parser().parse_args(["--features-db", "x.h5"])
    with pytest.raises(RisError, match="API key.*printable ASCII"):
        serve_cli.config_from_args(args, "x.h5", None)


def test_head_answers_where_get_does(client):
    """The README: the GET endpoints answer HEAD too; GET /api/search?id= answered 405."""
    r = client.head("/api/search", params={"id": 1, "k": 2})
    assert r.status_code == 200 and r.content == b""


def test_a_stored_image_that_no_longer_decodes_is_named_as_stored_not_as_an_upload(tiny, tmp_path):
    """Its thumbnail said '... is not an image; send a JPEG, PNG, ...', the upload's advice."""
    data, db, _ = _served_copy(tiny, tmp_path, reload_interval=0)
    (data / "ukbench00003.jpg").write_bytes(b"garbage")
    svc = SearchService(ServeConfig(str(db), dataset_root=str(data), reload_interval=0), log=lambda s: None)
    svc.load()
    with TestClient(create_app(svc)) as c:
        r = c.get("/api/thumbs/3")
        assert r.status_code == 422 and "ukbench00003.jpg" in sentence(r) and "stored" in sentence(r)
        assert "send" not in sentence(r)


# --- overload and failures ------------------------------------------------------------------

def test_limiter_refuses_at_once_when_slots_and_queue_are_full():
    async def scenario():
        lim = Limiter(slots=1, queue=1, timeout=5)
        release = asyncio.Event()

        async def hold():
            async with lim.slot():
                await release.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0)
        second = asyncio.create_task(hold())  # waits in the queue
        await asyncio.sleep(0)
        assert (lim.running, lim.waiting) == (1, 1)
        with pytest.raises(Overloaded):
            async with lim.slot():
                pass
        release.set()
        await asyncio.gather(first, second)
        assert (lim.running, lim.waiting, lim.refused) == (0, 0, 1)
        short = Limiter(slots=1, queue=4, timeout=0.01)
        async with short.slot():
            with pytest.raises(Overloaded, match="within"):
                async with short.slot():
                    pass
        # a client that goes away while waiting (its task cancelled) leaves no slot taken
        release.clear()
        gone = asyncio.create_task(hold())
        blocked = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        assert (lim.running, lim.waiting) == (1, 1)
        blocked.cancel()
        await asyncio.gather(blocked, return_exceptions=True)
        assert lim.waiting == 0
        release.set()
        await gone
        assert lim.running == 0
        async with lim.slot():
            assert lim.running == 1

    asyncio.run(scenario())


def test_overload_is_a_quick_503_and_the_server_recovers(engine, tiny):
    with client_for(engine, tiny[2], slots=1, queue=0) as c:
        svc = c.app.app.state.service
        gate, entered = threading.Event(), threading.Event()
        real = svc.search_row

        def slow(*a, **k):
            entered.set()
            gate.wait(30)
            return real(*a, **k)

        svc.search_row = slow
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", c.get("/api/search?id=0")))
        t.start()
        assert entered.wait(30)
        busy = c.get("/api/search?id=1")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in sentence(busy)
        gate.set()
        t.join(30)
        assert first["r"].status_code == 200
        svc.search_row = real
        assert c.get("/api/search?id=1").status_code == 200


def test_a_failing_request_is_500_and_the_server_lives_on(engine, tiny):
    client = client_for(engine, tiny[2], raise_server_exceptions=False)  # the server logs it; the client gets 500
    svc = client.app.app.state.service

    def broken(*a, **k):
        raise RuntimeError("boom")

    real, svc.search_row = svc.search_row, broken
    try:
        r = client.get("/api/search?id=0")
    finally:
        svc.search_row = real
    assert r.status_code == 500 and "still running" in sentence(r)
    assert client.get("/api/search?id=0").status_code == 200


def test_not_ready_until_loaded(tiny):
    gate = threading.Event()

    class Slow(SearchService):
        def load(self):
            gate.wait(60)
            return super().load()

    svc = Slow(ServeConfig(str(tiny[2]), reload_interval=0), log=lambda s: None)
    ready = threading.Event()
    with TestClient(create_app(svc, on_ready=lambda s: ready.set())) as c:
        h = c.get("/api/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        assert int(h.headers["retry-after"]) > 0  # as the busy 503s say when to come back (it was missing)
        for r in (c.get("/api/search?id=0"), c.get("/api/images/0"), c.post("/api/search", files={"image": ("q.jpg", b"x")})):
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0 and "loading" in sentence(r)
        gate.set()
        assert ready.wait(120)
        assert c.get("/api/health").json()["status"] == "ready"


def test_a_database_that_fails_to_load_is_reported(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    fatal = []
    done = threading.Event()
    svc = SearchService(ServeConfig(str(bad), reload_interval=0), log=lambda s: None)
    app = create_app(svc, on_fatal=lambda m: (fatal.append(m), done.set()))
    with TestClient(app) as c:
        assert done.wait(60)
        h = c.get("/api/health")
        assert h.status_code == 503 and h.json()["status"] == "failed" and "retry-after" not in h.headers
    assert "bad.h5" in fatal[0]


# --- growing collections ------------------------------------------------------------------

def _append_object(data: Path, db: Path, seed: int, first: int) -> list[str]:
    extra = make_tiny_dataset(data.parent / f"extra{seed}", n_objects=1, views=4, size=96, seed=seed)
    names = []
    for k, src in enumerate(sorted(extra.glob("*.jpg"))):
        names.append(f"ukbench{first + k:05d}.jpg")
        shutil.copy(src, data / names[-1])
    extract_features(data, db, FAST, ExtractOptions(labels="ukbench", append=True, progress=False,
                                                    log=lambda s: None))
    return names


def _served_copy(tiny, tmp_path, **cfg):
    """(images, database, loaded service) over copies of the tiny set, free to be changed by a test."""
    data = tmp_path / "images"
    shutil.copytree(tiny[1], data)
    db = tmp_path / "feats.h5"
    shutil.copy(tiny[2], db)
    svc = SearchService(ServeConfig(str(db), **cfg), log=lambda s: None)
    svc.load()
    return data, db, svc


def test_appended_rows_become_searchable_without_restart(tiny, tmp_path):
    data, db, svc = _served_copy(tiny, tmp_path, index="hnsw", reload_interval=0)
    assert svc.poll() is False  # unchanged file: nothing to do
    with TestClient(create_app(svc)) as c:
        assert c.get("/api/health").json()["index"] == "hnsw"
        old = svc.current.engine
        names = _append_object(data, db, seed=11, first=24)
        assert c.get("/api/health").json()["rows"] == 24  # not yet looked
        assert svc.poll() is True
        h = c.get("/api/health").json()
        assert (h["rows"], h["generation"], h["index"]) == (28, 2, "hnsw")
        assert svc.current.engine.extractor is old.extractor  # the backbone is not loaded again
        out = upload(c, (data / names[1]).read_bytes(), k=4).json()
        assert {r["id"] for r in out["results"]} == {24, 25, 26, 27}
        assert c.get("/api/thumbs/26").status_code == 200
        from ris.index import HnswIndex, index_path_for

        assert len(HnswIndex.load(index_path_for(str(db)))) == 28  # the saved index followed

        broken = tmp_path / "broken.h5"  # a database replaced by garbage: keep serving the old rows
        broken.write_bytes(b"garbage")
        os.replace(broken, db)
        assert svc.poll() is False and svc.poll() is False  # not retried until the file changes again
        h = c.get("/api/health").json()
        assert h["rows"] == 28 and h["reload_error"]
        assert "feats.h5" in h["reload_error"] and str(tmp_path) not in h["reload_error"]  # no server folders
        assert c.get("/api/search?id=27").status_code == 200


def test_a_database_copied_over_in_place_is_reloaded_and_never_served_stale(tiny, tmp_path):
    """``cp other.h5 feats.h5`` rewrites the served file in place (same inode): searches went on
    answering 200 from rows read out of the rewritten file (other images' distances), and every
    reload failed ('Expected global heap object size does not match': HDF5 shared the open file's
    cached metadata with the new open) until a restart."""
    data, db, svc = _served_copy(tiny, tmp_path, reload_interval=0)
    other = tmp_path / "other.h5"
    shutil.copy(db, other)
    names = _append_object(data, other, seed=11, first=24)  # the same recipe, 28 rows
    with TestClient(create_app(svc)) as c:
        assert upload(c, (data / "ukbench00005.jpg").read_bytes(), k=3).status_code == 200
        inode = os.stat(db).st_ino
        shutil.copyfile(other, db)
        assert os.stat(db).st_ino == inode  # in place, not renamed into place
        svc.poll()
        h = c.get("/api/health").json()
        assert h["ready"] and h["rows"] == 28 and not h["reload_error"], h
        out = upload(c, (data / names[1]).read_bytes(), k=4).json()
        assert {r["id"] for r in out["results"]} == {24, 25, 26, 27} and out["results"][0]["distance"] < 1e-3
        assert c.get("/api/search", params={"id": 5, "k": 3}).json()["query"]["path"] == "ukbench00005.jpg"
        with open(db, "r+b") as f:  # garbage written in place: withdrawn, and not loaded again and again
            f.truncate(0)
            f.write(b"garbage")
        assert svc.poll() is False
        r = c.get("/api/search", params={"id": 5, "k": 3})
        assert r.status_code == 503 and "rewritten in place" in sentence(r) and int(r.headers["retry-after"]) > 0
        assert c.get("/api/health").json()["status"] == "reloading"
        loads = []
        svc.load = lambda: loads.append(1)  # the backbone is not reloaded while the bytes stay the same
        assert svc.poll() is False and svc.poll() is False and loads == []
        shutil.copyfile(other, db)
        del svc.load
        assert svc.poll() is True and c.get("/api/health").json()["rows"] == 28


@pytest.mark.parametrize("kind", ["id", "upload"])
def test_a_search_under_way_when_the_file_is_rewritten_in_place_is_a_503_to_retry(tiny, tmp_path, kind):
    """A search running when the poll finds the file rewritten in place: the engine it used was
    closed under it, and it ended in a 500 'internal error' (or answered from rows read out of the
    rewritten file). It is now the withdrawn rows' 503, with Retry-After."""
    data, db, svc = _served_copy(tiny, tmp_path, reload_interval=0)
    with TestClient(create_app(svc)) as c:
        engine = svc.current.engine
        real = engine.neighbours

        def rewritten_meanwhile(*args, **kwargs):
            out = real(*args, **kwargs)
            with open(db, "r+b") as f:  # the file is rewritten in place while this search runs
                f.seek(0, os.SEEK_END)
                f.write(b"\0")
            svc.poll()  # the watcher withdraws the rows and closes this engine
            return out

        engine.neighbours = rewritten_meanwhile
        r = (c.get("/api/search", params={"id": 5, "k": 3}) if kind == "id"
             else upload(c, (data / "ukbench00005.jpg").read_bytes(), k=3))
        assert r.status_code == 503, r.text
        assert "rewritten in place" in sentence(r) and int(r.headers["retry-after"]) > 0


def test_ids_are_the_databases_stable_ids_so_links_survive_a_sync(tiny, tmp_path):
    """``/#id=N`` links are shared and results are clicked after the collection changed: ``id`` is
    the image's stable id (README "Collections change"), not its row, so after ``--sync`` removed
    earlier images the same id is the same image, and a removed image's id is 404, never another
    image's (it named row 10, which a sync had made another photo)."""
    from ris.featuredb import FeatureDB
    from ris.sync import remove_images

    data, db, svc = _served_copy(tiny, tmp_path, reload_interval=0)
    with TestClient(create_app(svc)) as c:
        before = c.get("/api/search", params={"id": 10, "k": 3}).json()
        picture = c.get("/api/images/10").content
        with FeatureDB(db) as f:
            gone = f.image_ids[:3] + [f.image_ids[5]]
        remove_images(db, gone)
        assert svc.poll() is True and c.get("/api/health").json()["rows"] == 20
        after = c.get("/api/search", params={"id": 10, "k": 3}).json()
        assert after["query"]["path"] == before["query"]["path"] == "ukbench00010.jpg"
        assert after["query"]["image_url"] == "/api/images/10" and c.get("/api/images/10").content == picture
        assert [h["id"] for h in after["results"]] == [h["id"] for h in before["results"]]
        assert [h["path"] for h in after["results"]] == [h["path"] for h in before["results"]]
        for hit in upload(c, (data / "ukbench00013.jpg").read_bytes(), k=20).json()["results"]:
            assert hit["path"] == f"ukbench{hit['id']:05d}.jpg"  # the tiny set's rows were named by number
            assert hit["image_url"] == f"/api/images/{hit['id']}"
        for removed in (0, 5):
            for url in (f"/api/search?id={removed}", f"/api/images/{removed}", f"/api/thumbs/{removed}"):
                r = c.get(url)
                assert r.status_code == 404 and f"no image with id {removed}" in sentence(r)


def test_names_in_any_script_or_not_text_at_all_are_served(tiny, tmp_path):
    """A file named in another script, or with bytes that are not UTF-8 (an old camera card), must
    not break the searches that rank it (500: JSON could not encode the surrogate-escaped name) nor
    its image (500: the Content-Disposition header was not Latin-1)."""
    from urllib.parse import quote

    data = tmp_path / "images"
    shutil.copytree(tiny[1], data)
    names = {"ukbench00000.jpg": "中文写真.jpg", "ukbench00001.jpg": "café ü.jpg",
             "ukbench00002.jpg": os.fsdecode(b"bad\xff\xfename.jpg")}
    for old, new in names.items():
        os.rename(data / old, data / new)
    db = tmp_path / "feats.h5"
    extract_features(data, db, FAST, ExtractOptions(progress=False, log=lambda s: None))
    svc = SearchService(ServeConfig(str(db), reload_interval=0), log=lambda s: None)
    svc.load()
    with TestClient(create_app(svc)) as c:
        r = upload(c, (data / "ukbench00003.jpg").read_bytes(), k=24)
        assert r.status_code == 200, r.text
        by_path = {h["path"]: h["id"] for h in r.json()["results"]}
        assert {"中文写真.jpg", "café ü.jpg", "bad\ufffd\ufffdname.jpg"} <= set(by_path)
        for shown, raw in (("中文写真.jpg", "中文写真.jpg"), ("café ü.jpg", "café ü.jpg"),
                           ("bad\ufffd\ufffdname.jpg", names["ukbench00002.jpg"])):
            got = c.get(f"/api/images/{by_path[shown]}")
            assert got.status_code == 200 and got.content == (data / raw).read_bytes()
            disposition = got.headers["content-disposition"]
            assert disposition.isascii() and f"filename*=UTF-8''{quote(shown, safe='')}" in disposition
            assert c.get(f"/api/search?id={by_path[shown]}&k=24").status_code == 200


def test_get_endpoints_answer_head_too(client):
    """Health checks and link checkers send HEAD (it was 405)."""
    for url in ("/api/health", "/", "/api/images/3", "/api/thumbs/3"):
        got, head = client.get(url), client.head(url)
        assert head.status_code == got.status_code == 200, url
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


def test_the_background_watcher_reloads(tiny, tmp_path):
    data, db, svc = _served_copy(tiny, tmp_path, reload_interval=0.1)
    with TestClient(create_app(svc)) as c:
        _append_object(data, db, seed=12, first=24)
        deadline = time.monotonic() + 120
        while c.get("/api/health").json()["rows"] != 28 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/api/health").json()["rows"] == 28
        assert c.get("/api/search", params={"id": 25, "k": 3}).status_code == 200


# --- the command -------------------------------------------------------------------------------

def test_help_explains_every_flag():
    from ris.cli import demo as demo_cli

    for parser in (serve_cli.build_parser(), demo_cli.build_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings} has no help"
        assert "(default: None)" not in parser.format_help()
    assert "--serve" in demo_cli.build_parser().format_help()
    timeout = next(a.help for a in serve_cli.build_parser()._actions if "--request-timeout" in a.option_strings)
    assert "upload" in timeout and "silent" in timeout  # what it bounds of an upload: its silences
    rate = next(a.help for a in serve_cli.build_parser()._actions if "--min-upload-rate" in a.option_strings)
    assert "kB/s" in rate and "20 MB" in rate  # the floor, with what it allows a full-size upload


def test_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path):
    for argv, words in ((["--features-db", str(tmp_path / "none.h5")], "not found"),
                        (["--features-db", "x.h5", "--rerank", "bogus"], "unknown method"),
                        (["--features-db", "x.h5", "-k", "20", "--max-k", "10"], "over --max-k"),
                        (["--features-db", "x.h5", "--index", "milvus://127.0.0.1:19530", "--max-k", "20000"],
                         "over what a Milvus server gives per query (16384"),
                        (["--features-db", "x.h5", "--rotations", "--rerank", "qe,diffusion"], "normalised per query")):
        assert run("ris-serve", serve_cli.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ris-serve: error:") and words in err and len(err.splitlines()) == 1
    for argv in (["--slots", "0"], ["--port", "-1"], ["--max-upload-mb", "0"], ["--queue-timeout", "nan"]):
        with pytest.raises(SystemExit) as stop:  # refused by argparse: usage, then one error line
            serve_cli.build_parser().parse_args(argv)
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ris-serve: error: argument")


@pytest.mark.slow
@pytest.mark.parametrize("stall", [b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", b"",
                                   b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                                   b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"])
def test_stalled_clients_are_dropped_so_they_cannot_hold_every_connection(tiny, stall):
    """Connections that sent part of a request (headers or body), or nothing, and then went
    silent held their --max-connections slots for ever: a few of them and every client got 503,
    API key or not."""
    import socket
    import time

    import httpx

    server = ServerProcess(["--features-db", str(tiny[2]), "--port", "0", "--max-connections", "3",
                            "--request-timeout", "2", "--reload-interval", "0"])
    try:
        host, port = server.url.split("//")[1].rsplit(":", 1)
        stalled = []
        # uvicorn counts connections when a request's headers are complete: a request whose headers
        # arrive while 3 are open is answered 503 and closed, so 2 stalled bodies hold the rest
        for _ in range(2 if stall.startswith(b"POST") else 3):
            stalled.append(socket.create_connection((host, int(port))))
            stalled[-1].sendall(stall)
            time.sleep(0.2)
        time.sleep(0.3)
        full = httpx.get(server.url + "/api/health", timeout=10)  # every slot held now ...
        assert full.status_code == 503 and "connections" in full.json()["detail"]  # the API's error shape
        assert full.headers["retry-after"]
        time.sleep(3)
        assert httpx.get(server.url + "/api/health", timeout=10).status_code == 200  # ... and dropped
        for s in stalled:
            s.close()
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_a_slow_upload_that_keeps_coming_is_taken_and_a_trickle_is_cut(tiny):
    """--request-timeout bounded the whole request, upload included: a client sending steadily at
    333 kB/s had its 20 MB photo cut at 60 s. Now it bounds the headers and each silence; the body
    only has to average --min-upload-rate. Here: a 2 s timeout, an upload that takes ~5 s at
    ~20 kB/s (20 x the 1 kB/s floor) is answered; one at ~40 B/s is closed."""
    import socket
    import time

    img = (tiny[1] / "ukbench00002.jpg").read_bytes()
    body = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + img + b'\r\n--b\r\nContent-Disposition: form-data; name="k"'
            b"\r\n\r\n3" + b" " * 100_000 + b"\r\n--b--\r\n")
    head = (b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    server = ServerProcess(["--features-db", str(tiny[2]), "--port", "0", "--request-timeout", "2",
                            "--min-upload-rate", "1", "--reload-interval", "0"])
    try:
        host, port = server.url.split("//")[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(head)
            step = len(body) // 50
            started = time.monotonic()
            for i in range(0, len(body), step):
                s.sendall(body[i:i + step])
                time.sleep(0.1)
            assert time.monotonic() - started > 2  # longer than --request-timeout
            answer = b""
            while b"\r\n\r\n" not in answer and (got := s.recv(65536)):
                answer += got
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(head)
            closed, until = False, time.monotonic() + 60
            try:
                for i in range(0, len(body), 10):  # 10 bytes every 0.25 s: never silent for 2 s
                    s.sendall(body[i:i + 10])
                    time.sleep(0.25)
                    if time.monotonic() > until:
                        break
            except OSError:  # reset or broken pipe: the server closed it
                closed = True
            if not closed:
                s.settimeout(5)
                try:
                    closed = s.recv(1) == b""
                except OSError:
                    closed = True
            assert closed, "a body trickling at 40 B/s was kept for 60 s"
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_the_real_server_streams_the_cap_and_stops_cleanly(tiny):
    import httpx

    server = ServerProcess(["--features-db", str(tiny[2]), "--port", "0", "--max-upload-mb", "0.05"])
    url = server.url
    try:
        assert url.startswith("http://127.0.0.1:")
        host, port = url[len("http://"):].split(":")
        h = httpx.get(url + "/api/health").json()
        assert h["ready"] and h["rows"] == 24
        assert "<title>ris" in httpx.get(url + "/").text
        with socket.create_connection((host, int(port)), timeout=30) as s:  # chunked, never finished
            s.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                      b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
            head = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
                    b"Content-Type: image/jpeg\r\n\r\n")
            s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            chunk = b"x" * 16384
            for _ in range(8):  # 128 kB > 50 kB + slack: the answer comes before the body ends
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
        r = httpx.post(url + "/api/search", files={"image": ("q.jpg", (tiny[1] / "ukbench00002.jpg").read_bytes())})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == 2
        long_name = "q" * 5000 + ".jpg"  # the server process reads a part header over python-multipart's 4 kB too
        r = httpx.post(url + "/api/search", files={"image": (long_name, (tiny[1] / "ukbench00002.jpg").read_bytes())})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == 2
        assert httpx.get(url + "/api/images/..%2F..%2Fetc%2Fpasswd").status_code == 404
    finally:
        assert server.stop() == 0  # SIGTERM, as a service manager stops it: graceful, exit 0
    assert any("ris-serve: loading" in line for line in server.stderr)
    stopping = [line for line in server.stderr if "stopping" in line]  # it said so, once
    assert len(stopping) == 1 and stopping[0].startswith("ris-serve: stopping (SIGTERM)"), server.stderr


def _sigterm_once_it_serves(tiny, script: str) -> tuple[int, str, str]:
    """Run ``script`` (a ris-serve whose load is replaced) on the tiny database, wait until it serves
    (503 'loading', its signal handling in place), SIGTERM it: (exit status, stdout, stderr)."""
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", script, "--features-db", str(tiny[2]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json().get("status") == "loading":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("ris-serve did not start serving")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.slow
def test_sigterm_while_the_engine_loads_stops_without_waiting_for_the_load(tiny, tmp_path):
    """ris-serve took 4-14 s to exit after SIGTERM, silently: the process waited for the engine's
    load (Keras, index) to finish in its worker thread. A load that never ends stands for a slow one:
    SIGTERM still ends the server with its stopping line and exit 0."""
    script = ("import threading\nfrom ris.serve.service import SearchService\n"
              "SearchService.load = lambda self: threading.Event().wait()\n"
              "from ris.cli.serve import entry\nentry()\n")
    code, out, err = _sigterm_once_it_serves(tiny, script)
    assert code == 0, err
    assert "ris-serve: stopping (SIGTERM)" in err and "ready:" not in out


def test_the_stopping_line_is_seen_while_the_load_silences_stderr(tiny, tmp_path):
    """SIGTERM while the engine's load imports TensorFlow (3-4 s into a real start): the load runs
    with fd 2 pointed at a sink (ris.cli.common.quiet_backend hides TensorFlow's chatter), and the
    stopping line, written to fd 2, went into it: the server exited 0 saying nothing. The load
    stands in for that import: it silences fd 2 the same way and never ends."""
    script = ("import os, tempfile, threading\nfrom ris.serve.service import SearchService\n"
              "SINK = tempfile.TemporaryFile()\n"
              "def load(self):\n    os.dup2(SINK.fileno(), 2)\n    threading.Event().wait()\n"
              "SearchService.load = load\nfrom ris.cli.serve import entry\nentry()\n")
    code, out, err = _sigterm_once_it_serves(tiny, script)
    assert code == 0, err
    assert "ris-serve: stopping (SIGTERM): requests in flight get at most 5 s" in err


def test_sigterm_before_it_serves_ends_it_as_ctrl_c_does_in_one_line(tiny, tmp_path):
    """SIGTERM in ris-serve's first seconds (arguments, the database's check, the app being made,
    before uvicorn's handlers): Python's default death by signal, exit 143 and no line, where Ctrl-C
    said 'ris-serve: interrupted' (130). Making the app stands for that start: it never ends."""
    import subprocess
    import sys

    marker = tmp_path / "starting"
    script = ("import pathlib, threading\nimport ris.serve.app as app\n"
              f"def create_app(*a, **k):\n    pathlib.Path({str(marker)!r}).touch()\n"
              "    threading.Event().wait()\n"
              "app.create_app = create_app\nfrom ris.cli.serve import entry\nentry()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "--features-db", str(tiny[2]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "ris-serve did not reach its start"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ris-serve: interrupted"


def test_openapi_gives_every_operation_its_own_id(client):
    """README: GET /openapi.json describes the API. Routes answering GET and HEAD shared one
    operationId per path (FastAPI warned "Duplicate Operation ID"); the OpenAPI specification
    requires them unique, and client generators refuse or rename duplicates."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = client.get("/openapi.json").json()
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert "get" in spec["paths"]["/api/search"] and "post" in spec["paths"]["/api/search"]
