"""Discovery and robust decoding of awkward files (labels: test_labels.py)."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from ris.errors import BadImage, RisError
from ris.imagefile import read_file
from ris.images import decode_image, find_images, load_image, resize_square
from ris.testing import (ODD_REASONS, VALID_BAD_IMAGES, call_with_fifo_guard, make_bad_images, make_exif_jpeg,
                         make_odd_files)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_images(tmp_path_factory.mktemp("bad"))


def test_find_images_recursive_sorted_any_case(tmp_path):
    for rel in ["b/2.PNG", "a/1.jpg", "c.JPEG", "d.txt", ".hidden.jpg", "e/f/g.webp", "x.tif"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    assert find_images(tmp_path) == ["a/1.jpg", "b/2.PNG", "c.JPEG", "e/f/g.webp", "x.tif"]


def test_find_images_errors(tmp_path):
    with pytest.raises(RisError, match="does not exist"):
        find_images(tmp_path / "missing")
    assert find_images(tmp_path) == []


@pytest.mark.parametrize("name", sorted(VALID_BAD_IMAGES - {"huge"}))
def test_valid_odd_images_decode_to_rgb_uint8(bad, name):
    img = load_image(bad[name], 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("name,reason", [("truncated", "truncated"), ("corrupt", "truncated|cannot decode"),
                                         ("zero_byte", "empty file"), ("text_as_jpg", "not a readable image"),
                                         ("huge", "too large")])
def test_bad_images_raise_one_clear_line(bad, name, reason):
    with pytest.raises(BadImage) as exc:
        decode_image(bad[name], target=224)
    msg = str(exc.value)
    assert str(bad[name]) in msg and re.search(reason, msg) and "\n" not in msg


def test_sixteen_bit_png_keeps_its_range(bad):
    img = decode_image(bad["png16"])
    assert img.max() > 200  # not crushed to 0..1 by a bad 16->8 bit conversion


# --- odd files: special files, size caps, formats (ris.testing.make_odd_files) -------------------

@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return make_odd_files(tmp_path_factory.mktemp("odd"))


def call_guarded(fn, odd_files, timeout=60):
    return call_with_fifo_guard(fn, odd_files.get("fifo"), timeout)


@pytest.mark.parametrize("name", ["fifo", "urandom", "folder_jpg", "sparse"])
@pytest.mark.parametrize("loader", ["decode_image", "load_image"])
def test_only_regular_files_are_read_and_sizes_are_capped(odd, name, loader):
    if name not in odd:
        pytest.skip(f"this system cannot make a {name}")
    if loader == "decode_image":
        fn = lambda: decode_image(odd[name], target=64)  # noqa: E731
    else:
        fn = lambda: load_image(odd[name], 64)  # noqa: E731
    with pytest.raises(BadImage) as exc:
        call_guarded(fn, odd)
    msg = str(exc.value)
    assert msg.startswith(str(odd[name])) and ODD_REASONS[name] in msg and "\n" not in msg
    if name == "sparse":
        assert "40 GiB" in msg and "limit 256 MiB" in msg


def test_file_cap_is_checked_before_reading_and_while_reading(tmp_path):
    from ris import images

    path = tmp_path / "small.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(5000))
    with pytest.raises(BadImage, match=r"file too large \(4\.9 KiB, limit 1 KiB"):
        images.decode_image(path, max_bytes=1024)
    with pytest.raises(BadImage, match="truncated|damaged"):  # under the cap: read, then judged as a JPEG
        images.decode_image(path, max_bytes=6000)
    maps = Path("/proc/self/maps")  # a regular file whose stat size (0) is not what reading gives
    if maps.is_file() and maps.stat().st_size == 0:
        with pytest.raises(BadImage, match="file too large \\(over 100 bytes while reading"):
            read_file(maps, max_bytes=100)
        assert len(read_file(maps)) > 100


def test_find_images_lists_special_files_without_opening_them(odd):
    found = call_guarded(lambda: find_images(odd["trailing_jpg"].parent), odd)
    assert "trailing.jpg" in found and "sparse.jpg" in found and "anim.gif" in found
    assert ("fifo.jpg" in found) == ("fifo" in odd)
    assert not any(f.startswith(".") or "/." in f for f in found)


def test_jpeg_with_bytes_after_its_end_marker_decodes(odd):
    img = decode_image(odd["trailing_jpg"])
    assert img.shape == (120, 160, 3)
    ref = decode_image(make_bad_images(odd["trailing_jpg"].parent / "ref")["non_ascii"])
    assert np.array_equal(img, ref)  # the same JPEG without the trailer


def test_a_progressive_jpeg_with_junk_before_its_end_marker_decodes_as_documented(tmp_path):
    """libjpeg inside OpenCV prints 'Corrupt JPEG data: N extraneous bytes before marker 0xd9' for
    it from C, straight to fd 2 and without the file's name (README "Bad input"); the image itself
    decodes to the same pixels and is used, not skipped."""
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3)).astype(np.uint8)
    good = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "junk.jpg").write_bytes(good[:-2] + b"\x12\x34\x56" + good[-2:])
    assert np.array_equal(decode_image(tmp_path / "junk.jpg"), decode_image(tmp_path / "good.jpg"))
    assert load_image(tmp_path / "junk.jpg", 32).shape == (32, 32, 3)


@pytest.mark.parametrize("name", ["truncated_padded", "truncated_comment_eoi"])
def test_truncated_jpeg_is_still_reported(odd, name):
    with pytest.raises(BadImage, match="truncated"):
        decode_image(odd[name], target=64)


@pytest.mark.parametrize("name", ["truncated_png", "bad_filter_png"])
def test_broken_png_is_reported_without_raw_libpng_lines(odd, name, capfd):
    capfd.readouterr()
    with pytest.raises(BadImage) as exc:
        load_image(odd[name], 64)
    assert ODD_REASONS[name] in str(exc.value) and str(odd[name]) in str(exc.value)
    out, err = capfd.readouterr()
    assert "libpng" not in err and err.strip() == ""


def _png_variants():
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 53, 3), np.uint8)

    def pil(im, **kw):
        import io

        b = io.BytesIO()
        im.save(b, "PNG", **kw)
        return b.getvalue()

    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=50)
    return {
        "rgb": pil(Image.fromarray(rgb)),
        "rgba": pil(Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "RGBA")),
        "gray": pil(Image.fromarray(rgb[..., 1])),
        "gray_alpha": pil(Image.fromarray(np.dstack([rgb[..., 1], rgb[..., 0]]), "LA")),
        "palette": pil(pal),
        "palette_trns": pil(pal, transparency=3),
        "1bit": pil(Image.fromarray(rgb[..., 0] > 128)),
        "16bit_rgb": cv2.imencode(".png", rgb.astype(np.uint16) * 257
                                  + rng.integers(0, 257, rgb.shape).astype(np.uint16))[1].tobytes(),
        "16bit_gray": cv2.imencode(".png", rgb[..., 0].astype(np.uint16) * 257 + 100)[1].tobytes(),
        "16bit_rgba": cv2.imencode(".png", np.dstack([rgb, rgb[..., :1]]).astype(np.uint16) * 250)[1].tobytes(),
        **{f"exif_orientation_{o}": pil(Image.fromarray(rgb), exif=_exif(o)) for o in range(1, 9)},
    }


def _exif(orientation):
    from PIL import Image

    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


@pytest.mark.parametrize("name", sorted(_png_variants()))
def test_png_pixels_are_those_opencv_decodes(tmp_path, name):
    """PNGs are decoded without libpng's stderr lines, but to the same pixels (and EXIF rotation) as
    OpenCV gives, so features of databases made before stay comparable."""
    data = _png_variants()[name]
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    want = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    got = decode_image(path)
    assert got.shape == want.shape and np.array_equal(got, want)
    assert np.array_equal(load_image(path, 24), resize_square(want, 24))


@pytest.mark.parametrize("width,height,target", [(64, 32, 224), (64, 32, None), (1600, 800, 100), (1600, 800, 224)])
def test_exif_orientation_is_honoured_at_full_and_reduced_size(tmp_path, width, height, target):
    from ris.images import _reduced_flag

    path = make_exif_jpeg(tmp_path / "rot.jpg", width, height, orientation=6)
    img = decode_image(path, target=target)
    factor = _reduced_flag(width, height, target)[1] if target else 1
    if (width, height) == (1600, 800):
        assert factor > 1  # the reduced-size libjpeg path is what this case checks
    assert img.shape == (width // factor, height // factor, 3)  # stored landscape, shown portrait
    h, w = img.shape[:2]
    assert img[2, w - 3, 0] > 200 and img[2, w - 3, 2] < 60  # red quarter top-right after rotating 90 cw
    assert img[2, 2, 2] > 200  # blue top-left


def test_gif_decodes_its_first_frame(odd):
    img = load_image(odd["gif"], 16)
    assert img.shape == (16, 16, 3) and img[..., 0].min() > 200 and img[..., 1].max() < 60


def test_one_pixel_limit_for_ris_and_pillow(tmp_path):
    import warnings

    from PIL import Image

    from ris import images
    from ris.testing import _huge_png

    assert images.MAX_PIXELS == 200_000_000 and Image.MAX_IMAGE_PIXELS == images.MAX_PIXELS
    under = tmp_path / "under.png"  # 182 MP: Pillow's default limit refuses it, ris' does not
    under.write_bytes(_huge_png(13500))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(under) as im:
            assert im.size == (13500, 13500)
    assert images.decode_cost(under) == 13500 * 13500 * images.DECODE_BYTES_PER_PIXEL
    over = tmp_path / "over.png"  # 201.6 MP
    over.write_bytes(_huge_png(14200))
    with pytest.raises(BadImage, match=r"image too large \(14200x14200 pixels, limit 200,000,000\)"):
        decode_image(over)
    assert images.decode_cost(over) == 0  # refused without decoding: costs nothing in flight


def test_scan_counts_files_not_read(odd):
    from ris.images import scan_folder

    scan = call_guarded(lambda: scan_folder(odd["trailing_jpg"].parent), odd)
    assert "anim.gif" in scan.images and "trailing.jpg" in scan.images
    assert sorted(scan.other) == ["notes.txt", "photo.heic", "vector.svg"]
    assert sorted(scan.hidden) == [".cache/", ".hidden.jpg"]


def test_the_thumbnail_and_recycle_folders_of_nas_and_windows_are_not_read(tmp_path):
    """A Synology share holds '@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_XL.jpg' beside every photo: they were
    extracted, so each photo came back with its own thumbnails as its nearest neighbours."""
    from ris.images import scan_folder

    img = np.zeros((8, 8, 3), np.uint8)
    for rel in ["IMG_1.jpg", "@eaDir/IMG_1.jpg/SYNOPHOTO_THUMB_XL.jpg", "trips/@eaDir/x.jpg/SYNOPHOTO_THUMB_M.jpg",
                "#recycle/old.jpg", "#snapshot/daily/IMG_1.jpg", "$RECYCLE.BIN/S-1-5/$R1.jpg",
                "System Volume Information/x.jpg", "trips/a.jpg", "eaDir/kept.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), img)
    scan = scan_folder(tmp_path)
    assert scan.images == ["IMG_1.jpg", "eaDir/kept.jpg", "trips/a.jpg"]
    assert scan.hidden == ["#recycle/", "#snapshot/", "$RECYCLE.BIN/", "@eaDir/", "System Volume Information/",
                           "trips/@eaDir/"]


def test_folders_reached_through_a_symlink_are_read_once_and_loops_are_named(tmp_path):
    """``photos/corel -> /data/corel``: symlinked files were read, symlinked folders skipped
    without a word (1,000 images missing, "0 skipped"). Folder links are followed now; a link back
    into a folder already read is not entered again (a loop) and is listed as not read."""
    from ris.images import scan_folder

    outside = tmp_path / "elsewhere"
    (outside / "deep").mkdir(parents=True)
    for rel in ("a.jpg", "deep/b.png"):
        (outside / rel).write_bytes(b"x")
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "c.jpg").write_bytes(b"x")
    (root / "linked").symlink_to(outside)
    (root / "cats" / "up").symlink_to(root)  # a loop
    (root / "again").symlink_to(root / "cats")  # the same folder under a second name
    scan = scan_folder(root)
    assert scan.images == ["cats/c.jpg", "linked/a.jpg", "linked/deep/b.png"]
    assert scan.other == ["again/", "cats/up/"]


@pytest.mark.parametrize("loader", [lambda p: decode_image(p), lambda p: load_image(p, 64)])
def test_an_empty_file_name_is_refused_as_such_not_as_the_current_folder(loader):
    """Path('') is Path('.'): `ris-search --image ""` (an unset shell variable) said
    '.: not a regular file (folder)', naming a folder nobody gave."""
    with pytest.raises(BadImage) as exc:
        loader("")
    assert str(exc.value) == "'': an empty file name; name an image file"


def _cut(tmp_path, name: str, ext: str, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(ext, img)
    path = tmp_path / name
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    return path


def test_a_truncated_bmp_or_tiff_is_one_line_from_ris_and_nothing_from_the_decoders(tmp_path, capfd):
    """A BMP cut short made OpenCV log '[ERROR:0@...] global loadsave.cpp ... imdecode_(...)' and a
    TIFF cut short made Pillow warn 'TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data' (two
    lines with a source path) on stderr before ris' own line naming the file."""
    import warnings

    img = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for path in (_cut(tmp_path, "cut.bmp", ".bmp", img), _cut(tmp_path, "cut.tif", ".tif", img.astype(np.uint16) * 257)):
        with warnings.catch_warnings(record=True) as caught:  # the filters in force, recorded
            with pytest.raises(BadImage) as exc:
                decode_image(path)
        assert str(exc.value).startswith(f"{path}: ") and "\n" not in str(exc.value)
        assert [str(w.message) for w in caught] == []
        assert capfd.readouterr().err == "", path


