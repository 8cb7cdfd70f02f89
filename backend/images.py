"""Fetch and decode task images with one policy for where they may come from, and a budget for each fetch.

A task's image reference (`ImageLoader.load`) is located first (`locate`), then fetched:

- `/data/upload/…` (also `upload/…`), `/storage-data/…`, `/data/local-files/?d=…`: from Label Studio
  (`LABEL_STUDIO_URL`), with its token (`backend.labelstudio`'s credentials, shared with its API client: a
  personal access token's access token is refreshed once when Label Studio answers 401);
- `/data/local-files/?d=<path>` with LOCAL_FILES_DOCUMENT_ROOT set: from that folder, regular files only;
- `s3://`, `gs://`, `azure-blob://`: through Label Studio's `/tasks/<id>/presign/` route (with the token),
  then the one redirect it answers with (without it);
- `http(s)://` on Label Studio's own scheme, host and port, under one of those paths: as the paths, with
  the token;
- any other `http(s)://` URL: from its host when ALLOWED_IMAGE_HOSTS allows it (by default only Label
  Studio's host), never with the token.

Anything else is refused before a byte is sent: other paths of Label Studio's (`/api/…`), references that
leave their prefix after normalisation (`..`, percent-encoded dots, backslashes, NUL bytes), URLs with
user info, other schemes. A host not listed by name must resolve to public addresses only; the address
checked is the one connected to (no second lookup, so DNS rebinding cannot swap it), IPv4 and IPv6 alike.
Every redirect goes through the same checks, except the single redirect of Label Studio's presign route,
which points at the storage it signed.

Every fetch has one budget fixed before it starts: IMAGE_FETCH_TIMEOUT for the whole download, redirects
included (each socket read gets what is left, so a host trickling bytes is cut off on time); MAX_IMAGE_BYTES
counted on the bytes as they arrive; `Accept-Encoding: identity`, and an answer that is compressed anyway
is refused, so a few kilobytes cannot inflate into gigabytes; MAX_IMAGE_PIXELS checked from the header
before decoding; and only the decoders of IMAGE_FORMATS. EXIF orientation is applied (the browser shows
the image that way, so Label Studio's coordinates refer to it) and the result is RGB.

The locating rules, the network guard and the budget are one policy and are kept in one module, to be
read (and audited) together.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit, urlunsplit

import httpcore
from PIL import Image, ImageOps

from backend.labelstudio import LabelStudioCredentials, LabelStudioError, credentials_for, same_origin
from backend.settings import Settings

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
MAX_REDIRECTS = 3
# Paths of Label Studio's that serve stored files; nothing else of it is ever fetched with its token.
STORAGE_PREFIXES = ("/data/upload/", "/data/local-files/", "/storage-data/")
LOCAL_FILES_PREFIX = "/data/local-files"
_PRESIGN_PATH = re.compile(r"^/tasks/[1-9][0-9]{0,17}/presign/$")


class ImageError(ValueError):
    """An image cannot be used; the message says why and what to change."""


class ImageNotAllowed(ImageError):
    """The reference points somewhere images may not come from."""


class ImageUnavailable(ImageError):
    """The image could not be downloaded or read."""


class ImageTooLarge(ImageError):
    """The image exceeds MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""


class ImageCorrupt(ImageError):
    """The bytes are not a decodable image of an accepted format."""


class _NotStorage(ImageNotAllowed):
    """A clean path of Label Studio's that is not one of its storage routes."""


class SourceKind(enum.StrEnum):
    """Where a reference is fetched from."""

    LABEL_STUDIO = "label studio"
    PRESIGN = "presign"
    # The storage URL Label Studio's presign route redirects to: fetched without the host checks.
    SIGNED = "signed"
    REMOTE = "remote"
    LOCAL = "local"


@dataclass(frozen=True)
class Source:
    """A located reference: a URL (or a local path) and how it is fetched."""

    kind: SourceKind
    url: str = ""
    path: Path | None = None


