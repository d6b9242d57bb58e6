"""Reading shards, local or through a URL (`data.shards_url`), as samples.

- **HTTP(S)** is read here, not through curl: a read that fails (the server restarts, the
  connection drops, a 5xx) is retried from the byte it got to (a `Range` request; a server that
  ignores `Range` is re-read and the bytes already delivered are passed over), for up to
  `retry_seconds` without progress; then a `ShardReadError` names the URL, the byte and why. A
  404 or 403 is not retried. Nothing is lost and nothing is read twice: the tar reader sees one
  unbroken byte stream. (webdataset 1.0.2 opens http(s) as a pipe from `curl --retry 30 -f -s
  -L`, which gives up on a body cut short: curl 7.88 exits 18 after half a shard, no retry.)
- **Other URLs** (`pipe:...`, `file:`, whatever `webdataset.gopen` opens) go through
  `webdataset.gopen`; a command that fails is a `ShardReadError` naming the URL.
- **Checksums.** A shard read through a URL is hashed as it streams; when it has been read to its
  end its sha256 must match the manifest, or a `ShardReadError` names the URL and says the local
  manifest does not describe it (a stale copy, or a shard set rebuilt at the URL). Samples are
  handed on before the end of their shard is known, so a mismatch stops the run after at most one
  shard's samples; `python -m shards verify DIR --url URL` checks every shard before a run. A
  stream abandoned mid-shard (an epoch's last batch taken) is not checked.
- **The small files** (`manifest.json`, `index.parquet`, `collection.json`) can be fetched from
  the URL into the local shard-set folder (`fetch_small_files`), each written under a temporary
  name and linked into place, so ranks fetching at once never see half a file and never replace
  a file that is already there.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import webdataset as wds

HTTP_SCHEMES = ("http", "https")
# One socket read may wait this long: a server that stops sending becomes a failed read (retried).
READ_TIMEOUT = 30.0
# HTTP statuses worth another try: the server is busy or restarting, not refusing.
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
# What a dropped, refused or stalled connection raises (URLError and ConnectionError are OSErrors).
READ_ERRORS = (OSError, http.client.HTTPException)
FIRST_BACKOFF, LAST_BACKOFF = 0.25, 4.0  # seconds between tries, doubling
BLOCK = 1 << 20


class ShardReadError(ValueError):
    """A shard (or small file) that could not be read from its URL, or whose bytes are not those
    its manifest lists; the message names the URL."""


def is_url(location: str) -> bool:
    """A URL rather than a local path (`pipe:cmd`, `http://...`; not `C:` or a relative path)."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", location))


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class HttpStream(io.RawIOBase):
    """An HTTP(S) body read with retries that resume at the byte reached (module docstring)."""

    def __init__(self, url: str, retry_seconds: float):
        super().__init__()
        self.url, self.retry_seconds = url, retry_seconds
        self.position, self.total, self.response = 0, None, None
        self._retrying(self._connect)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._retrying(lambda: self._read_into(buffer))

    def close(self) -> None:
        self._drop()
        super().close()

    def _read_into(self, buffer) -> int:
        if self.response is None:
            self._connect()
        count = self.response.readinto(buffer)
        if count == 0 and self.total is not None and self.position < self.total:
            raise ConnectionError(f"connection closed at byte {self.position} of {self.total}")
        self.position += count
        return count

    def _connect(self) -> None:
        headers = {"Range": f"bytes={self.position}-"} if self.position else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=READ_TIMEOUT)
        except urllib.error.HTTPError as err:
            if err.code in RETRY_STATUSES:
                raise ConnectionError(f"HTTP {err.code} {err.reason}") from None
            raise ShardReadError(f"{self.url}: HTTP {err.code} {err.reason}") from None
        self.response = response
        if response.status == 206:
            begin, total = _content_range(response.headers.get("Content-Range", ""))
            if begin != self.position:
                self._drop()
                raise ShardReadError(f"{self.url}: asked for byte {self.position} on, the server sent from {begin}")
            self.total = total
            return
        length = response.headers.get("Content-Length")
        self.total = int(length) if length is not None else None
        self._pass_over(self.position)  # a server without Range support sends the whole body again

    def _pass_over(self, count: int) -> None:
        while count:
            data = self.response.read(min(count, BLOCK))
            if not data:
                raise ConnectionError(f"connection closed before byte {self.position}")
            count -= len(data)

    def _drop(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None

    def _retrying(self, step):
        """`step()`, tried again after a read error for up to retry_seconds without progress."""
        started, tries, backoff = time.monotonic(), 0, FIRST_BACKOFF
        while True:
            tries += 1
            try:
                return step()
            except ShardReadError:
                self._drop()
                raise
            except READ_ERRORS as err:
                self._drop()
                waited = time.monotonic() - started
                if waited + backoff > self.retry_seconds:
                    of = f" of {self.total}" if self.total is not None else ""
                    raise ShardReadError(
                        f"{self.url}: {_reason(err)} at byte {self.position}{of}; gave up after {tries} tries over "
                        f"{waited:.1f} s (data.url_retry_seconds={self.retry_seconds:g}): is the server up?"
                    ) from None
                time.sleep(backoff)
                backoff = min(2 * backoff, LAST_BACKOFF)


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, total size or None) of a `Content-Range: bytes A-B/N` header."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if not match:
        raise ConnectionError(f"unreadable Content-Range {value!r}")
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    return f"{type(err).__name__}: {err}"


