"""Fetch and decode task images the way Label Studio references them, with limits and an SSRF guard.

References handled (`ImageLoader.load`):
- `/data/upload/<project>/<file>` (also `upload/…`, `/storage-data/uploaded/?filepath=…`): from Label Studio,
  with `Authorization: Token <LABEL_STUDIO_API_KEY>`;
- `/data/local-files/?d=<path>`: from LOCAL_FILES_DOCUMENT_ROOT when set, else from Label Studio;
- `s3://`, `gs://`, `azure-blob://`: through Label Studio's presign route
  `/tasks/<task id>/presign/?fileuri=…` (the redirect it answers with is followed: Label Studio made it);
- `http(s)://…`: fetched directly, only from hosts allowed by ALLOWED_IMAGE_HOSTS (default: the Label Studio
  host); a host resolving to a loopback, private or link-local address must be listed explicitly.

Every download is bounded (MAX_IMAGE_BYTES, IMAGE_FETCH_TIMEOUT), every image is checked against
MAX_IMAGE_PIXELS before it is decoded, EXIF orientation is applied (the browser shows it that way, so Label
Studio's coordinates refer to it) and the result is RGB.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import socket
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
from PIL import Image, ImageOps

from backend.settings import Settings

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
MAX_REDIRECTS = 3


class ImageError(ValueError):
    """An image cannot be used; the message says why and what to change."""


class ImageNotAllowed(ImageError):
    """The image's host is not allowed (SSRF guard)."""


class ImageUnavailable(ImageError):
    """The image could not be downloaded or read."""


class ImageTooLarge(ImageError):
    """The image exceeds MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""


class ImageCorrupt(ImageError):
    """The bytes are not a decodable image."""


class ImageLoader:
    """Downloads and decodes images for one process; reuses one HTTP connection pool."""

    def __init__(self, settings: Settings, client: httpx.Client | None = None):
        self.settings = settings
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(settings.image_fetch_timeout), follow_redirects=False)

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()

    def load(self, reference: str, task_id: int | None = None) -> Image.Image:
        """The decoded RGB image a task refers to (see the module docstring for the accepted forms)."""
        return decode_image(self.fetch(reference, task_id), self.settings.max_image_pixels, reference)

    def fetch(self, reference: str, task_id: int | None = None) -> bytes:
        """The raw bytes of an image reference."""
        if not isinstance(reference, str) or not reference.strip():
            raise ImageUnavailable("the task has an empty image reference")
        reference = reference.strip()
        if reference.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise ImageUnavailable(
                    f"{reference}: a cloud storage image needs its task id for the presign route")
            fileuri = base64.urlsafe_b64encode(reference.encode()).decode()
            return self._from_label_studio(f"/tasks/{task_id}/presign/?fileuri={fileuri}", reference)
        if reference.startswith(("upload/", "/upload/")):
            reference = "/data/" + reference.lstrip("/")
        if reference.startswith("/data/local-files") and self.settings.local_files_document_root:
            return self._from_local_root(reference)
        if reference.startswith("/"):
            return self._from_label_studio(reference, reference)
        scheme = urlsplit(reference).scheme.lower()
        if scheme in {"http", "https"}:
            return self._download(reference, reference, trusted=False)
        raise ImageUnavailable(
            f"{_short(reference)}: unsupported image reference (expected an http(s) URL, a Label Studio "
            "/data/upload or /data/local-files path, or an s3://, gs:// or azure-blob:// URI)")

    def _from_label_studio(self, path: str, reference: str) -> bytes:
        base = self.settings.label_studio_url
        if not base:
            raise ImageUnavailable(
                f"{_short(reference)} is stored in Label Studio: set LABEL_STUDIO_URL (reachable from the "
                "worker) and LABEL_STUDIO_API_KEY")
        if not self.settings.label_studio_api_key:
            raise ImageUnavailable(
                f"{_short(reference)} is stored in Label Studio, which requires a token: "
                "set LABEL_STUDIO_API_KEY")
        return self._download(urljoin(base.rstrip("/") + "/", path.lstrip("/")), reference, trusted=True)

    def _from_local_root(self, reference: str) -> bytes:
        root = Path(self.settings.local_files_document_root).resolve()
        values = parse_qs(urlsplit(reference).query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise ImageUnavailable(f"{reference}: a local-files URL needs ?d=<path>")
        path = (root / relative.lstrip("/")).resolve()
        if not path.is_relative_to(root):
            raise ImageNotAllowed(f"{reference}: the path leaves LOCAL_FILES_DOCUMENT_ROOT")
        try:
            size = path.stat().st_size
            limit = self.settings.max_image_bytes
            if size > limit:
                raise ImageTooLarge(f"{reference}: {size} bytes, more than MAX_IMAGE_BYTES={limit}")
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageUnavailable(f"{reference}: no such file under LOCAL_FILES_DOCUMENT_ROOT") from None
        except OSError as exc:
            raise ImageUnavailable(f"{reference}: cannot read {path}: {exc.strerror}") from None

    def _download(self, url: str, reference: str, *, trusted: bool) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            if not trusted:
                check_host(url, self.settings.image_hosts)
            try:
                with self._client.stream("GET", url, headers=self._headers(url)) as response:
                    if response.is_redirect:
                        # Label Studio's own redirects (presigned storage URLs) are trusted; any other
                        # redirect target goes through the host check again.
                        url = urljoin(url, response.headers["location"])
                        continue
                    _raise_for_status(response, reference)
                    return _read_limited(response, self.settings.max_image_bytes, reference)
            except httpx.TimeoutException:
                raise ImageUnavailable(
                    f"{_short(reference)}: no answer within "
                    f"IMAGE_FETCH_TIMEOUT={self.settings.image_fetch_timeout}s") from None
            except httpx.HTTPError as exc:
                raise ImageUnavailable(
                    f"{_short(reference)}: cannot download ({type(exc).__name__}: {exc})") from None
        raise ImageUnavailable(f"{_short(reference)}: more than {MAX_REDIRECTS} redirects")

    def _headers(self, url: str) -> dict[str, str]:
        key = self.settings.label_studio_api_key
        if not key or not self.settings.label_studio_url:
            return {}
        if urlsplit(url).netloc != urlsplit(self.settings.label_studio_url).netloc:
            return {}
        # Personal access tokens are JWTs; legacy tokens are opaque.
        scheme = "Bearer" if key.count(".") == 2 else "Token"
        return {"Authorization": f"{scheme} {key}"}


def check_host(url: str, allowed_hosts: tuple[str, ...]) -> None:
    """Raise `ImageNotAllowed` unless `url` may be fetched: http(s), a listed host (or `*`), and no loopback,
    private, link-local or reserved address unless the host is listed by name or address."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise ImageNotAllowed(f"{_short(url)}: only http(s) URLs with a host are fetched")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ImageNotAllowed(f"{_short(url)}: invalid port") from None
    listed = host in allowed_hosts or f"{host}:{port}" in allowed_hosts
    if not listed and "*" not in allowed_hosts:
        shown = ", ".join(allowed_hosts) or "none: set LABEL_STUDIO_URL or ALLOWED_IMAGE_HOSTS"
        raise ImageNotAllowed(f"{_short(url)}: host {host!r} is not in ALLOWED_IMAGE_HOSTS ({shown})")
    if listed:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise ImageUnavailable(f"{_short(url)}: cannot resolve {host!r} ({exc.strerror})") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global:
            raise ImageNotAllowed(
                f"{_short(url)}: {host!r} resolves to the non-public address {ip}; list the host in "
                "ALLOWED_IMAGE_HOSTS to allow it")


