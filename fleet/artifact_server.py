"""The fleet's artifact server: update bundles, model and config artifacts over HTTPS with
Range requests (so a box resumes an interrupted download), and a sha256 listing.

    GET  /index.json     {"artifacts": {NAME: {"size": int, "sha256": hex}}}
    GET  /NAME           the file; `Range: bytes=N-` or `bytes=N-M` gives 206 Partial Content
    HEAD /NAME           its size (Accept-Ranges: bytes)

TLS uses a certificate from the fleet PKI (provisioning/pki.py, kind "broker": serverAuth with
DNS/IP names); with `client_ca` the server also asks for a box certificate (mutual TLS). Files
are served from one folder only (no path outside it, no hidden files). A small threaded
http.server is enough: each box downloads once per release.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
CHUNK = 256 * 1024


@dataclass
class CutPolicy:
    """For tests and benchmarks: cut the connection after `after_bytes` of a body, for the
    next `times` responses (a network that drops mid-download)."""

    after_bytes: int
    times: int = 1


class _Listing:
    """sha256 of each file, recomputed only when its size or mtime changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, tuple[int, int, str]] = {}
        self.lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        st = path.stat()
        with self.lock:
            hit = self.cache.get(path.name)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        with self.lock:
            self.cache[path.name] = (st.st_size, st.st_mtime_ns, h.hexdigest())
        return h.hexdigest()

    def index(self) -> dict:
        out = {}
        for p in sorted(self.root.iterdir()):
            if p.is_file() and NAME_RE.match(p.name):
                out[p.name] = {"size": p.stat().st_size, "sha256": self.sha256(p)}
        return {"artifacts": out}


class ArtifactServer:
    """An HTTPS (or, without cert, plain HTTP for local tests) server of one folder."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 client_ca: str | Path | None = None, cut: CutPolicy | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"artifact folder {self.root}: no such folder")
        self.listing = _Listing(self.root)
        self.cut = cut
        self.cut_lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.tls = cert is not None
        if cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cert), str(key) if key else None)
            if client_ca:
                ctx.load_verify_locations(str(client_ca))
                ctx.verify_mode = ssl.CERT_REQUIRED
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return self.httpd.server_address[1]

    def url(self, name: str = "", host: str = "127.0.0.1") -> str:
        """URL of a file on this server."""
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/{name}"

    def take_cut(self) -> int | None:
        """Bytes after which to cut this response (None: send it whole)."""
        with self.cut_lock:
            if self.cut and self.cut.times > 0:
                self.cut.times -= 1
                return self.cut.after_bytes
        return None

    def start(self) -> ArtifactServer:
        """Serve in a background thread."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="artifacts",
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread:
            self.thread.join(5)

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(server: ArtifactServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args) -> None:  # quiet: the fleet logs elsewhere
            return

        def _file(self) -> Path | None:
            name = self.path.split("?", 1)[0].lstrip("/")
            if not NAME_RE.match(name):
                return None
            p = server.root / name
            return p if p.is_file() else None

        def _error(self, code: int, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            rng = self.headers.get("Range", "")
            server.requests.append((self.command, self.path, rng))
            if self.path.split("?", 1)[0] == "/index.json":
                body = json.dumps(server.listing.index(), indent=1).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            p = self._file()
            if p is None:
                self._error(404, f"{self.path}: no such artifact (see /index.json)")
                return
            size = p.stat().st_size
            start, end = 0, size - 1
            if rng:
                m = RANGE_RE.match(rng.strip())
                if not m:
                    self._error(416, f"Range {rng!r}: only bytes=N- or bytes=N-M")
                    return
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = server.take_cut()
            left, sent = end - start + 1, 0
            with open(p, "rb") as f:
                f.seek(start)
                while left:
                    n = min(CHUNK, left)
                    if cut is not None:
                        n = min(n, cut - sent)
                        if n <= 0:
                            self.wfile.flush()
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                    chunk = f.read(n)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    sent += len(chunk)

    return Handler


def main(argv: list[str] | None = None) -> int:
    """`python -m echoel.fleet.artifact_server DIR --cert C --key K [--port P]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m echoel.fleet.artifact_server",
                                 description="serve update artifacts over HTTPS with Range")
    ap.add_argument("root")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--cert", required=True, help="server certificate (fleet PKI)")
    ap.add_argument("--key", required=True)
    ap.add_argument("--client-ca", help="require box certificates issued by this CA")
    args = ap.parse_args(argv)
    srv = ArtifactServer(args.root, args.host, args.port, args.cert, args.key, args.client_ca)
    print(f"serving {srv.root} on {srv.url()} (index: {srv.url('index.json')})", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
