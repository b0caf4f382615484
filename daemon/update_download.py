"""Download an update artifact with resume (HTTP Range), checking space, size and sha256.

The artifact goes to DEST.part first, with DEST.part.json saying which artifact (url, size,
sha256) it belongs to; an interrupted download (connection cut, agent restart, reboot) goes on
from the bytes already there, asking the server for `Range: bytes=N-`. Only a complete file
whose size and sha256 match is renamed to DEST. Before anything is written, the folder must
have room for what is missing plus a reserve: a full disk is refused up front, never discovered
half-way (a write that still fails with ENOSPC is reported the same way).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import queue
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1024 * 1024
QUEUE_CHUNKS = 8
SCHEMES = ("https", "http", "file", "")


class DownloadError(RuntimeError):
    """A download that did not give the expected file; `kind` is one of space, network,
    http, size, sha256, source."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class Downloaded:
    """A verified artifact and how it came."""

    path: Path
    size: int
    sha256: str
    resumed_from: int  # bytes already there when this call started (0: from scratch)
    attempts: int
    seconds: float


@dataclass(frozen=True)
class TlsFiles:
    """The artifact server's CA and, for mutual TLS, this box's certificate and key."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def context(self) -> ssl.SSLContext:
        """An SSL context verifying the server against ca_file (system CAs when empty)."""
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use in `folder`'s filesystem."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def _existing(part: Path, meta: Path, ident: dict) -> int:
    """Bytes of a partial download of the same artifact (0, removing it, if it is another)."""
    try:
        same = json.loads(meta.read_text()) == ident
    except (OSError, ValueError):
        same = False
    if same and part.is_file():
        n = part.stat().st_size
        if n <= ident["size"]:
            return n
    for p in (part, meta):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return 0


def _hash_prefix(part: Path, n: int) -> hashlib._Hash:
    h = hashlib.sha256()
    if n == 0:
        return h
    with open(part, "rb") as f:
        left = n
        while left:
            chunk = f.read(min(CHUNK * 4, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h


def download(url: str, dest: str | Path, size: int, sha256: str,
             progress: Callable[[int, int], None] | None = None, tls: TlsFiles | None = None,
             attempts: int = 5, timeout_s: float = 30.0, reserve_bytes: int = 16 << 20,
             backoff_s: float = 1.0) -> Downloaded:
    """Fetch `url` (https, http, file:// or a local path) to `dest`, resuming a partial
    download of the same artifact, retrying a cut connection up to `attempts` times.

    `progress(done, size)` is called as bytes arrive. DownloadError says what went wrong; the
    partial file is kept for the next call unless its content was proved wrong.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in SCHEMES or (len(scheme) == 1):
        raise DownloadError("source", f"url {url!r}: scheme {scheme!r} not allowed; "
                            "allowed: https, http, file (or a local path)")
    part, meta = _part_paths(dest)
    ident = {"url": url, "size": size, "sha256": sha256}
    have = _existing(part, meta, ident)
    resumed_from = have
    need = size - have + reserve_bytes
    free = free_bytes(dest.parent)
    if free < need:
        raise DownloadError("space", f"{dest.parent}: {free / 1e6:.1f} MB free; the artifact "
                            f"needs {(size - have) / 1e6:.1f} MB more plus a reserve of "
                            f"{reserve_bytes / 1e6:.0f} MB; nothing was downloaded (free space "
                            "on the data partition)")
    meta.write_text(json.dumps(ident))
    hs = [_hash_prefix(part, have)]
    tries = 0
    last_error = ""
    while have < size:
        tries += 1
        try:
            have = _fetch_into(url, scheme, part, have, size, hs, progress, tls, timeout_s)
        except DownloadError:
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DownloadError("space", f"{part}: the disk filled up after {have} of "
                                    f"{size} bytes; the partial file is kept") from None
            last_error = f"{type(exc).__name__}: {exc}"
        except http.client.HTTPException as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        have = part.stat().st_size if part.exists() else 0
        if have < size:
            if tries >= attempts:
                raise DownloadError("network", f"{url}: {have} of {size} bytes after {tries} "
                                    f"attempt(s) ({last_error or 'connection closed early'}); "
                                    "the partial file is kept: the next try resumes from there")
            time.sleep(min(backoff_s * 2 ** (tries - 1), 30.0))
            hs = [_hash_prefix(part, have)]
    got = part.stat().st_size
    if got != size:
        _discard(part, meta)
        raise DownloadError("size", f"{url}: {got} bytes; the update says size = {size}")
    digest = hs[0].hexdigest()
    if digest != sha256:
        _discard(part, meta)
        raise DownloadError("sha256", f"{url}: sha256 is {digest}; the update says {sha256} "
                            "(corrupted or a different file; discarded)")
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    with contextlib.suppress(FileNotFoundError):
        meta.unlink()
    return Downloaded(dest, size, digest, resumed_from, max(tries, 1),
                      round(time.monotonic() - t0, 3))


def _discard(part: Path, meta: Path) -> None:
    for p in (part, meta):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _fetch_into(url: str, scheme: str, part: Path, have: int, size: int,
                hs: list[hashlib._Hash], progress: Callable[[int, int], None] | None,
                tls: TlsFiles | None, timeout_s: float) -> int:
    """Append bytes have..size to `part`; returns the new length."""
    if scheme in ("file", ""):
        src = Path(urllib.parse.urlparse(url).path if scheme == "file" else url)
        if not src.is_file():
            raise DownloadError("source", f"{src}: no such file")
        with open(src, "rb") as r, open(part, "ab") as f:
            r.seek(have)
            return _copy(r, f, have, size, hs[0], progress, url)
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    ctx = (tls or TlsFiles()).context() if scheme == "https" else None
    try:
        r = urllib.request.urlopen(req, timeout=timeout_s, context=ctx)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the server has no byte past ours: start again
            part.unlink()
            hs[0] = hashlib.sha256()
            return 0
        raise DownloadError("http", f"{url}: HTTP {exc.code} {exc.reason}") from None
    with r:
        if have and r.status == 200:  # no range support: start from scratch
            have = 0
            hs[0] = hashlib.sha256()
            mode = "wb"
        elif have:
            cr = r.headers.get("Content-Range", "")
            if not cr.startswith(f"bytes {have}-"):
                raise DownloadError("http", f"{url}: asked for bytes {have}-, the server sent "
                                    f"Content-Range {cr!r}")
            mode = "ab"
        else:
            mode = "wb"
        with open(part, mode) as f:
            return _copy(r, f, have, size, hs[0], progress, url)


def _copy(r, f, have: int, size: int, h: hashlib._Hash,
          progress: Callable[[int, int], None] | None, url: str) -> int:
    """Read from `r`, write and hash in a second thread (both release the GIL, so the
    network, the disk and sha256 overlap). Every byte read is written before this returns or
    raises, so a partial file is always a true prefix."""
    q: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
    failed: list[BaseException] = []

    def writer() -> None:
        while (chunk := q.get()) is not None:
            if failed:
                continue
            try:
                f.write(chunk)
                h.update(chunk)
            except BaseException as exc:  # handed to the reader below
                failed.append(exc)

    t = threading.Thread(target=writer, name="download-writer", daemon=True)
    t.start()
    try:
        while not failed:
            chunk = r.read(CHUNK)
            if not chunk:
                break
            if have + len(chunk) > size:
                raise DownloadError("size", f"{url}: more than the {size} bytes the update "
                                    "says; refused")
            q.put(chunk)
            have += len(chunk)
            if progress is not None:
                progress(have, size)
    finally:
        q.put(None)
        t.join()
        f.flush()
    if failed:
        raise failed[0]
    return have


def clear(dest: str | Path) -> None:
    """Remove a downloaded artifact and any partial download of it."""
    dest = Path(dest)
    for p in (dest, *_part_paths(dest)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