def decode_image(data: bytes, max_pixels: int, reference: str = "image") -> Image.Image:
    """Decode bytes into an RGB image with EXIF orientation applied, refusing more than `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{_short(reference)}: {width}x{height} = {width * height} pixels, more than "
                    f"MAX_IMAGE_PIXELS={max_pixels}")
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        # Pillow refuses absurd sizes while reading the header, before our own check can run.
        raise ImageTooLarge(f"{_short(reference)}: more than MAX_IMAGE_PIXELS={max_pixels} ({exc})") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise ImageCorrupt(f"{_short(reference)}: not a decodable image ({exc})") from None


def _raise_for_status(response: httpx.Response, reference: str) -> None:
    status = response.status_code
    if status < 400:
        return
    if status in (401, 403):
        raise ImageUnavailable(
            f"{_short(reference)}: HTTP {status} from {response.url.host}; for Label Studio files check "
            "LABEL_STUDIO_API_KEY (a legacy token must be enabled for the organization)")
    if status == 404:
        raise ImageUnavailable(f"{_short(reference)}: HTTP 404, no such image")
    raise ImageUnavailable(f"{_short(reference)}: HTTP {status} from {response.url.host}")


def _read_limited(response: httpx.Response, limit: int, reference: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"{_short(reference)}: {declared} bytes, more than MAX_IMAGE_BYTES={limit}")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise ImageTooLarge(f"{_short(reference)}: more than MAX_IMAGE_BYTES={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _short(reference: str) -> str:
    # Presigned URLs carry credentials in their query string: never repeat it in messages or logs.
    text = reference.split("?", 1)[0] if "://" in reference else reference
    return text if len(text) <= 200 else text[:197] + "..."
