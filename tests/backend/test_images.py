"""Images are fetched the way Label Studio references them, within limits, and only from allowed hosts."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from backend.images import (
    ImageCorrupt,
    ImageLoader,
    ImageNotAllowed,
    ImageTooLarge,
    ImageUnavailable,
    decode_image,
)
from backend.settings import Settings
from tests.support.fake_labelstudio import LS_TOKEN, FakeLabelStudio
from tests.support.images import png_bytes, scene


def loader(fake_ls: FakeLabelStudio, **overrides) -> ImageLoader:
    values = {"label_studio_url": fake_ls.url, "label_studio_api_key": LS_TOKEN, **overrides}
    return ImageLoader(Settings(**values))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with no real pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(
        b"IEND", b"")


class TestLabelStudioFiles:
    def test_upload_is_fetched_with_the_token(self, fake_ls):
        image = loader(fake_ls).load("/data/upload/1/red.png")
        assert image.mode == "RGB" and image.size == (96, 64)
        assert image.getpixel((20, 20)) == (220, 30, 30)
        _, path, headers = fake_ls.requests[-1]
        assert path == "/data/upload/1/red.png" and headers["Authorization"] == f"Token {LS_TOKEN}"

    def test_upload_without_a_token_says_which_setting_is_missing(self, fake_ls):
        with pytest.raises(ImageUnavailable, match="LABEL_STUDIO_API_KEY"):
            loader(fake_ls, label_studio_api_key="").load("/data/upload/1/red.png")

    def test_upload_without_label_studio_url_says_so(self, fake_ls):
        with pytest.raises(ImageUnavailable, match="LABEL_STUDIO_URL"):
            loader(fake_ls, label_studio_url="").load("upload/1/red.png")

    def test_a_rejected_token_is_reported(self, fake_ls):
        with pytest.raises(ImageUnavailable, match=r"HTTP 401.*LABEL_STUDIO_API_KEY"):
            loader(fake_ls, label_studio_api_key="wrong").load("/data/upload/1/red.png")

    def test_cloud_uri_goes_through_the_task_presign_route(self, fake_ls):
        image = loader(fake_ls).load("s3://bucket/folder/blue.png", task_id=14)
        assert image.getpixel((60, 30)) == (20, 40, 220)
        presign = [path for _, path, _ in fake_ls.requests if "/presign/" in path][-1]
        assert presign.startswith("/tasks/14/presign/?fileuri=")

    def test_cloud_uri_needs_a_task_id(self, fake_ls):
        with pytest.raises(ImageUnavailable, match="task id"):
            loader(fake_ls).load("gs://bucket/blue.png")

    def test_missing_file_is_a_clear_404(self, fake_ls):
        with pytest.raises(ImageUnavailable, match="404"):
            loader(fake_ls).load("/data/upload/1/nothing.png")


class TestLocalFiles:
    def test_read_from_the_document_root(self, fake_ls, tmp_path):
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "a.png").write_bytes(png_bytes(scene()))
        image = loader(fake_ls, local_files_document_root=str(tmp_path)).load("/data/local-files/?d=sub/a.png")
        assert image.size == (96, 64)

    def test_paths_outside_the_root_are_refused(self, fake_ls, tmp_path):
        with pytest.raises(ImageNotAllowed, match="leaves LOCAL_FILES_DOCUMENT_ROOT"):
            loader(fake_ls, local_files_document_root=str(tmp_path)).load("/data/local-files/?d=../../etc/passwd")

    def test_missing_local_file(self, fake_ls, tmp_path):
        with pytest.raises(ImageUnavailable, match="no such file"):
            loader(fake_ls, local_files_document_root=str(tmp_path)).load("/data/local-files/?d=x.png")


class TestHostGuard:
    def test_label_studio_host_is_allowed_by_default(self, fake_ls):
        assert loader(fake_ls).load(f"{fake_ls.url}/img/red.png").size == (96, 64)

    def test_other_hosts_are_refused_by_default(self, fake_ls):
        other = fake_ls.url.replace("127.0.0.1", "localhost")
        with pytest.raises(ImageNotAllowed, match="not in ALLOWED_IMAGE_HOSTS"):
            loader(fake_ls).load(f"{other}/img/red.png")

    def test_wildcard_still_refuses_loopback(self, fake_ls):
        other = fake_ls.url.replace("127.0.0.1", "localhost")
        with pytest.raises(ImageNotAllowed, match="non-public address"):
            loader(fake_ls, allowed_image_hosts=("*",)).load(f"{other}/img/red.png")

    def test_loopback_is_allowed_when_listed(self, fake_ls):
        other = fake_ls.url.replace("127.0.0.1", "localhost")
        host = other.split("://", 1)[1]
        assert loader(fake_ls, allowed_image_hosts=(host,)).load(f"{other}/img/red.png").size == (96, 64)

    def test_token_is_not_sent_to_other_hosts(self, fake_ls):
        other = fake_ls.url.replace("127.0.0.1", "localhost")
        loader(fake_ls, allowed_image_hosts=(other.split("://", 1)[1],)).load(f"{other}/img/red.png")
        assert "Authorization" not in fake_ls.requests[-1][2]

    @pytest.mark.parametrize("reference", ["ftp://example.com/a.png", "file:///etc/passwd", "a.png", " "])
    def test_unsupported_references(self, fake_ls, reference):
        with pytest.raises(ImageUnavailable):
            loader(fake_ls).load(reference)


class TestLimits:
    def test_download_size_limit(self, fake_ls):
        with pytest.raises(ImageTooLarge, match="MAX_IMAGE_BYTES=100"):
            loader(fake_ls, max_image_bytes=100).load(f"{fake_ls.url}/img/red.png")

    def test_pixel_limit(self, fake_ls):
        with pytest.raises(ImageTooLarge, match="96x64 = 6144 pixels"):
            loader(fake_ls, max_image_pixels=5000).load(f"{fake_ls.url}/img/red.png")

    def test_decompression_bomb_is_refused_before_decoding(self):
        started = time.perf_counter()
        with pytest.raises(ImageTooLarge, match="10000000000 pixels"):
            decode_image(png_header_only(100_000, 100_000), max_pixels=100_000_000)
        with pytest.raises(ImageTooLarge, match="12000x12000 = 144000000 pixels, more than MAX_IMAGE_PIXELS"):
            decode_image(png_header_only(12_000, 12_000), max_pixels=1_000_000)
        assert time.perf_counter() - started < 1.0

    def test_corrupt_bytes(self, fake_ls):
        with pytest.raises(ImageCorrupt, match="not a decodable image"):
            loader(fake_ls).load(f"{fake_ls.url}/img/corrupt.png")

    def test_slow_server_times_out(self, fake_ls):
        started = time.perf_counter()
        with pytest.raises(ImageUnavailable, match=r"IMAGE_FETCH_TIMEOUT=0\.5"):
            loader(fake_ls, image_fetch_timeout=0.5).load(f"{fake_ls.url}/slow/red.png?delay=3")
        assert time.perf_counter() - started < 2.5


class TestDecoding:
    def test_exif_orientation_is_applied(self):
        image = Image.new("RGB", (40, 20), (0, 128, 0))
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° clockwise to display
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", exif=exif)
        assert decode_image(buffer.getvalue(), max_pixels=10_000).size == (20, 40)

    @pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
    def test_every_mode_becomes_rgb(self, mode):
        decoded = decode_image(png_bytes(Image.new(mode, (8, 6))), max_pixels=100)
        assert decoded.mode == "RGB" and decoded.size == (8, 6)


def test_the_workers_image_cache_is_bounded_by_decoded_bytes_as_well_as_by_count(fake_ls):
    from backend.worker import ImageCache

    sizes = {"small.png": (40, 30), "large.png": (400, 300), "medium.png": (200, 150)}
    for name, size in sizes.items():
        fake_ls.files[name] = png_bytes(scene(size, box=(2, 2, 20, 20)))
    rgb = {name: w * h * 3 for name, (w, h) in sizes.items()}
    cache = ImageCache(loader(fake_ls, allowed_image_hosts=("127.0.0.1",)), size=10,
                       max_bytes=rgb["large.png"] + rgb["small.png"])
    url = {name: f"{fake_ls.url}/img/{name}" for name in sizes}
    cache.get(url["small.png"], None)
    cache.get(url["large.png"], None)
    assert cache.bytes == rgb["small.png"] + rgb["large.png"]
    cache.get(url["medium.png"], None)  # over the byte budget: the least recently used go first
    assert cache.bytes == rgb["medium.png"]
    assert cache.get(url["medium.png"], None) is cache.get(url["medium.png"], None) and cache.hits == 2
    tiny = ImageCache(cache.loader, size=10, max_bytes=1)
    assert tiny.get(url["large.png"], None).size == sizes["large.png"]  # the newest image stays, whatever it weighs
    assert tiny.bytes == rgb["large.png"]