# ---------------------------------------------------------------------- locating
def locate(settings: Settings, reference: Any, task_id: Any = None) -> Source:
    """Where `reference` may be fetched from, or `ImageNotAllowed` / `ImageUnavailable` saying why not."""
    if not isinstance(reference, str) or not reference.strip():
        raise ImageUnavailable("the task has an empty image reference")
    reference = reference.strip()
    if any(ord(c) < 32 or c == "\x7f" for c in reference):
        raise ImageNotAllowed(f"{_short(reference)}: the image reference contains control characters")
    base = settings.label_studio_url.rstrip("/")
    if reference.startswith(CLOUD_SCHEMES):
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id <= 0:
            raise ImageUnavailable(f"{_short(reference)}: a cloud storage image needs its (integer) task id for "
                                   "Label Studio's presign route")
        fileuri = base64.urlsafe_b64encode(reference.encode()).decode()
        return Source(SourceKind.PRESIGN, _label_studio_url(base, f"/tasks/{task_id}/presign/?fileuri={fileuri}",
                                                            reference))
    if reference.startswith(("upload/", "/upload/")):
        reference = "/data/" + reference.lstrip("/")
    if reference.startswith("/"):
        path, query = _storage_path(reference)
        if path.startswith(LOCAL_FILES_PREFIX) and settings.local_files_document_root:
            return Source(SourceKind.LOCAL, path=_local_path(settings, query, reference))
        return Source(SourceKind.LABEL_STUDIO, _label_studio_url(base, reference, reference))
    parts = urlsplit(reference)
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise ImageUnavailable(
            f"{_short(reference)}: unsupported image reference (expected an http(s) URL, a Label Studio "
            "/data/upload or /data/local-files path, or an s3://, gs:// or azure-blob:// URI)")
    if parts.username is not None or parts.password is not None:
        raise ImageNotAllowed(f"{_short(reference)}: image URLs with user info are not fetched")
    if base and same_origin(reference, base):
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            _storage_path(path)
        except _NotStorage:
            pass  # another (clean) path of Label Studio's host: fetched like any URL, without the token
        else:
            return Source(SourceKind.LABEL_STUDIO, _label_studio_url(base, path, reference))
    return Source(SourceKind.REMOTE, reference.split("#", 1)[0])


def _storage_path(reference: str) -> tuple[str, str]:
    """(path, query) of a Label Studio storage reference, refused unless it stays under a storage prefix."""
    if "\\" in reference or "#" in reference:
        raise ImageNotAllowed(f"{_short(reference)}: backslashes and fragments are not allowed in Label Studio "
                              "paths")
    path, _, query = reference.partition("?")
    decoded = unquote(path)
    segments = decoded.split("/")
    if any(s in {".", ".."} for s in segments) or "//" in decoded or "\\" in decoded:
        raise ImageNotAllowed(f"{_short(reference)}: the path leaves Label Studio's storage")
    if not (decoded.startswith(STORAGE_PREFIXES) or decoded in {LOCAL_FILES_PREFIX, LOCAL_FILES_PREFIX + "/"}):
        raise _NotStorage(
            f"{_short(reference)}: not a Label Studio storage path (images come from "
            f"{', '.join(STORAGE_PREFIXES)}, or from a URL on an allowed host)")
    return decoded, query


def _label_studio_url(base: str, path: str, reference: str) -> str:
    if not base:
        raise ImageUnavailable(f"{_short(reference)} is stored in Label Studio: set LABEL_STUDIO_URL (reachable "
                               "from the worker) and LABEL_STUDIO_API_KEY")
    return base + path


def _local_path(settings: Settings, query: str, reference: str) -> Path:
    root = Path(settings.local_files_document_root).resolve()
    values = parse_qs(query, keep_blank_values=True).get("d")
    relative = values[-1] if values else ""
    if not relative:
        raise ImageUnavailable(f"{_short(reference)}: a local-files URL needs ?d=<path>")
    if "\x00" in relative:
        raise ImageNotAllowed(f"{_short(reference)}: the path contains a NUL byte")
    path = (root / relative.lstrip("/")).resolve()
    if not path.is_relative_to(root):
        raise ImageNotAllowed(f"{_short(reference)}: the path leaves LOCAL_FILES_DOCUMENT_ROOT")
    return path


# ---------------------------------------------------------------------- the network policy
@dataclass
class _Fetch:
    """The fetch in progress on a thread: when it must end and which hosts it may connect to."""

    deadline: float
    # Host names whose addresses need no check (Label Studio's own host, explicitly listed hosts, the
    # storage host a presign redirect names).
    trusted_hosts: set[str]

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the image fetch ran out of time")
        return left


