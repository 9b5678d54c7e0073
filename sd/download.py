"""Fetching model weights from the Hugging Face Hub with nothing but the standard library.

Checkpoints are several GB, so a download must survive a dropped connection: bytes go to
`<dest>.part`, an interrupted transfer resumes from what is on disk (HTTP Range), and the file
only takes its real name once complete and verified. A `dest` that already exists is trusted
without re-hashing (hashing 7 GB on every start is slow): the sha256 is checked once, right
after the download, which is what the rename to `dest` records.
"""

import errno
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlsplit

# Import-time value; hub_url reads the variable again at each call (tests and mirrors set it late).
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
TIMEOUT = 30  # seconds without a byte before a read counts as a dropped connection
BACKOFF = 0.5  # seconds; the n-th retry waits n times this
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class DownloadError(RuntimeError):
    """A download that failed, with a message that says what to do; never contains the token."""


class _Transient(Exception):
    """A failure worth retrying: the next attempt resumes from what is on disk."""


def hub_url(repo: str, path: str, revision: str = "main") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
    return f"{endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"  # "refs/pr/1" is one segment


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping each hop's headers: the Hub's 302 to the CDN carries the
    file's sha256 and size (X-Linked-Etag, X-Linked-Size), the CDN's answer does not.
    urllib would copy Authorization to any host; the token goes only to the same host."""

    def __init__(self):
        self.hops = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.get_header("Authorization")
        same = urlsplit(newurl)[:2] == urlsplit(req.full_url)[:2]
        if new is not None and auth and same:
            new.add_unredirected_header("Authorization", auth)
        return new


def download_file(url: str, dest: Path, *, size: int | None = None, sha256: str | None = None,
                  token: str | None = None, progress: bool | Callable[[int, int | None], None] = True,
                  chunk_size: int = 1 << 20, retries: int = 3) -> Path:
    """Download `url` to `dest` (resuming a `.part` left by an earlier run) and return `dest`."""
    dest = Path(dest)
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return dest
    part = dest.with_name(dest.name + ".part")
    token = token or os.environ.get("HF_TOKEN")
    report = _Progress(dest.name) if progress is True else progress or None
    _disk(lambda: dest.parent.mkdir(parents=True, exist_ok=True), dest.parent)
    want = {"size": size, "sha256": sha256.lower() if sha256 else None}
    try:
        for attempt in range(retries + 1):
            try:
                _attempt(url, part, want, token, report, chunk_size)
                break
            except _Transient as e:
                if attempt == retries:
                    kept = f"{part} is kept: run again to resume" if part.exists() else "run again to retry"
                    raise DownloadError(f"download of {url} was interrupted after {retries + 1} attempts ({e}); "
                                        + kept) from None
                time.sleep(BACKOFF * (attempt + 1))
    finally:
        if isinstance(report, _Progress):
            report.finish()
    got = part.stat().st_size
    if want["size"] is not None and got != want["size"]:
        part.unlink()
        raise DownloadError(f"{url}: size mismatch: expected {want['size']} bytes, got {got}")
    if want["sha256"]:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        if h.hexdigest() != want["sha256"]:
            part.unlink()
            raise DownloadError(f"{url}: sha256 mismatch: expected {want['sha256']}, got {h.hexdigest()}")
    _disk(lambda: os.replace(part, dest), dest)
    return dest


def _attempt(url, part, want, token, report, chunk_size):
    """One request: appends to `part` (or starts it over) and fills in `want` from the headers."""
    have = part.stat().st_size if part.exists() else 0
    if want["size"] is not None and have > want["size"]:  # stale leftover of another file: restart
        _disk(part.unlink, part)
        have = 0
    if part.exists() and have == want["size"]:
        return  # complete from an earlier run that stopped before the rename
    req = urllib.request.Request(url, headers={"User-Agent": "sd-download"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    if token:  # unredirected: the redirect handler decides where it may follow
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    redirects = _Redirects()
    try:
        resp = urllib.request.build_opener(redirects).open(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        e.close()  # the error body is not needed; leaving it open leaks the socket
        if e.code == 416 and have:  # our range starts at or past the end of the file
            if e.headers.get("Content-Range") == f"bytes */{have}":
                return  # the part is the whole file: an earlier run stopped before the rename
            _disk(part.unlink, part)
            raise _Transient("the server refused to resume") from None
        if e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(_http_message(url, e.code, e.reason, token)) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, ConnectionResetError, ConnectionAbortedError)):
            raise _Transient(str(e.reason)) from None
        raise DownloadError(f"cannot reach {urlsplit(url).netloc} for {url}: {e.reason}; "
                            "check the network connection (and HF_ENDPOINT if set)") from None
    except (OSError, http.client.HTTPException) as e:  # a reset or timeout that urllib did not wrap
        raise _Transient(str(e) or type(e).__name__) from None
    with resp:
        headers = [*redirects.hops, resp.headers]
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None else None
        ranged = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if resp.status == 206 and ranged and int(ranged[1]) == have:
            total = int(ranged[2]) if ranged[2] != "*" else None
        elif resp.status == 206:
            _disk(part.unlink, part)
            raise _Transient("the server sent an unexpected range")
        else:  # 200: the server ignored the range, so the body is the whole file
            have, total = 0, length
        linked = next((h["X-Linked-Size"] for h in headers if h.get("X-Linked-Size")), None)
        if want["size"] is None:
            want["size"] = int(linked) if linked and linked.isdigit() else total
        # The Hub's (X-Linked-)ETag of an LFS file is its sha256 (a git blob's is a 40-digit sha1).
        # A CDN's ETag is something else (md5, a Xet hash), so only the first response's ETag counts.
        if not want["sha256"]:
            tags = [h.get("X-Linked-Etag") for h in headers] + [headers[0].get("ETag")]
            tags = [t.removeprefix("W/").strip('"').lower() for t in tags if t]
            want["sha256"] = next((t for t in tags if _SHA256.fullmatch(t)), None)
        done, body = have, 0
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    try:
                        chunk = resp.read(chunk_size)
                    except (OSError, http.client.HTTPException) as e:  # network, not disk
                        raise _Transient(str(e) or type(e).__name__) from None
                    if not chunk:
                        break
                    f.write(chunk)
                    done, body = done + len(chunk), body + len(chunk)
                    if report:
                        report(done, want["size"])
        except OSError as e:
            need = f"{want['size'] - done} more bytes" if want["size"] else "more space"
            raise _disk_error(e, part, need) from None
        if length is not None and body < length:  # http.client does not flag a short body itself
            raise _Transient(f"connection closed after {body} of {length} bytes")


def _http_message(url, code, reason, token):
    if code == 404:
        return f"{url} not found (HTTP 404): check the repo and file name"
    if code in (401, 403):
        if token:
            return (f"{url} needs authorization (HTTP {code}) and the token was refused: check that it is valid "
                    "and that you accepted the repo's licence on the Hub with the same account")
        return (f"{url} needs authorization (HTTP {code}): this repo is gated (or private, or misspelt); "
                "accept its licence on the Hub and set HF_TOKEN")
    return f"{url} failed: HTTP {code} {reason}"


def _disk_error(e: OSError, path: Path, need: str = "more space") -> DownloadError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(f"disk full while writing {path}: need {need}; the partial file is kept, "
                             "run again to resume once space is freed")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DownloadError(f"no permission to write {path}: {e.strerror}; choose another folder")
    return DownloadError(f"cannot write {path}: {e}")


def _disk(fn, path):
    try:
        return fn()
    except OSError as e:
        raise _disk_error(e, path) from None


class _Progress:
    """One line on stderr, redrawn at most 10 times a second."""

    def __init__(self, name: str):
        self.name, self.start, self.last, self.first, self.width = name, time.monotonic(), 0.0, None, 0

    def __call__(self, done: int, total: int | None, force: bool = False):
        now = time.monotonic()
        if self.first is None:  # bytes already on disk do not count towards the speed
            self.first, self.start = done, now
        self.done, self.total = done, total
        if not force and now - self.last < 0.1:
            return
        self.last = now
        rate = (done - self.first) / max(now - self.start, 1e-6)
        line = f"\r{self.name}  {done / 1e6:,.0f} MB  {rate / 1e6:.1f} MB/s"
        if total:
            eta = int((total - done) / rate) if rate else None
            line = (f"\r{self.name}  {100 * done / total:5.1f}%  {done / 1e6:,.0f}/{total / 1e6:,.0f} MB  "
                    f"{rate / 1e6:.1f} MB/s  ETA " + (f"{eta // 60}:{eta % 60:02d}" if eta is not None else "--:--"))
        sys.stderr.write(line.ljust(self.width))  # pad to wipe the longer line drawn before
        self.width = len(line)
        sys.stderr.flush()

    def finish(self):
        if self.first is not None:  # something was drawn: show the final state and end the line
            self(self.done, self.total, force=True)
            sys.stderr.write("\n")
