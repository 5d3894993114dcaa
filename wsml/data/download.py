"""Fetch a data set's official archives, verify and extract them, then build the formatted layout.

    python -m wsml.data.download <pascal|coco|cub> --dest OUT_DIR [--raw DIR] [--base-url URL]
                                 [--expect FILE=ALGO:HEX ...]

* Archives go to --raw (default: OUT_DIR's sibling `<OUT_DIR name>_raw`) and are
  extracted there; the images stay there, so put it on storage every trainer can
  read.  Archives are kept; delete them once `prepare` has run if space is short.
* Downloads resume: bytes land in `<archive>.part` and a rerun continues with
  an HTTP Range request where the last one stopped.
* Each archive is checked against the size and checksum in ARCHIVES before
  anything is extracted; a mismatching download is deleted.  --expect replaces
  an archive's listed checksum (and drops its listed size), for a mirror that
  repacked it.
* Members with absolute paths, `..` or links out of the archive are refused
  before anything is extracted.
* --base-url (or WSML_DOWNLOAD_BASE_URL) replaces the host: every URL becomes
  base URL + "/" + archive file name.

nuswide and openimages cannot be fetched without a request form or a crawl;
for them this prints where to get the files and exits non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from wsml.data import prepare
from wsml.errors import DataError, WSMLError
from wsml.logs import show_on_stderr
from wsml.progress import Progress

_logger = logging.getLogger(__name__)

BASE_URL_ENV = "WSML_DOWNLOAD_BASE_URL"
CHUNK = 1 << 20
REFUSED = "refusing to extract it (nothing was extracted)"
ALGORITHMS = ("md5", "sha1", "sha256", "sha512")


@dataclass(frozen=True)
class Archive:
    file_name: str
    url: str
    size: int | None  # bytes; None: not checked
    checksum: tuple[str, str] | None  # (hashlib algorithm, hex digest); None: size only


# Sizes and md5 sums as the hosts serve them (the md5s are the ones torchvision,
# LAVIS and others pin for these files).
ARCHIVES = {
    "pascal": (
        Archive(
            "VOCtrainval_11-May-2012.tar",
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            1999639040,
            ("md5", "6cd6e144f989b92b3379bac3b3de84fd"),
        ),
    ),
    "coco": (
        Archive(
            "annotations_trainval2014.zip",
            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            252872794,
            ("md5", "0a379cfc70b0e71301e0f377548639bd"),
        ),
        Archive(
            "train2014.zip",
            "http://images.cocodataset.org/zips/train2014.zip",
            13510573713,
            ("md5", "0da8c0bd3d6becc4dcb32757491aca88"),
        ),
        Archive(
            "val2014.zip",
            "http://images.cocodataset.org/zips/val2014.zip",
            6645013297,
            ("md5", "a3d79f5ed8d289b7a7554ce06a5782b3"),
        ),
    ),
    "cub": (
        Archive(
            "CUB_200_2011.tgz",
            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
            1150585339,
            ("md5", "97eceeb196236b17998738112f37df78"),
        ),
    ),
}

MANUAL = {
    "nuswide": (
        "nuswide needs a request form: ask for Flickr.zip at "
        "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html, get "
        "formatted_{train,val}_{images,labels}.npy from https://caltech.box.com/v/single-positive-multi-label, "
        "put them in one folder with Flickr.zip unzipped into Flickr/, then run "
        "`python -m wsml.data.prepare nuswide --source THAT_FOLDER --dest OUT_DIR`"
    ),
    "openimages": (
        "openimages (V3 human labels) must be fetched by hand: the image lists and labels are linked from "
        "https://github.com/openimages/dataset/blob/master/READMEV3.md and the images must be crawled; "
        "put them in a prepared folder (formatted_{train,val}_{images,labels}.npy with -1/0/1 labels and "
        "meta.json, see wsml.data.formats)"
    ),
}


def verify(path: Path, archive: Archive) -> None:
    """Size then checksum; a mismatch raises DataError."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise DataError(f"{path} is {size} bytes, the official {archive.file_name} is {archive.size}")
    if archive.checksum is not None:
        algorithm, want = archive.checksum
        with open(path, "rb") as f:
            got = hashlib.file_digest(f, algorithm).hexdigest()
        if got != want.lower():
            raise DataError(f"{path} has {algorithm} {got}, expected {want}")