class _GuardedBackend(httpcore.NetworkBackend):
    """Connects only to addresses the current fetch may reach, resolved once, and gives every connect, read
    and write at most what is left of the fetch's time."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()
        self._local = threading.local()

    @property
    def fetch(self) -> _Fetch:
        fetch = getattr(self._local, "fetch", None)
        if fetch is None:
            raise httpcore.ConnectError("no image fetch in progress")
        return fetch

    def begin(self, fetch: _Fetch | None) -> None:
        self._local.fetch = fetch

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        fetch = self.fetch
        address = _checked_address(host, port, host.lower() in fetch.trusted_hosts, fetch)
        stream = self._inner.connect_tcp(address, port, timeout=_bounded(timeout, fetch), local_address=local_address,
                                         socket_options=socket_options)
        return _DeadlineStream(stream, self)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("images are not fetched over Unix sockets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, backend: _GuardedBackend):
        self._inner = inner
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, self._backend.fetch))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, self._backend.fetch))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, _bounded(timeout, self._backend.fetch))
        return _DeadlineStream(inner, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _bounded(timeout: float | None, fetch: _Fetch) -> float:
    left = fetch.remaining()
    return left if timeout is None else min(timeout, left)


def _checked_address(host: str, port: int, trusted: bool, fetch: _Fetch) -> str:
    """The one address connected to: resolved here within the fetch's time, and public unless the host is
    trusted."""
    infos = _resolve(host, port, fetch.remaining())
    addresses = [info[4][0] for info in infos]
    if not trusted:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            if not ip.is_global or (mapped is not None and not mapped.is_global):
                raise _Refused(f"{host!r} resolves to the non-public address {ip}; list the host in "
                               "ALLOWED_IMAGE_HOSTS to allow it")
    return addresses[0]


def _resolve(host: str, port: int, timeout: float) -> list[Any]:
    """`socket.getaddrinfo`, given at most `timeout` seconds: the resolver has no timeout of its own and a slow
    name server would hold the fetch past its deadline. The lookup runs on a daemon thread, left to finish
    on its own when time is up."""
    answer: list[Any] = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name the idna codec cannot encode
            answer.append(exc)

    thread = threading.Thread(target=lookup, daemon=True, name="image-dns")
    thread.start()
    thread.join(timeout)
    if not answer:
        raise httpcore.ConnectTimeout(f"resolving {host!r} took longer than the fetch had left")
    result = answer[0]
    if isinstance(result, BaseException):
        reason = result.strerror if isinstance(result, socket.gaierror) else str(result)
        raise httpcore.ConnectError(f"cannot resolve {host!r} ({reason})")
    return result


class _Refused(httpcore.ConnectError):
    """The address policy refused a connection (raised inside httpcore, reported as ImageNotAllowed)."""


def check_host(url: str, allowed_hosts: tuple[str, ...]) -> None:
    """Raise `ImageNotAllowed` unless `url` is http(s) on a host ALLOWED_IMAGE_HOSTS allows (`*`: any host;
    whether its addresses are public is checked when connecting)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise ImageNotAllowed(f"{_short(url)}: only http(s) URLs with a host are fetched")
    if parts.username is not None or parts.password is not None:
        raise ImageNotAllowed(f"{_short(url)}: image URLs with user info are not fetched")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ImageNotAllowed(f"{_short(url)}: invalid port") from None
    host = parts.hostname.lower()
    if host in allowed_hosts or f"{host}:{port}" in allowed_hosts or "*" in allowed_hosts:
        return
    shown = ", ".join(allowed_hosts) or "none: set LABEL_STUDIO_URL or ALLOWED_IMAGE_HOSTS"
    raise ImageNotAllowed(f"{_short(url)}: host {host!r} is not in ALLOWED_IMAGE_HOSTS ({shown})")