def test_a_png_pillow_cannot_identify_says_so_without_an_object_address(tmp_path):
    """'cannot decode PNG (cannot identify image file <_io.BytesIO object at 0x7fa2d0566520>)'
    showed a memory address, different at every run."""
    ok, buf = cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))
    data = bytearray(buf.tobytes())
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    path = tmp_path / "badcrc.png"
    path.write_bytes(bytes(data))
    with pytest.raises(BadImage) as exc:
        decode_image(path)
    assert " at 0x" not in str(exc.value) and "object" not in str(exc.value)
    assert str(exc.value).startswith(f"{path}: ") and "PNG" in str(exc.value)


def test_a_tiff_or_webp_cut_short_in_its_header_is_named_a_damaged_file_of_its_format(tmp_path):
    """Known from its first bytes, a TIFF or WebP whose header is cut short is a damaged TIFF or
    WebP, not 'not a readable image (unknown or damaged format)'; a text file starting 'BM' is no BMP."""
    img = np.random.default_rng(5).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    for ext, fmt, keep in ((".tif", "TIFF", 0.5), (".webp", "WEBP", 0.05)):
        ok, buf = cv2.imencode(ext, img)
        path = tmp_path / f"cut{ext}"
        path.write_bytes(buf.tobytes()[: max(30, int(len(buf) * keep))])
        with pytest.raises(BadImage) as exc:
            decode_image(path)
        assert str(exc.value) == f"{path}: damaged {fmt} file (its header cannot be read)"
    text = tmp_path / "bmw.jpg"
    text.write_text("BMW 320d, 2014, 180000 km\n")
    with pytest.raises(BadImage) as exc:
        decode_image(text)
    assert str(exc.value) == f"{text}: not a readable image (unknown or damaged format)"


