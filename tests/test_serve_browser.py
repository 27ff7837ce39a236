"""The ris-serve page in a real headless Chromium, over a real server and a real database.

A person's path: open the page, upload a UKBench view through the file input, see the object's
other views first, click a result to search with it, upload a non-image and read the error.
Data: the first 200 UKBench images (../shared/data/ukbench1000) without the query view, with
MobileNetV2 features; without the reference data, the demo's synthetic collection.

Needs Debian's ``chromium`` and ``pip install 'ris[serve,browser]'``; skipped with the reason
when they are missing, except under RIS_REQUIRE_BROWSER=1 (CI), where that is a failure.
RIS_SCREENSHOT=path also saves the screenshot there (the README's picture is made so).
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

from conftest import SHARED

pytestmark = pytest.mark.slow


def _missing(reason: str):
    if os.environ.get("RIS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"RIS_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _missing("no chromium on PATH (Debian: apt-get install chromium)")
    for module, extra in (("playwright", "browser"), ("fastapi", "serve"), ("uvicorn", "serve")):
        try:
            __import__(module)
        except ImportError:
            _missing(f"{module} is not installed (pip install 'ris[{extra}]')")
    return exe


@pytest.fixture(scope="module")
def collection(tmp_path_factory, chromium):
    """(database, query image, names of the query object's views in the database)."""
    from ris.demo import offline_backbone
    from ris.extract import ExtractConfig, ExtractOptions, extract_features

    root = tmp_path_factory.mktemp("browser")
    images = root / "images"
    uk = SHARED / "ukbench1000"
    if (uk / "groundtruth.tsv").is_file():
        images.mkdir()
        for i in range(1, 200):  # object 0's first view is the query, not in the database
            shutil.copy(uk / f"ukbench{i:05d}.jpg", images)
        query, views = uk / "ukbench00000.jpg", {f"ukbench{i:05d}.jpg" for i in (1, 2, 3)}
    else:
        from ris.demo_data import make_demo_dataset, make_query_view

        make_demo_dataset(images, n_objects=12)
        query, views = make_query_view(images, root / "queries", 0), {f"ukbench{i:05d}.jpg" for i in range(4)}
    db = root / "feats.h5"
    extract_features(images, db, ExtractConfig(model=offline_backbone(), pooling="gap"),
                     ExtractOptions(labels="ukbench", progress=False, log=lambda s: None))
    return db, query, views


def test_the_page_searches_by_upload_and_by_click(collection, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from ris.serve.process import ServerProcess

    db, query, views = collection
    n_rows = 199 if len(views) == 3 else 48
    with ServerProcess(["--features-db", str(db), "--port", "0", "--default-rerank", "qe"]) as server, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("request", lambda r: r.url.startswith((server.url, "blob:", "data:"))
                or problems.append(f"outside request: {r.url}"))

        page.goto(server.url + "/")
        expect(page.get_by_test_id("status")).to_contain_text(f"{n_rows} images")
        expect(page.get_by_test_id("rerank")).to_have_value("qe")  # the menu starts at the service's default
        page.get_by_test_id("k").fill("10")
        page.get_by_test_id("file-input").set_input_files(str(query))

        results = page.get_by_test_id("result")
        expect(results).to_have_count(10)
        expect(page.get_by_test_id("query-name")).to_have_text(query.name)
        expect(page.locator("#summary")).to_contain_text("re-ranked (qe)")
        first = [results.nth(i).get_attribute("data-path") for i in range(len(views))]
        assert set(first) == views, f"top {len(views)} were {first}, expected the query object's views {views}"
        ranks = [results.nth(i).locator(".rank").inner_text() for i in range(3)]
        assert ranks == ["1", "2", "3"]
        distances = [float(results.nth(i).get_by_test_id("result-distance").inner_text()) for i in range(10)]
        assert distances == sorted(distances)
        page.wait_for_function("() => [...document.querySelectorAll('img.thumb')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.evaluate("document.activeElement.blur()")
        shot = tmp_path / "ris-serve.png"
        page.screenshot(path=str(shot))
        if os.environ.get("RIS_SCREENSHOT"):
            shutil.copy(shot, os.environ["RIS_SCREENSHOT"])

        # "more like this": click the best match, search by its database row, no upload
        clicked = results.nth(0)
        path, row = clicked.get_attribute("data-path"), clicked.get_attribute("data-id")
        clicked.click()
        expect(page.get_by_test_id("query-name")).to_have_text(path)
        expect(page).to_have_url(re.compile(rf"#id={row}$"))
        expect(results).to_have_count(10)
        again = [results.nth(i).get_attribute("data-path") for i in range(len(views) - 1)]
        assert set(again) == views - {path}, f"more like {path}: {again}"
        assert path not in [results.nth(i).get_attribute("data-path") for i in range(10)]

        # a shared "/#id=N" address pasted into the open tab searches for that image (it was ignored)
        other = results.nth(4)
        other_path, other_id = other.get_attribute("data-path"), other.get_attribute("data-id")
        page.evaluate(f"location.hash = '#id={other_id}'")
        expect(page.get_by_test_id("query-name")).to_have_text(other_path)
        expect(page.locator("#query-meta")).to_contain_text(f"image id {other_id}")

        # a photo turned on its side, with the "Turned photos" box ticked: its views come first again
        import cv2

        turned = tmp_path / "turned.jpg"
        cv2.imwrite(str(turned), cv2.rotate(cv2.imread(str(query)), cv2.ROTATE_90_CLOCKWISE))
        box = page.get_by_test_id("turns")
        expect(box).not_to_be_checked()  # the server runs without --rotations
        box.check()
        page.get_by_test_id("file-input").set_input_files(str(turned))
        expect(page.get_by_test_id("query-name")).to_have_text("turned.jpg")
        expect(page.locator("#summary")).to_contain_text("turned copies searched too")
        first = [results.nth(i).get_attribute("data-path") for i in range(len(views))]
        assert set(first) == views, f"turned query with the box ticked: top {len(views)} were {first}"

        # a file that is not an image: one sentence in the page, the results stay
        page.get_by_test_id("file-input").set_input_files(
            files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}])
        expect(page.get_by_test_id("error")).to_have_text(re.compile(r"^notes\.txt is not an image; send .*\.$"))
        expect(results).to_have_count(10)
        browser.close()
    expected_415 = "the server responded with a status of 415"  # Chromium logs the refused upload
    assert not [p for p in problems if expected_415 not in p], problems
    assert server.proc.returncode == 0


def test_the_page_never_offers_turned_photos_with_a_re_ranking_that_refuses_them(collection, chromium):
    """With "Turned photos" ticked the menu offered diffusion and kreciprocal, and the search then
    got 400 (their scores are normalised per query: turned copies cannot be merged). Now whichever
    is chosen first greys the other out, with a short reason, and no choice the page allows is refused."""
    from playwright.sync_api import expect, sync_playwright

    from ris.serve.process import ServerProcess

    db, query, _ = collection
    with ServerProcess(["--features-db", str(db), "--port", "0", "--default-rerank", "diffusion"]) as server, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        refused: list[str] = []
        page.on("response", lambda r: r.status == 400 and refused.append(r.url))
        page.goto(server.url + "/")
        rerank, box, note = page.get_by_test_id("rerank"), page.get_by_test_id("turns"), page.get_by_test_id("turns-note")
        expect(rerank).to_have_value("diffusion")
        expect(box).to_be_disabled()  # diffusion chosen (the server's default): no turned photos
        expect(note).to_be_visible()
        expect(note).to_contain_text("diffusion")

        rerank.select_option("qe")
        expect(box).to_be_enabled()
        expect(note).to_be_hidden()
        box.check()
        for method in ("diffusion", "kreciprocal"):  # turned photos chosen: those re-rankings greyed out
            expect(rerank.locator(f"option[value='{method}']")).to_be_disabled()
            expect(rerank.locator(f"option[value='{method}']")).to_contain_text("not with turned photos")
        for method in ("none", "qe", "dba+qe"):
            expect(rerank.locator(f"option[value='{method}']")).to_be_enabled()
        page.get_by_test_id("file-input").set_input_files(str(query))
        expect(page.locator("#summary")).to_contain_text("turned copies searched too")
        expect(page.get_by_test_id("error")).to_be_hidden()

        box.uncheck()
        expect(rerank.locator("option[value='diffusion']")).to_be_enabled()
        rerank.select_option("diffusion")
        expect(page.locator("#summary")).to_contain_text("re-ranked (diffusion)")
        expect(box).to_be_disabled()
        browser.close()
    assert refused == [], refused


def test_after_a_refused_file_the_page_still_searches_what_it_shows(collection, chromium):
    """A refused upload (not an image) left the page showing the previous results while the page
    had taken the refused file as its query: the address lost the shown image's #id=N, the summary
    went blank, and changing k (or the re-ranking) searched the refused file again, so the error
    came back and the results shown could not be changed. Now the page goes back to the query it
    shows: its address and summary stay, and k applies to it."""
    from playwright.sync_api import expect, sync_playwright

    from ris.serve.process import ServerProcess

    db, _, _ = collection
    with ServerProcess(["--features-db", str(db), "--port", "0"]) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/#id=5")
        results, error = page.get_by_test_id("result"), page.get_by_test_id("error")
        expect(page.locator("#query-meta")).to_contain_text("image id 5")
        expect(results).to_have_count(12)
        page.get_by_test_id("file-input").set_input_files(
            files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}])
        expect(error).to_contain_text("notes.txt is not an image")
        expect(page).to_have_url(re.compile(r"#id=5$"))
        expect(page.locator("#summary")).to_contain_text("12 of")
        page.get_by_test_id("k").fill("5")
        expect(results).to_have_count(5)
        expect(error).to_be_hidden()
        expect(page.locator("#query-meta")).to_contain_text("image id 5")
        browser.close()