# ---------------------------------------------------------------------- the loader
class ImageLoader:
    """Fetches and decodes images for one process (see the module docstring); one connection pool."""

    def __init__(self, settings: Settings, credentials: LabelStudioCredentials | None = None):
        Image.init()
        unknown = [f for f in settings.image_formats if f not in Image.OPEN]
        if unknown:
            raise ImageError(f"IMAGE_FORMATS names formats Pillow cannot open: {', '.join(unknown)} (it can: "
                             f"{', '.join(sorted(Image.OPEN))})")
        self.settings = settings
        self.credentials = credentials or credentials_for(settings)
        self._backend = _GuardedBackend()
        self._pool = httpcore.ConnectionPool(ssl_context=ssl.create_default_context(),
                                             network_backend=self._backend, max_connections=16,
                                             keepalive_expiry=30.0)
        label_studio = urlsplit(settings.label_studio_url).hostname if settings.label_studio_url else None
        listed = {h.rsplit(":", 1)[0] if not h.startswith("[") else h for h in settings.allowed_image_hosts}
        self._trusted = {h for h in (label_studio, *listed) if h and h != "*"}

    def close(self) -> None:
        """Release the connection pool."""
        self._pool.close()

    def load(self, reference: str, task_id: int | None = None) -> Image.Image:
        """The decoded RGB image a task refers to."""
        return decode_image(self.fetch(reference, task_id), self.settings.max_image_pixels, reference,
                            self.settings.image_formats)

    def fetch(self, reference: str, task_id: int | None = None) -> bytes:
        """The raw bytes of an image reference."""
        source = locate(self.settings, reference, task_id)
        if source.kind is SourceKind.LOCAL:
            assert source.path is not None
            return _read_local(source.path, self.settings.max_image_bytes, reference)
        deadline = time.monotonic() + self.settings.image_fetch_timeout
        fetch = _Fetch(deadline, set(self._trusted))
        self._backend.begin(fetch)
        try:
            return self._download(source, reference, fetch)
        finally:
            self._backend.begin(None)

    def _download(self, source: Source, reference: str, fetch: _Fetch) -> bytes:
        url, kind = _ascii_url(source.url, reference), source.kind
        for _ in range(MAX_REDIRECTS + 1):
            if kind is SourceKind.REMOTE:
                check_host(url, self.settings.image_hosts)
            try:
                with self._get(url, kind, reference) as response:
                    location = _header(response, b"location")
                    if 300 <= response.status < 400 and location:
                        url = _ascii_url(urljoin(url, _utf8(location)), reference)
                        # The presign route's one redirect points at the storage Label Studio signed; any
                        # other redirect, and any after that one, is checked like a task's own URL.
                        kind = SourceKind.SIGNED if kind is SourceKind.PRESIGN else SourceKind.REMOTE
                        if kind is SourceKind.SIGNED:
                            if urlsplit(url).scheme.lower() not in {"http", "https"}:
                                raise ImageNotAllowed(f"{_short(reference)}: the presign route redirected to a "
                                                      "non-http(s) URL")
                            fetch.trusted_hosts.add((urlsplit(url).hostname or "").lower())
                        continue
                    _raise_for_status(response.status, url, reference)
                    return _read_limited(response, self.settings.max_image_bytes, reference)
            except _Refused as exc:
                raise ImageNotAllowed(f"{_short(reference)}: {exc}") from None
            except httpcore.TimeoutException:
                raise ImageUnavailable(f"{_short(reference)}: not downloaded within "
                                       f"IMAGE_FETCH_TIMEOUT={self.settings.image_fetch_timeout:g}s") from None
            except ImageError:
                raise
            except Exception as exc:
                # Whatever else a hostile reference or host makes the HTTP stack raise is still this image's
                # error, never the job's (httpcore raises TypeError, ValueError, UnicodeError, ... as well).
                raise ImageUnavailable(f"{_short(reference)}: cannot download ({type(exc).__name__}: "
                                       f"{_short(str(exc))})") from None
        raise ImageUnavailable(f"{_short(reference)}: more than {MAX_REDIRECTS} redirects")

    @contextlib.contextmanager
    def _get(self, url: str, kind: SourceKind, reference: str) -> Iterator[httpcore.Response]:
        """One GET of the fetch; Label Studio's 401 to an access token (expired or revoked before its time)
        refreshes it and sends the request once more, as the API client does."""
        sent = self._authorization(url, kind, reference)
        with self._pool.stream("GET", url, headers=_headers(sent)) as response:
            retry = self._retry_authorization(sent, reference) if response.status == 401 else None
            if retry is None:
                yield response
                return
        with self._pool.stream("GET", url, headers=_headers(retry)) as response:
            yield response

    def _authorization(self, url: str, kind: SourceKind, reference: str) -> str | None:
        """The Authorization header a request to `url` carries: Label Studio's token on its storage and presign
        routes, nothing anywhere else."""
        if kind not in (SourceKind.LABEL_STUDIO, SourceKind.PRESIGN) or not self._sends_token(url):
            return None
        if self.credentials is None:
            raise ImageUnavailable(f"{_short(url)} is stored in Label Studio, which requires a token: set "
                                   "LABEL_STUDIO_API_KEY (a personal access token, or a legacy token)")
        return _token_call(self.credentials.header, reference)

    def _retry_authorization(self, sent: str | None, reference: str) -> str | None:
        """The header to send a refused request once more with, or None when no retry can help."""
        credentials = self.credentials
        if sent is None or credentials is None:
            return None
        return _token_call(lambda: credentials.retry_header(sent), reference)

    def _sends_token(self, url: str) -> bool:
        base = self.settings.label_studio_url
        if not base or not same_origin(url, base):
            return False
        path = urlsplit(url).path
        return _PRESIGN_PATH.match(path) is not None or unquote(path).startswith(STORAGE_PREFIXES)