def test_a_heic_photo_named_jpg_is_named_for_what_it_is(tmp_path):
    """An iPhone photo (HEIC) renamed .jpg was 'not a readable image (unknown or damaged format)':
    it is neither damaged nor unknown, just a format ris cannot decode, and the user can convert it."""
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    with pytest.raises(BadImage) as exc:
        decode_image(path)
    assert str(exc.value) == f"{path}: a HEIC image (HEIF), which ris cannot decode; convert it to JPEG"


@pytest.mark.parametrize("mode, dtype, kind", [("F", np.float32, "32-bit float"), ("I", np.int32, "32-bit signed integer")])
def test_a_tiff_of_samples_ris_cannot_decode_is_named_for_what_it_is(tmp_path, mode, dtype, kind):
    """A 32-bit float or integer TIFF (scientific or HDR data) was refused as 'cannot decode (damaged
    file or unsupported format)', while README says TIFF works: its range says nothing of how to
    show it (0-1, 0-65535, any), so it is refused naming what it is and what to do."""
    from PIL import Image

    path = tmp_path / "scan.tif"
    Image.fromarray((np.random.default_rng(0).random((30, 40)) * 100).astype(dtype), mode=mode).save(path)
    with pytest.raises(BadImage) as caught:
        decode_image(path)
    assert str(caught.value) == f"{path}: a {kind} TIFF, which ris cannot decode; convert it to 8-bit"
    Image.fromarray(np.zeros((30, 40), np.uint16)).save(tmp_path / "ok.tif")
    assert decode_image(tmp_path / "ok.tif").shape == (30, 40, 3)  # 16-bit TIFFs decode (to their high byte)