class _GopenStream(io.RawIOBase):
    """A `webdataset.gopen` stream (a pipe's exit status is checked when it is closed) whose
    errors name the URL."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        try:
            self.stream = wds.gopen(url, "rb")
        except (OSError, ValueError) as err:
            raise ShardReadError(f"{url}: cannot open ({type(err).__name__}: {err})") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.stream.read(len(buffer))
        except OSError as err:
            raise ShardReadError(f"{self.url}: read failed ({err})") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.stream.close()
            except OSError as err:
                raise ShardReadError(f"{self.url}: {err}") from None
            finally:
                super().close()


def open_url(url: str, retry_seconds: float) -> io.RawIOBase:
    """A raw byte stream of `url`: a local path, an HTTP(S) URL or anything webdataset opens."""
    if not is_url(url):
        return io.FileIO(url, "rb")
    if urlparse(url).scheme in HTTP_SCHEMES:
        return HttpStream(url, retry_seconds)
    return _GopenStream(url)


class _Hashing(io.RawIOBase):
    """Passes a raw stream's bytes on, hashing them."""

    def __init__(self, raw: io.RawIOBase):
        super().__init__()
        self.raw, self.sha256 = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        self.sha256.update(memoryview(buffer)[:count])
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def _samples(members: Iterator[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive members with the same key (the name up to its first dot) as one sample, keyed
    by the rest of the name (lower case), as webdataset groups them."""
    sample = None
    for name, data in members:
        key, dot, ext = name.partition(".")
        if not dot:
            continue
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        sample[ext.lower()] = data
    if sample is not None:
        yield sample


class ShardStream:
    """One shard's bytes as tar members, hashed as they pass when `hashed`."""

    def __init__(self, url: str, retry_seconds: float, hashed: bool):
        self.url = url
        raw = open_url(url, retry_seconds)
        self.hashing = _Hashing(raw) if hashed else None
        self.stream = io.BufferedReader(self.hashing or raw, BLOCK)

    def members(self) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of each file in the tar, in order."""
        try:
            with tarfile.open(fileobj=self.stream, mode="r|*") as tar:
                for info in tar:
                    if info.isfile():
                        yield info.name, tar.extractfile(info).read()
        except (tarfile.TarError, EOFError) as err:
            raise ShardReadError(f"{self.url}: unreadable or truncated tar ({type(err).__name__}: {err})") from None

    def sha256(self) -> str:
        """The whole file's sha256, once the members are read (the tar's end padding is read here)."""
        while self.stream.read(BLOCK):
            pass
        return self.hashing.sha256.hexdigest()

    def close(self, quietly: bool = False) -> None:
        """Quietly: for a stream left mid-shard (an epoch's last batch taken, or an error already on
        its way), whose pipe command then dies of the closed pipe, which says nothing of the shard."""
        try:
            self.stream.close()
        except ShardReadError:
            if not quietly:
                raise


@dataclass(frozen=True)
class TarReader:
    """Reads shards as samples (dicts of member bytes with `__key__` and `__url__`).
    `checksums`: url -> sha256 of the shards to check as they stream (module docstring)."""

    retry_seconds: float = 60.0
    checksums: Mapping[str, str] = field(default_factory=dict)

    def samples(self, urls) -> Iterator[dict]:
        for url in urls:
            yield from self.shard(url)

    def shard(self, url: str) -> Iterator[dict]:
        expected = self.checksums.get(url)
        stream = ShardStream(url, self.retry_seconds, hashed=expected is not None)
        read_whole = False
        try:
            yield from _samples(stream.members(), url)
            if expected is not None:
                check_digest(url, stream.sha256(), expected)
            read_whole = True
        finally:
            stream.close(quietly=not read_whole)


def check_digest(url: str, digest: str, expected: str) -> None:
    if digest != expected:
        raise ShardReadError(
            f"{url}: sha256 {digest[:12]}... does not match the manifest's {expected[:12]}...: the local "
            "manifest does not describe the shard at the URL (a stale copy, or a shard set rebuilt there); "
            "fetch the small files again"
        )


def read_bytes(url: str, retry_seconds: float) -> bytes:
    with io.BufferedReader(open_url(url, retry_seconds), BLOCK) as stream:
        return stream.read()


def fetch_file(url: str, dest: Path, retry_seconds: float) -> None:
    """Download `url` to `dest` unless `dest` exists: written under a temporary name, then linked
    into place (a rank that fetched it first wins; nothing is overwritten)."""
    if dest.exists():
        return
    data = read_bytes(url, retry_seconds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary = dest.parent / f".{dest.name}.{os.getpid()}.fetching"
    try:
        temporary.write_bytes(data)
        try:
            os.link(temporary, dest)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)
