"""Image URLs in requests: data URLs always; files and remote URLs only when allowed, within their limits."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading

import pytest
from PIL import Image

from paligemma_cli.server.config import ServerConfig
from paligemma_cli.server.errors import ApiError
from paligemma_cli.server.images import image_from_url
from tests.fixtures.server import data_url


def status_of(url: str, cfg: ServerConfig) -> tuple[int, str]:
    with pytest.raises(ApiError) as e:
        image_from_url(url, cfg)
    return e.value.status, e.value.message


def test_a_data_url_decodes_to_the_same_pixels():
    image = Image.new("RGB", (7, 5), (10, 200, 30))
    got = image_from_url(data_url(image), ServerConfig())
    assert got.size == (7, 5) and got.getpixel((3, 2)) == (10, 200, 30)


@pytest.mark.parametrize("url, needle", [
    ("data:text/plain;base64," + base64.b64encode(b"hello").decode(), "not an image"),
    ("data:image/png," + "abc", "must be base64"),
    ("data:image/png;base64,!!!notbase64", "malformed"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "cannot read image"),
    ("data:image/png;base64", "no ','"),
    ("ftp://example.com/a.png", "unsupported image URL"),
    ("iVBORw0KGgo" * 200, "data:image/png;base64"),
])
def test_bad_data_urls_are_400(url, needle):
    status, message = status_of(url, ServerConfig())
    assert status == 400 and needle in message


def test_an_image_over_the_pixel_limit_is_413_before_decoding():
    url = data_url(Image.new("RGB", (300, 200)))
    assert status_of(url, ServerConfig(max_image_pixels=300 * 200 - 1))[0] == 413
    assert image_from_url(url, ServerConfig(max_image_pixels=300 * 200)).size == (300, 200)


def test_local_paths_need_the_flag_and_stay_inside_its_folder(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    Image.new("RGB", (4, 4), "red").save(allowed / "a.png")
    Image.new("RGB", (4, 4), "blue").save(outside / "b.png")
    os.symlink(outside / "b.png", allowed / "link.png")
    for url in (str(allowed / "a.png"), f"file://{allowed / 'a.png'}", "a.png"):
        status, message = status_of(url, ServerConfig())
        assert status == 400 and "--allow-files" in message
    cfg = ServerConfig(allow_files=allowed)
    assert image_from_url(str(allowed / "a.png"), cfg).getpixel((0, 0)) == (255, 0, 0)
    assert image_from_url(f"file://{allowed / 'a.png'}", cfg).size == (4, 4)
    assert image_from_url("a.png", cfg).size == (4, 4)  # relative: inside the folder
    for url in (str(outside / "b.png"), "../outside/b.png", "link.png", f"file://{outside / 'b.png'}"):
        status, message = status_of(url, cfg)
        assert status == 400 and "outside the folder" in message, url
    assert "no such file" in status_of("missing.png", cfg)[1]


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/redirect-to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
            return
        buf = io.BytesIO()
        Image.new("RGB", (6, 6), "green").save(buf, "PNG")
        body = buf.getvalue() * (200 if self.path == "/big.png" else 1)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_urls_are_off_by_default_and_fetched_with_limits_when_allowed(image_host):
    status, message = status_of(f"{image_host}/a.png", ServerConfig())
    assert status == 400 and "--allow-remote-images" in message
    cfg = ServerConfig(allow_remote=True, max_body_bytes=5000)
    assert image_from_url(f"{image_host}/a.png", cfg).getpixel((1, 1)) == (0, 128, 0)
    assert status_of(f"{image_host}/big.png", cfg)[0] == 413
    status, message = status_of(f"{image_host}/redirect-to-file", cfg)
    assert status == 400 and "cannot fetch" in message