def test_a_gif_whose_first_frame_outgrows_its_screen_is_refused_by_its_frames_size(tmp_path, capsys):
    """A GIF's header gives its screen size, but Pillow makes the image as large as its first frame
    reaches: a 10x10 screen holding a 15000x15000 frame (225 MP, over the 200 MP limit) passed the
    check (and counted 800 bytes against the decode budget), and Pillow printed its own
    DecompressionBombWarning before decoding it. It is refused from its header like any image over the limit."""
    import struct

    from ris.images import decode_cost

    gif = tmp_path / "bomb.gif"
    gif.write_bytes(b"GIF89a" + struct.pack("<HH", 10, 10) + b"\x80\x00\x00" + b"\0\0\0\xff\xff\xff"
                    + b"\x2c" + struct.pack("<HHHH", 0, 0, 15000, 15000) + b"\x00" + b"\x02\x02\x4c\x01\x00\x3b")
    with pytest.raises(BadImage, match=r"image too large \(15000x15000 pixels, limit 200,000,000\)"):
        decode_image(gif)
    assert decode_cost(gif, 224) == 0  # refused unread: nothing counted against the decode budget
    assert "DecompressionBombWarning" not in capsys.readouterr().err


def test_a_dataset_folder_that_cannot_be_listed_is_refused_by_its_reason(tmp_path, monkeypatch):
    """A dataset folder without read permission was read as empty ('no images found'); its
    reason is said instead."""
    import os

    from ris.images import scan_folder

    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p)))
                        if Path(p) == tmp_path else real(p))
    with pytest.raises(RisError, match=r"cannot list this folder \(Permission denied\)$"):
        scan_folder(tmp_path)