def _total_size(response, offset: int) -> int | None:
    """The whole file's size from Content-Range (206) or Content-Length (200)."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            content_range = response.headers.get("Content-Range")
            raise DataError(f"{response.url} answered a Range request with Content-Range {content_range!r}; try again later")
        return int(match.group(2))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _download_into(part: Path, url: str, archive: Archive) -> None:
    """Append the bytes `part` lacks; raises OSError-family errors on a dropped connection (retried by fetch)."""
    have = part.stat().st_size if part.exists() else 0
    if archive.size is not None and have >= archive.size:
        return  # complete (verify decides whether it is right)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            return  # nothing past what we have: the part is complete
        raise
    with response:
        if have and response.status != 206:
            _logger.info(f"{url} ignored the Range request; starting {archive.file_name} over")
            have = 0
        total = _total_size(response, have)
        if archive.size is not None and total is not None and total != archive.size:
            raise DataError(
                f"{url} is {total} bytes but the official {archive.file_name} is {archive.size}; "
                f"check --base-url, or pass --expect {archive.file_name}=ALGO:HEX for a repacked mirror"
            )
        _logger.info(f"downloading {archive.file_name} from {url}" + (f", resuming at byte {have}" if have else ""))
        with open(part, "ab" if have else "wb") as out, \
                Progress(total, f"  {archive.file_name}", "B", initial=have) as shown:
            while block := response.read(CHUNK):
                out.write(block)
                have += len(block)
                shown.update(len(block))
    if total is not None and have < total:
        raise http.client.IncompleteRead(b"", total - have)


def fetch(archive: Archive, raw: Path, url: str, *, tries: int = 5, backoff_s: float = 2.0) -> Path:
    """Download (resuming after dropped connections) and verify one archive into `raw`; returns its path."""
    target = raw / archive.file_name
    if target.exists():
        try:
            verify(target, archive)
        except DataError as err:
            raise DataError(f"{err}; delete it and rerun to download it again") from None
        return target
    part = raw / f"{archive.file_name}.part"
    for attempt in range(1, tries + 1):
        try:
            _download_into(part, url, archive)
            break
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt == tries:
                raise DataError(f"{url} answered HTTP {err.code} {err.reason}; check the URL or --base-url") from None
        except (OSError, http.client.HTTPException) as err:
            if attempt == tries:
                raise DataError(f"downloading {url} failed {tries} times ({err}); rerun to resume from {part}") from None
        _logger.info(f"download of {archive.file_name} interrupted; retry {attempt} of {tries - 1}")
        time.sleep(min(backoff_s**attempt, 60))
    try:
        verify(part, archive)
    except DataError as err:
        part.unlink()
        raise DataError(
            f"{err}; the download was deleted, nothing extracted: rerun to fetch it again or check --base-url"
        ) from None
    os.replace(part, target)
    return target


def _unsafe(name: str) -> bool:
    parts = re.split(r"[\\/]", name)
    return name.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:", name)) or ".." in parts


def _check_members(path: Path) -> None:
    """Refuse the whole archive if one member could land outside the extraction folder."""
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            for member in tar:
                bad = _unsafe(member.name) or member.isdev()
                if member.issym():
                    target = posixpath.join(posixpath.dirname(member.name), member.linkname)  # absolute stays absolute
                    bad = bad or _unsafe(target) or posixpath.normpath(target).startswith("..")
                if member.islnk():
                    bad = bad or _unsafe(member.linkname)
                if bad:
                    raise DataError(f"{path} holds unsafe member {member.name!r}; {REFUSED}")
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if _unsafe(name):
                    raise DataError(f"{path} holds unsafe member {name!r}; {REFUSED}")
    else:
        raise DataError(f"{path} is neither a tar nor a zip archive; delete it and rerun")


def _merge_move(src: Path, dst: Path) -> None:
    """Move src to dst, merging into an existing folder so other content there (e.g. VOCdevkit/VOC2007) survives."""
    if src.is_dir() and not src.is_symlink() and dst.is_dir():
        for child in src.iterdir():
            _merge_move(child, dst / child.name)
        src.rmdir()
    else:
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)


def extract(path: Path, into: Path) -> None:
    """Check every member, extract into a temporary folder, then move the result into `into`."""
    _check_members(path)
    tmp = into / f".extract-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _logger.info(f"extracting {path.name}")
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
        else:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(tmp)
        for child in tmp.iterdir():
            _merge_move(child, into / child.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(
    dataset: str,
    dest,
    *,
    raw=None,
    base_url: str | None = None,
    expect: dict[str, tuple[str, str]] | None = None,
) -> Path:
    """Fetch, verify and extract `dataset`'s archives into `raw`, then prepare it into `dest`; returns dest.

    `expect` maps an archive file name to (algorithm, hex digest) replacing the
    listed checksum and size.  `base_url` defaults to $WSML_DOWNLOAD_BASE_URL.
    """
    if dataset in MANUAL:
        raise DataError(MANUAL[dataset])
    if dataset not in ARCHIVES:
        raise DataError(f"unknown data set {dataset!r}; choose one of {', '.join(ARCHIVES)}")
    archives = {a.file_name: a for a in ARCHIVES[dataset]}
    for name, (algorithm, digest) in (expect or {}).items():
        if name not in archives:
            raise DataError(f"--expect names {name}, which is not one of {dataset}'s archives ({', '.join(archives)})")
        if algorithm not in ALGORITHMS or not re.fullmatch(r"[0-9a-fA-F]+", digest):
            raise DataError(f"--expect {name}={algorithm}:{digest} is not ALGO:HEX with ALGO one of {', '.join(ALGORITHMS)}")
        archives[name] = replace(archives[name], checksum=(algorithm, digest), size=None)
    dest = Path(dest).absolute()
    raw = Path(raw).absolute() if raw is not None else dest.with_name(f"{dest.name}_raw")
    raw.mkdir(parents=True, exist_ok=True)
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    for archive in archives.values():
        marker = raw / f".{archive.file_name}.extracted"
        if marker.exists() and json.loads(marker.read_text()).get("checksum") == list(archive.checksum or ()):
            continue  # fetched, verified and extracted by an earlier run
        url = f"{base_url.rstrip('/')}/{archive.file_name}" if base_url else archive.url
        path = fetch(archive, raw, url)
        extract(path, raw)
        marker.write_text(json.dumps({"checksum": list(archive.checksum or ()), "size": path.stat().st_size}) + "\n")
    return prepare.prepare(dataset, raw, dest)


def _parse_expect(values: list[str]) -> dict[str, tuple[str, str]]:
    expect = {}
    for value in values:
        name, _, checksum = value.partition("=")
        algorithm, _, digest = checksum.partition(":")
        if not name or not algorithm or not digest:
            raise DataError(f"--expect {value!r} must read FILE=ALGO:HEX, e.g. CUB_200_2011.tgz=sha256:3f2a...")
        expect[name] = (algorithm.lower(), digest)
    return expect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsml.data.download", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=(*ARCHIVES, *MANUAL))
    parser.add_argument("--dest", help="output folder for the formatted layout (required for pascal, coco, cub)")
    parser.add_argument("--raw", help="where archives are downloaded and extracted (default: <dest>_raw beside --dest)")
    parser.add_argument(
        "--base-url", help=f"mirror to fetch every archive from (default: ${BASE_URL_ENV}, else the official hosts)"
    )
    parser.add_argument(
        "--expect", action="append", default=[], metavar="FILE=ALGO:HEX", help="replace an archive's listed checksum and size"
    )
    args = parser.parse_args(argv)
    show_on_stderr()
    try:
        if args.dataset not in MANUAL and not args.dest:
            raise DataError("--dest is required: the folder to write the formatted data set to")
        dest = download(args.dataset, args.dest, raw=args.raw, base_url=args.base_url, expect=_parse_expect(args.expect))
    except WSMLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: prepared in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
