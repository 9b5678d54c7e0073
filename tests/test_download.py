"""sd.download against a local HTTP server that can drop connections, ignore ranges, demand a
token, send the Hub's hash headers and redirect to a second server (a different host:port)."""

import errno
import hashlib
import http.server
import re
import socket
import threading

import pytest

from sd import download
from sd.download import DownloadError, download_file, hub_url

DATA = bytes(range(256)) * (3 * 4096)  # 3 MiB
SHA = hashlib.sha256(DATA).hexdigest()
CHUNK = 64 * 1024


class State:
    def __init__(self):
        self.files = {"/f.bin": DATA}
        self.requests = []  # (path, headers) of every request
        self.sent = 0  # body bytes written
        self.drops = 0  # the next this many responses close the connection after drop_after bytes
        self.drop_after = 512 * 1024
        self.fail_503 = 0  # the next this many requests get a 503
        self.auth = False  # require "Authorization: Bearer secret"
        self.ignore_range = False
        self.headers = {}  # extra headers on file responses
        self.redirects = {}  # path -> (location, extra headers of the 302)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, headers=(), body=b""):
        self.send_response(code)
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        st = self.server.state
        st.requests.append((self.path, dict(self.headers)))
        if st.fail_503:
            st.fail_503 -= 1
            return self.reply(503)
        if st.auth and self.headers.get("Authorization") != "Bearer secret":
            return self.reply(401, body=b"unauthorized")
        if self.path in st.redirects:
            location, extra = st.redirects[self.path]
            return self.reply(302, {"Location": location, **extra})
        data = st.files.get(self.path)
        if data is None:
            return self.reply(404, body=b"no such file")
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start, code, headers = 0, 200, dict(st.headers)
        if m and not st.ignore_range:
            start, code = int(m[1]), 206
            if start >= len(data):
                return self.reply(416, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if st.drops:  # full Content-Length promised, then the connection goes away
            st.drops -= 1
            body = body[:st.drop_after]
            self.close_connection = True
        st.sent += len(body)  # counted before writing: the client may finish reading before this thread resumes
        self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client hanging up early (the disk-full test) is expected, not worth a traceback


@pytest.fixture
def make_server():
    servers = []

    def make():
        srv = Server(("127.0.0.1", 0), Handler)
        srv.state = State()
        srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
        threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF", 0.0)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def get(server, tmp_path, path="/f.bin", **kw):
    kw.setdefault("progress", False)
    return download_file(server.url + path, tmp_path / "sub" / "f.bin", chunk_size=CHUNK, **kw)


def part_of(tmp_path):
    return tmp_path / "sub" / "f.bin.part"


def test_plain_download(server, tmp_path):
    dest = get(server, tmp_path)
    assert dest == tmp_path / "sub" / "f.bin" and dest.read_bytes() == DATA
    assert not part_of(tmp_path).exists()
    assert "Authorization" not in server.state.requests[0][1]


def test_resume_after_drop(server, tmp_path):
    server.state.drops = 1
    assert get(server, tmp_path).read_bytes() == DATA
    (_, first), (_, second) = server.state.requests
    assert "Range" not in first and second["Range"] == f"bytes={server.state.drop_after}-"
    assert server.state.sent == len(DATA)  # resumed, not downloaded twice


def test_too_many_drops_then_resume(server, tmp_path):
    server.state.drops = 10
    with pytest.raises(DownloadError, match="interrupted.*run again to resume"):
        get(server, tmp_path, retries=2)
    assert len(server.state.requests) == 3
    assert part_of(tmp_path).stat().st_size == 3 * server.state.drop_after
    server.state.drops = 0
    assert get(server, tmp_path).read_bytes() == DATA
    assert server.state.requests[-1][1]["Range"] == f"bytes={3 * server.state.drop_after}-"
    assert server.state.sent == len(DATA)


def test_server_ignoring_range_starts_over(server, tmp_path):
    part_of(tmp_path).parent.mkdir()
    part_of(tmp_path).write_bytes(b"junk" * 1000)
    server.state.ignore_range = True
    assert get(server, tmp_path).read_bytes() == DATA
    assert "Range" in server.state.requests[0][1]


def test_retries_server_errors(server, tmp_path):
    server.state.fail_503 = 2
    assert get(server, tmp_path).read_bytes() == DATA


def test_not_found(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/nope\.bin not found.*check the repo and file name"):
        get(server, tmp_path, "/nope.bin")
    assert not list(tmp_path.rglob("*.bin*"))


def test_gated_without_token(server, tmp_path):
    server.state.auth = True
    with pytest.raises(DownloadError, match="needs authorization.*gated.*HF_TOKEN"):
        get(server, tmp_path)


def test_token_from_env(server, tmp_path, monkeypatch):
    server.state.auth = True
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert get(server, tmp_path).read_bytes() == DATA
    assert server.state.requests[0][1]["Authorization"] == "Bearer secret"


@pytest.mark.parametrize("path", ["/f.bin", "/nope.bin"])
def test_token_never_in_errors(server, tmp_path, monkeypatch, path):
    server.state.auth = path == "/f.bin"
    monkeypatch.setenv("HF_TOKEN", "hf_wrongtoken123")
    with pytest.raises(DownloadError) as e:
        get(server, tmp_path, path)
    assert "hf_wrongtoken123" not in str(e.value)
    assert "refused" in str(e.value) or "not found" in str(e.value)


def test_sha256_from_etag(server, tmp_path):
    server.state.headers = {"X-Linked-Etag": f'W/"{SHA}"', "ETag": '"' + "1" * 40 + '"'}
    assert get(server, tmp_path).read_bytes() == DATA


def test_sha256_mismatch(server, tmp_path):
    server.state.headers = {"ETag": '"' + "0" * 64 + '"'}
    with pytest.raises(DownloadError, match=f"sha256 mismatch: expected {'0' * 64}, got {SHA}"):
        get(server, tmp_path)
    assert not (tmp_path / "sub" / "f.bin").exists() and not part_of(tmp_path).exists()


def test_sha256_argument_wins(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        get(server, tmp_path, sha256="a" * 64)
    assert get(server, tmp_path, sha256=SHA.upper()).read_bytes() == DATA


def test_size_mismatch(server, tmp_path):
    with pytest.raises(DownloadError, match=f"size mismatch: expected {len(DATA) + 10} bytes, got {len(DATA)}"):
        get(server, tmp_path, size=len(DATA) + 10)
    assert not (tmp_path / "sub" / "f.bin").exists() and not part_of(tmp_path).exists()


@pytest.mark.parametrize("size", [None, len(DATA)])
def test_already_complete_makes_no_request(server, tmp_path, size):
    dest = tmp_path / "sub" / "f.bin"
    dest.parent.mkdir()
    dest.write_bytes(DATA)
    assert get(server, tmp_path, size=size, sha256=SHA) == dest
    assert server.state.requests == []


def test_complete_part_is_renamed_on_416(server, tmp_path):
    part_of(tmp_path).parent.mkdir()
    part_of(tmp_path).write_bytes(DATA)
    assert get(server, tmp_path).read_bytes() == DATA
    assert server.state.sent == 0 and not part_of(tmp_path).exists()


def test_stale_part_larger_than_size_restarts(server, tmp_path):
    part_of(tmp_path).parent.mkdir()
    part_of(tmp_path).write_bytes(DATA + b"extra")
    assert get(server, tmp_path, size=len(DATA)).read_bytes() == DATA
    assert "Range" not in server.state.requests[0][1]


def test_part_past_the_end_restarts_on_416(server, tmp_path):
    part_of(tmp_path).parent.mkdir()
    part_of(tmp_path).write_bytes(DATA + b"extra")
    assert get(server, tmp_path).read_bytes() == DATA
    assert [r[1].get("Range") for r in server.state.requests] == [f"bytes={len(DATA) + 5}-", None]


def test_redirect_to_other_host_drops_token(make_server, tmp_path):
    hub, cdn = make_server(), make_server()
    hub.state.auth = True
    hub.state.redirects["/f.bin"] = (cdn.url + "/cdn/f.bin", {"X-Linked-Etag": f'"{SHA}"',
                                                              "X-Linked-Size": str(len(DATA))})
    cdn.state.files = {"/cdn/f.bin": DATA}
    cdn.state.headers = {"ETag": '"' + "5" * 32 + '"'}  # an S3-style md5: not a sha256
    cdn.state.drops = 1
    calls = []
    assert get(hub, tmp_path, token="secret", progress=lambda *a: calls.append(a)).read_bytes() == DATA
    assert [r[1]["Authorization"] for r in hub.state.requests] == ["Bearer secret"] * 2
    assert all("Authorization" not in h for _, h in cdn.state.requests)
    assert cdn.state.requests[1][1]["Range"] == f"bytes={cdn.state.drop_after}-"  # kept across the redirect
    assert calls[0][1] == len(DATA)  # the size came from the hub's X-Linked-Size


def test_hash_from_the_redirect_hop_is_checked(make_server, tmp_path):
    hub, cdn = make_server(), make_server()
    hub.state.redirects["/f.bin"] = (cdn.url + "/cdn/f.bin", {"X-Linked-Etag": "b" * 64})
    cdn.state.files = {"/cdn/f.bin": DATA}
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        get(hub, tmp_path)
    hub.state.redirects["/f.bin"] = (cdn.url + "/cdn/f.bin", {})
    cdn.state.headers = {"ETag": "c" * 64}  # a CDN's own 64-digit hash (Xet) is not the file's sha256
    assert get(hub, tmp_path).read_bytes() == DATA


def test_redirect_on_same_host_keeps_token(server, tmp_path):
    server.state.auth = True
    server.state.redirects["/old.bin"] = ("/f.bin", {})
    assert get(server, tmp_path, "/old.bin", token="secret").read_bytes() == DATA
    assert [p for p, _ in server.state.requests] == ["/old.bin", "/f.bin"]


def test_cannot_reach(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"cannot reach 127.0.0.1:{port}"):
        download_file(f"http://127.0.0.1:{port}/f.bin", tmp_path / "f.bin", progress=False)


class FullDisk:
    """A file whose second write fails like a full disk."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, b):
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)


def test_disk_full(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(DownloadError, match=f"disk full while writing .*f.bin.part: need {len(DATA) - CHUNK} more"):
        get(server, tmp_path)
    assert part_of(tmp_path).stat().st_size == CHUNK  # kept for resuming


def test_no_permission(server, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(download, "open", refuse, raising=False)
    with pytest.raises(DownloadError, match="no permission to write .*f.bin.part"):
        get(server, tmp_path)


def test_progress_callable(server, tmp_path):
    calls = []
    get(server, tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == len(DATA) // CHUNK
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    assert calls[-1] == (len(DATA), len(DATA))


def test_progress_bar(server, tmp_path, capsys):
    get(server, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rf.bin") and err.endswith("\n") and err.count("\n") == 1
    assert re.match(r"f\.bin  100\.0%  3/3 MB  [\d.]+ MB/s  ETA 0:00", err.split("\r")[-1])


def test_hub_url(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub_url("org/model", "unet/x.safetensors") == "https://huggingface.co/org/model/resolve/main/unet/x.safetensors"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080/")
    assert hub_url("org/model", "x.bin", revision="v1") == "http://mirror.local:8080/org/model/resolve/v1/x.bin"
    assert hub_url("o/m", "a b.bin", "refs/pr/1") == "http://mirror.local:8080/o/m/resolve/refs%2Fpr%2F1/a%20b.bin"
