"""The decoding pipeline of ris-extract: order, bad files, special files, and memory in flight."""
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from ris import decoding
from ris.decoding import _in_flight, iter_decoded
from ris.errors import RisError
from ris.images import decode_cost, find_images
from ris.testing import ODD_REASONS, call_with_fifo_guard, make_large_png, make_odd_files


@pytest.mark.parametrize("processes", [False, True])
def test_iter_decoded_keeps_order_reports_bad_files_and_stops_early(tmp_path, processes):
    for i in range(11):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), np.full((30, 40, 3), 20 * i, np.uint8))
    (tmp_path / "05b.jpg").write_text("not an image")
    rels = sorted(p.name for p in tmp_path.iterdir())
    out = list(iter_decoded(tmp_path, rels, 16, workers=2, prefetch=3, processes=processes, chunk=2))
    assert [rel for rel, _, _ in out] == rels
    assert [rel for rel, _, err in out if err] == ["05b.jpg"]
    assert [int(img[0, 0, 0]) for _, img, _ in out if img is not None] == [20 * i for i in range(11)]
    early = iter_decoded(tmp_path, rels, 16, workers=2, prefetch=3, processes=processes, chunk=2)
    assert next(early)[0] == "00.png"
    early.close()  # the consumer stopping early must not hang or raise


@pytest.mark.parametrize("processes", [False, True])
def test_iter_decoded_reports_special_and_broken_files_and_decodes_odd_valid_ones(tmp_path, processes):
    odd = make_odd_files(tmp_path)
    rels = find_images(tmp_path)  # special files are listed (never opened) and refused when decoding
    out = call_with_fifo_guard(
        lambda: list(iter_decoded(tmp_path, rels, 32, workers=2, prefetch=4, processes=processes, chunk=2)),
        odd.get("fifo"))
    assert [rel for rel, _, _ in out] == rels
    errors = {rel: err for rel, _, err in out if err}
    listed = [key for key in ODD_REASONS if key in odd and key != "folder_jpg"]  # a folder is walked into
    assert sorted(errors) == sorted(odd[key].name for key in listed)
    for key in listed:
        reason = ODD_REASONS[key]
        assert errors[odd[key].name].startswith(str(odd[key])) and reason in errors[odd[key].name]
    decoded = {rel for rel, img, _ in out if img is not None}
    assert decoded == {"anim.gif", "trailing.jpg"}


def test_in_flight_holds_submission_within_the_budget():
    """Tasks wait (up to 0.2 s) for the running cost to exceed the budget: without the budget,
    three 40s would run together; with it, never more than the budget, except one task alone."""
    from concurrent.futures import ThreadPoolExecutor

    costs = {"a": 40, "b": 40, "c": 40, "big": 150, "d": 10, "e": 30, "f": 60, "g": 0}
    budget = 100
    cond = threading.Condition()
    state = {"running": [], "violations": []}

    def work(item):
        with cond:
            state["running"].append(item)
            total = sum(costs[i] for i in state["running"])
            if total > budget and len(state["running"]) > 1:
                state["violations"].append(list(state["running"]))
            cond.notify_all()
            cond.wait_for(lambda: sum(costs[i] for i in state["running"]) > budget, timeout=0.2)
            state["running"].remove(item)
        return item

    items = list(costs)
    for depth in (8, 2):  # 2: the consumer takes a task still running off the window: it still counts
        with ThreadPoolExecutor(max_workers=6) as pool:
            got = [(item, fut.result()) for item, fut in _in_flight(pool, work, items, depth=depth,
                                                                     cost=costs.__getitem__, budget=budget)]
        assert got == [(i, i) for i in items]
        assert state["violations"] == [], depth
    with ThreadPoolExecutor(max_workers=2) as pool:  # the last items held back by the budget still come
        tail = {"x": 90, "y": 90, "z": 90}
        got = [fut.result() for _, fut in _in_flight(pool, lambda i: i, list(tail), 1, tail.__getitem__, 100)]
    assert got == ["x", "y", "z"]
    with ThreadPoolExecutor(max_workers=6) as pool:  # the same without a budget does break it
        list(_in_flight(pool, work, ["a", "b", "c"], depth=8))
    assert state["violations"]


@pytest.mark.parametrize("processes", [False, True])
def test_iter_decoded_costs_images_by_their_header_pixels(tmp_path, monkeypatch, processes):
    """Each image costs its header's pixels (reduced JPEG size where it applies) times the bytes a
    decode holds per pixel; a process chunk costs its largest image (a worker decodes one at a time)."""
    make_large_png(tmp_path / "a.png", 300, 200)
    cv2.imwrite(str(tmp_path / "b.jpg"), np.zeros((800, 1000, 3), np.uint8))
    (tmp_path / "c.txt.jpg").write_text("not an image")
    rels = ["a.png", "b.jpg", "c.txt.jpg"]
    seen = {}
    real = decoding._in_flight

    def spy(pool, fn, items, depth, cost=None, budget=None):
        items = list(items)
        seen.update(costs=[cost(i) for i in items], budget=budget)
        return real(pool, fn, items, depth, cost, budget)

    monkeypatch.setattr(decoding, "_in_flight", spy)
    monkeypatch.setenv("RIS_DECODE_BUDGET", "512M")
    out = list(iter_decoded(tmp_path, rels, 100, workers=2, prefetch=4, processes=processes, chunk=2))
    assert [r for r, img, _ in out if img is not None] == ["a.png", "b.jpg"]
    per_image = [300 * 200 * 8, (1000 // 8) * (800 // 8) * 8, 0]
    assert [decode_cost(tmp_path / r, 100) for r in rels] == per_image
    assert seen["budget"] == 512 << 20
    assert seen["costs"] == ([max(per_image[:2]), per_image[2]] if processes else per_image)


def test_decode_budget_setting(monkeypatch):
    monkeypatch.delenv("RIS_DECODE_BUDGET", raising=False)
    assert decoding.decode_budget() == 1 << 30
    monkeypatch.setenv("RIS_DECODE_BUDGET", "2G")
    assert decoding.decode_budget() == 2 << 30
    monkeypatch.setenv("RIS_DECODE_BUDGET", "lots")
    with pytest.raises(RisError, match="RIS_DECODE_BUDGET"):
        decoding.decode_budget()


def test_decoding_loads_no_keras():
    """Decoding workers (and a process that only decodes) import this module: it must not pull in
    Keras or TensorFlow, whose start-up costs seconds and hundreds of MB per process."""
    code = ("import sys, ris.decoding, ris.images\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow', 'jax', 'torch'))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