def test_a_page_opened_while_the_database_reloads_waits_for_it(collection, chromium):
    """A page opened while the server reloaded a database rewritten in place (/api/health 503
    "reloading", a few seconds) said "not ready" with the reason as an error and never looked
    again: no re-ranking menu, no status, until the page was reloaded by hand; and a page opened
    at a shared /#id=N while the server loaded never searched it. It now waits and then searches."""
    from playwright.sync_api import expect, sync_playwright

    from ris.serve.process import ServerProcess

    db, _, _ = collection
    with ServerProcess(["--features-db", str(db), "--port", "0"]) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        answered = []

        def reloading(route):  # the first look at the health finds the server reloading
            if answered:
                return route.continue_()
            answered.append(1)
            route.fulfill(status=503, content_type="application/json", headers={"Retry-After": "2"},
                          body='{"status": "reloading", "ready": false, "error": "the database file was '
                               'rewritten in place; reloading it"}')

        page.route("**/api/health", reloading)
        page.goto(server.url + "/#id=5")  # a shared link: searched once the server is ready
        expect(page.get_by_test_id("status")).to_contain_text("images", timeout=10_000)
        expect(page.get_by_test_id("error")).to_be_hidden()
        expect(page.get_by_test_id("rerank").locator("option")).not_to_have_count(1)
        expect(page.locator("#query-meta")).to_contain_text("image id 5")
        expect(page.get_by_test_id("result")).to_have_count(12)
        browser.close()
