"""Images named in a request: base64 `data:` URLs always; local files and http(s) URLs only when allowed.

Every image is checked before it is decoded: its byte size against the body limit and its width x height,
read from the file header, against `max_image_pixels` (a small PNG can declare a gigapixel canvas).
Files must lie inside the `--allow-files` folder once symlinks and `..` are resolved. Remote fetching
(`--allow-remote-images`) speaks http and https only, follows at most a few redirects and only to http(s),
and stops reading past the size limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.processing.image import load_image
from paligemma_cli.server.config import ServerConfig
from paligemma_cli.server.errors import ApiError, bad_request

MAX_REDIRECTS = 3


def short(url: str, n: int = 48) -> str:
    """A URL cut for an error message (a data URL can be megabytes long)."""
    return url if len(url) <= n else url[:n] + "…"


def image_from_url(url: str, cfg: ServerConfig) -> Image.Image:
    """The RGB image `url` names. Raises ApiError: 400 for what the request got wrong or may not ask, 413
    for an image over the limits."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", "messages")
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        return decode_image(data_url_bytes(url, cfg), cfg, "data URL")
    if scheme in ("http", "https"):
        if not cfg.allow_remote:
            raise bad_request(f"remote image URLs are off ({short(url)}): send the image as a base64 data URL, or "
                              "start the server with --allow-remote-images", "messages", "remote_urls_disabled")
        return decode_image(fetch(url, cfg), cfg, short(url))
    if not scheme and len(url) > 1024:  # no path is this long; most likely base64 without its header
        raise bad_request("unsupported image URL: send base64 images as data:image/png;base64,… URLs", "messages")
    if scheme == "file" or not scheme or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        if cfg.allow_files is None:
            raise bad_request(f"local files are off ({short(url)}): send the image as a base64 data URL, or start "
                              "the server with --allow-files DIR", "messages", "local_files_disabled")
        return decode_image(read_allowed_file(url, cfg), cfg, short(url))
    raise bad_request(f"unsupported image URL {short(url)!r}: use a data:image/…;base64,… URL", "messages")


def data_url_bytes(url: str, cfg: ServerConfig) -> bytes:
    """The bytes of a base64 `data:image/…` URL."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request("malformed data URL: no ',' after the media type", "messages")
    media = header[5:].split(";")
    if not media[0].lower().startswith("image/"):
        raise bad_request(f"the data URL holds {media[0] or 'text/plain'!r}, not an image", "messages", "not_an_image")
    if media[-1].lower() != "base64":
        raise bad_request("image data URLs must be base64 (data:image/png;base64,…)", "messages")
    if len(payload) > cfg.max_body_bytes * 4 // 3 + 4:
        raise ApiError(413, "the image is larger than the server's body limit", "image_too_large", "messages")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data URL's base64 payload is malformed", "messages") from None


def decode_image(data: bytes, cfg: ServerConfig, name: str) -> Image.Image:
    """Check the declared size, then decode (EXIF orientation applied, RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise bad_request(f"cannot read image ({name}): not an image format Pillow can read", "messages",
                          "invalid_image") from None
    if width * height > cfg.max_image_pixels:
        raise ApiError(413, f"the image is {width}x{height} pixels; this server accepts at most "
                            f"{cfg.max_image_pixels} pixels per image", "image_too_large", "messages")
    try:
        return load_image(data)
    except PaliGemmaError as e:
        raise bad_request(str(e).replace("'<bytes>'", f"({name})"), "messages", "invalid_image") from None
    except Image.DecompressionBombError:
        raise ApiError(413, "the image decodes to too many pixels", "image_too_large", "messages") from None


def read_allowed_file(url: str, cfg: ServerConfig) -> bytes:
    """The bytes of a file named by `file://…` or a path, which must resolve inside `cfg.allow_files`."""
    if url.lower().startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"file URLs must name this machine ({short(url)})", "messages")
        path = Path(urllib.parse.unquote(parsed.path))
    else:
        path = Path(url).expanduser()
    root = cfg.allow_files.resolve()
    target = (root / path).resolve()  # an absolute path replaces root; a relative one is taken inside it
    if not target.is_relative_to(root):
        raise bad_request(f"{short(url)} is outside the folder this server may read (--allow-files)", "messages",
                          "file_not_allowed")
    if not target.is_file():
        raise bad_request(f"no such file under the allowed folder: {short(url)}", "messages", "file_not_found")
    if target.stat().st_size > cfg.max_body_bytes:
        raise ApiError(413, "the image file is larger than the server's body limit", "image_too_large", "messages")
    return target.read_bytes()


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http URL", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    # Built by hand: `build_opener` would add the file:, ftp: and data: handlers.
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(handler)
    return opener


def fetch(url: str, cfg: ServerConfig) -> bytes:
    """GET an http(s) image, reading at most the body limit."""
    request = urllib.request.Request(url, headers={"User-Agent": "paligemma-serve", "Accept": "image/*"})
    try:
        with _opener().open(request, timeout=cfg.remote_timeout_s) as response:
            data = response.read(cfg.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise bad_request(f"cannot fetch image {short(url)}: {reason}", "messages", "fetch_failed") from None
    if len(data) > cfg.max_body_bytes:
        raise ApiError(413, f"the image at {short(url)} is larger than the server's body limit", "image_too_large",
                       "messages")
    return data