# Everything but the ASCII characters a URL may carry as they are: percent-encoded (as UTF-8) before sending.
_NOT_URL_ASCII = re.compile(r"[^\x21-\x7e]+")


def _ascii_url(url: str, reference: str) -> str:
    """`url` as HTTP sends it: a non-ASCII host in its IDNA form, other non-ASCII characters (and spaces)
    percent-encoded, as a browser does with the same reference."""
    if url.isascii() and " " not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        host = parts.hostname or ""
        try:
            netloc = host.encode("idna").decode("ascii") + (f":{parts.port}" if parts.port else "")
        except (UnicodeError, ValueError):
            raise ImageUnavailable(f"{_short(reference)}: {host!r} is not a valid host name") from None
    path, query = (_NOT_URL_ASCII.sub(lambda m: quote(m.group()), part) for part in (parts.path, parts.query))
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def _headers(authorization: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"Accept-Encoding", b"identity"), (b"User-Agent", b"gpt4roi-labelstudio")]
    if authorization is not None:
        headers.append((b"Authorization", authorization.encode()))
    return headers


def _token_call(call: Callable[[], str | None], reference: str) -> str | None:
    """`call()`, which may exchange the personal access token; a failed exchange is the image's error."""
    try:
        return call()
    except LabelStudioError as exc:
        raise ImageUnavailable(f"{_short(reference)}: stored in Label Studio, but no access token to download it "
                               f"with: {exc}") from None


def _utf8(header: str) -> str:
    # Header values arrive as bytes (decoded as latin-1 by `_header`); a Location's non-ASCII bytes are UTF-8
    # in practice, and must be percent-encoded as such.
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return header


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _read_local(path: Path, limit: int, reference: str) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageUnavailable(f"{_short(reference)}: no such file under LOCAL_FILES_DOCUMENT_ROOT") from None
    except OSError as exc:
        raise ImageUnavailable(f"{_short(reference)}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageNotAllowed(f"{_short(reference)}: not a regular file")
    if info.st_size > limit:
        raise ImageTooLarge(f"{_short(reference)}: {info.st_size} bytes, more than MAX_IMAGE_BYTES={limit}")
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ImageUnavailable(f"{_short(reference)}: cannot read it ({exc.strerror})") from None
    if len(data) > limit:
        raise ImageTooLarge(f"{_short(reference)}: more than MAX_IMAGE_BYTES={limit} bytes")
    return data


def _raise_for_status(status: int, url: str, reference: str) -> None:
    if status < 400:
        return
    host = urlsplit(url).hostname
    if status in (401, 403):
        raise ImageUnavailable(
            f"{_short(reference)}: HTTP {status} from {host}; for Label Studio files check LABEL_STUDIO_API_KEY "
            "(a personal access token, or a legacy token where the organization allows them)")
    if status == 404:
        raise ImageUnavailable(f"{_short(reference)}: HTTP 404, no such image")
    raise ImageUnavailable(f"{_short(reference)}: HTTP {status} from {host}")


def _read_limited(response: httpcore.Response, limit: int, reference: str) -> bytes:
    encoding = (_header(response, b"content-encoding") or "identity").strip().lower()
    if encoding not in {"", "identity"}:
        raise ImageUnavailable(f"{_short(reference)}: the server compressed its answer (Content-Encoding: "
                               f"{encoding[:40]}), which is refused: images are fetched as they are stored")
    declared = _header(response, b"content-length")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"{_short(reference)}: {declared.strip()} bytes, more than MAX_IMAGE_BYTES={limit}")
    chunks, size = [], 0
    for chunk in response.iter_stream():
        size += len(chunk)
        if size > limit:
            raise ImageTooLarge(f"{_short(reference)}: more than MAX_IMAGE_BYTES={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int, reference: str = "image",
                 formats: tuple[str, ...] | None = None) -> Image.Image:
    """Decode bytes into an RGB image with EXIF orientation applied, refusing more than `max_pixels` and,
    with `formats`, any other format (decoders of other formats never run)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
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
    except Image.UnidentifiedImageError:
        accepted = f" (accepted: {', '.join(formats)})" if formats else ""
        raise ImageCorrupt(f"{_short(reference)}: not a decodable image{accepted}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageCorrupt(f"{_short(reference)}: not a decodable image ({exc})") from None


def _short(reference: str) -> str:
    # Presigned URLs carry credentials in their query string: never repeat it in messages or logs.
    text = reference.split("?", 1)[0] if "://" in reference else reference
    return text if len(text) <= 200 else text[:197] + "..."
