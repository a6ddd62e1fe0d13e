"""Image URLs that never answer, stall, stream forever or are too large: bounded, and named.

Real HTTP servers on 127.0.0.1, each in a thread of the test: one that accepts
connections and never answers, one that stops half-way through a body, one
that streams a chunked body forever, and one whose image is larger than the
limit. Every case ends within seconds with one error naming the URL, its
index and the limit it hit; memory stays bounded.
"""

from __future__ import annotations

import resource
import socket
import socketserver
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sklearn_transfer import CNNFeatureTransformer, extract_codes, images, read_codes
from sklearn_transfer.images import ImageLoadError, read_images_bytes

from .conftest import make_tiny_backbone

pytest.importorskip("aiohttp", reason="fsspec reads http:// URLs with aiohttp")


class Misbehaving(socketserver.BaseRequestHandler):
    """Answers as its path says: /silent, /stall, /endless, /huge, or a small PNG."""

    png = b""

    def handle(self) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            request += chunk
        method, path = request.split(b" ")[:2]
        send = self.request.sendall
        if path == b"/silent":
            time.sleep(30)  # accepted, never answered
            return
        if path == b"/endless":
            send(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
            if method == b"HEAD":
                return
            block = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
            try:
                while True:
                    send(block)
            except OSError:  # the client went away: done
                return
        body = bytes(3 * 2**20) if path == b"/huge" else self.png
        send(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
             % len(body))
        if method == b"HEAD":
            return
        if path == b"/stall":
            send(body[: len(body) // 2])
            time.sleep(30)  # half the body, then nothing
            return
        send(body)


@pytest.fixture
def server(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "ok.png")
    Misbehaving.png = (tmp_path / "ok.png").read_bytes()

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), Misbehaving) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{srv.server_address[1]}"
        srv.shutdown()


@pytest.fixture
def short_limits(monkeypatch):
    monkeypatch.setattr(images, "URL_READ_TIMEOUT", 1.0)
    monkeypatch.setattr(images, "URL_CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 2**20)


def test_a_server_that_never_answers_or_stalls_times_out_naming_the_url(server, short_limits):
    urls = [f"{server}/ok.png", f"{server}/silent", f"{server}/ok.png", f"{server}/stall"]
    started = time.monotonic()
    got = read_images_bytes(urls, [0, 1, 2, 3])
    assert time.monotonic() - started < 10
    assert got[0] == got[2] == Misbehaving.png
    for i in (1, 3):
        assert isinstance(got[i], ImageLoadError)
        assert f"image URL '{urls[i]}' (index {i}) sent nothing more within 1 s " \
               "(sklearn_transfer.images.URL_READ_TIMEOUT)" in str(got[i])


def test_an_endless_or_huge_body_is_read_only_up_to_the_limit(server, short_limits):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for path in ("endless", "huge"):
        started = time.monotonic()
        (got,) = read_images_bytes([f"{server}/{path}"], [5])
        assert time.monotonic() - started < 10
        assert isinstance(got, ImageLoadError)
        assert str(got).startswith(f"image URL '{server}/{path}' (index 5) holds more than "
                                   "MAX_IMAGE_BYTES (1048576 bytes")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 64  # bounded by the limit, not by what the servers send


def test_transform_and_extract_codes_name_the_url_and_the_limit(server, short_limits,
                                                                tmp_path):
    tf = CNNFeatureTransformer(make_tiny_backbone(), engine="torch", progress=False).fit()
    urls = [f"{server}/ok.png"] * 3 + [f"{server}/silent"]
    with pytest.raises(ImageLoadError, match=r"/silent' \(index 3\) sent nothing more within "
                                             r"1 s \(sklearn_transfer.images.URL_READ_TIMEOUT"):
        tf.transform(urls)
    urls = [f"{server}/ok.png"] * 3 + [f"{server}/endless"]
    with pytest.warns(UserWarning, match="1 of 4 images could not be read"):
        summary = extract_codes(urls, tmp_path / "codes", tf, partition_size=2)
    assert summary.n_failed == 1
    (failure,) = read_codes(tmp_path / "codes").failures
    assert failure.index == 3 and "holds more than MAX_IMAGE_BYTES" in failure.reason


def test_a_local_file_over_the_limit_is_not_read(tmp_path, short_limits):
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(2 * 2**20)  # sparse: no disk needed
    with pytest.raises(ImageLoadError, match=r"big.png' \(index 0\) has more than "
                                             r"MAX_IMAGE_BYTES \(1048576 bytes"):
        images.read_image_bytes(str(big), 0)


def test_a_port_nobody_listens_on_is_refused_at_once():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (got,) = read_images_bytes([f"http://127.0.0.1:{port}/x.png"], [2])
    assert isinstance(got, ImageLoadError) and "(index 2) could not be read" in str(got)
