"""download fetches through HTTP Range requests, verifies, extracts safely and prepares; served by a local http.server."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests import fixtures_official as fx
from wsml.data import download, formats
from wsml.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CUB = "CUB_200_2011.tgz"


class RangeHandler(BaseHTTPRequestHandler):
    """Serves server.files (name -> bytes), honouring `Range: bytes=N-`; records each request's Range header."""

    def do_GET(self):
        body = self.server.files.get(self.path.lstrip("/"))
        self.server.ranges.append(self.headers.get("Range"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.server.drop_after is not None:
            # announce the whole length, send part of it, hang up: a dropped connection
            self.wfile.write(body[start : start + self.server.drop_after])
            self.server.drop_after = None
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.ranges, httpd.drop_after = {}, [], None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cub_archive(tmp_path, server):
    """A CUB-layout CUB_200_2011.tgz served by `server`; returns (bytes, sha256, expected prepare output)."""
    path = tmp_path / "build" / CUB
    path.parent.mkdir()
    expected = fx.make_cub_archive(path, tmp_path / "build" / "tree")
    body = path.read_bytes()
    server.files[CUB] = body
    return body, hashlib.sha256(body).hexdigest(), expected


def check_prepared(dest: Path, raw: Path, expected: dict) -> None:
    data = formats.read_formatted(dest)
    assert data.class_names == expected["class_names"]
    assert data.image_root == (raw / "CUB_200_2011" / "images").resolve()
    for split in ("train", "val"):
        paths, labels = expected[split]
        assert getattr(data, f"{split}_images").tolist() == [str(data.image_root / p) for p in paths]
        np.testing.assert_array_equal(getattr(data, f"{split}_labels"), labels)


def test_resumes_a_partial_download(tmp_path, server, cub_archive):
    body, sha256, expected = cub_archive
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / f"{CUB}.part").write_bytes(body[:1000])
    dest = download.download("cub", tmp_path / "out", raw=raw, base_url=server.url + "/", expect={CUB: ("sha256", sha256)})
    assert server.ranges == ["bytes=1000-"]
    assert (raw / CUB).read_bytes() == body
    assert not (raw / f"{CUB}.part").exists()
    check_prepared(dest, raw, expected)

    # a rerun finds the archive fetched, verified and extracted: no request
    download.download("cub", tmp_path / "out", raw=raw, base_url=server.url, expect={CUB: ("sha256", sha256)})
    assert server.ranges == ["bytes=1000-"]


def test_dropped_connection_is_resumed(tmp_path, server, cub_archive):
    body, sha256, _ = cub_archive
    server.drop_after = 700
    archive = download.Archive(CUB, "unused", len(body), ("sha256", sha256))
    path = download.fetch(archive, tmp_path, f"{server.url}/{CUB}", backoff_s=0)
    assert server.ranges == [None, "bytes=700-"]
    assert path.read_bytes() == body


def test_checksum_mismatch_extracts_nothing(tmp_path, server, cub_archive):
    raw = tmp_path / "raw"
    with pytest.raises(DataError) as excinfo:
        download.download("cub", tmp_path / "out", raw=raw, base_url=server.url, expect={CUB: ("sha256", "0" * 64)})
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"has sha256 {cub_archive[1]}, expected {'0' * 64}; the download was deleted, nothing extracted" in message
    assert os.listdir(raw) == []
    assert not (tmp_path / "out").exists()


def test_listed_size_guards_a_wrong_mirror(tmp_path, server, cub_archive):
    with pytest.raises(DataError) as excinfo:
        download.download("cub", tmp_path / "out", raw=tmp_path / "raw", base_url=server.url)
    assert f"is {len(cub_archive[0])} bytes but the official {CUB} is 1150585339" in str(excinfo.value)
    assert os.listdir(tmp_path / "raw") == []


def test_cli_full_path_with_env_base_url(tmp_path, server, cub_archive):
    body, sha256, expected = cub_archive
    env = {**os.environ, download.BASE_URL_ENV: server.url}
    command = [sys.executable, "-m", "wsml.data.download", "cub", "--dest", str(tmp_path / "out"), "--expect", f"{CUB}=sha256:{sha256}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert server.ranges == [None]
    # default --raw is a sibling of --dest, where the images stay
    check_prepared(tmp_path / "out", tmp_path / "out_raw", expected)
    assert done.stdout.strip() == f"cub: prepared in {tmp_path / 'out'}"


def tar_with(member: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        safe = tarfile.TarInfo("CUB_200_2011/ok.txt")
        safe.size = 1
        tar.addfile(safe, io.BytesIO(b"x"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize(
    "member",
    [tarfile.TarInfo("../evil.txt"), tarfile.TarInfo("/tmp/evil.txt"), tarfile.TarInfo("a/../../evil.txt"), symlink("CUB_200_2011/link", "../../etc")],
    ids=["dotdot", "absolute", "nested-dotdot", "symlink-out"],
)
def test_unsafe_member_is_refused_before_extraction(tmp_path, server, member):
    body = tar_with(member)
    server.files[CUB] = body
    raw = tmp_path / "raw"
    with pytest.raises(DataError) as excinfo:
        download.download("cub", tmp_path / "out", raw=raw, base_url=server.url, expect={CUB: ("sha256", hashlib.sha256(body).hexdigest())})
    assert f"holds unsafe member {member.name!r}; refusing to extract it (nothing was extracted)" in str(excinfo.value)
    assert sorted(os.listdir(raw)) == [CUB]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset, words", [("nuswide", "request form"), ("openimages", "must be fetched by hand")])
def test_manual_data_sets_explain_and_fail(dataset, words, capsys):
    assert download.main([dataset]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {dataset}") and words in err and err.count("\n") == 1


def test_bad_expect_and_missing_dest(tmp_path, capsys):
    assert download.main(["cub", "--dest", str(tmp_path / "out"), "--expect", "other.tgz=md5:00"]) == 2
    assert "--expect names other.tgz, which is not one of cub's archives (CUB_200_2011.tgz)" in capsys.readouterr().err
    assert download.main(["cub"]) == 2
    assert capsys.readouterr().err.startswith("error: --dest is required")


def test_archive_table_is_complete():
    for archives in download.ARCHIVES.values():
        for archive in archives:
            assert archive.url.endswith("/" + archive.file_name)
            assert archive.size and archive.size > 10**8
            assert archive.checksum[0] == "md5" and re.fullmatch(r"[0-9a-f]{32}", archive.checksum[1])
