"""`sd serve --ray` (sd/serve/ray_app.py): a new local Ray on this machine, Ray's proxy on a loopback
port, two CPU replicas of the tiny models of tests/server_fixtures.py, started once for the module.

Default suite (one cluster start, a few requests): the Workers AI docs' curl call, the official
Cloudflare and OpenAI clients and A1111's txt2img through Ray, errors in each dialect's envelope
(the replica's checks, and the Ingress's body limit), the flags Ray refuses, a clean stop.
SD_SLOW_TESTS=1 adds: 16 concurrent requests all answered (by both replicas, equal seeds giving
equal pictures), a client that leaves stopping its job, and a replica killed mid-job: each of its
requests answered a 503 with Retry-After that the client retries to a 200, and the replica replaced.
"""

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sd.serve import cli, ray_app

pytest.register_assert_rewrite("server_fixtures")  # before the import below, which the plugin line then reuses
from server_fixtures import (IMG2IMG, LCM, LIGHTNING, PNG_SIGNATURE, REPO, SDXL, TOKEN, ServerProcess,  # noqa: E402
                             decode, docs_curl, free_port, wait_until)

pytest_plugins = ["server_fixtures"]

SLOW = pytest.mark.skipif(not os.environ.get("SD_SLOW_TESTS"), reason="minutes on a 2-core CPU; set SD_SLOW_TESTS=1")
SMALL = dict(width=256, height=256, num_steps=2)
REPLICA = "ray::ServeReplica:sd:Replica"  # a replica's process title
BODY_MB = 1
CONFIG = REPO / "deploy" / "ray" / "serve.yaml"


def descendants(root: int) -> dict[int, str]:
    """The processes under `root` (Ray's, which `sd serve --ray` starts) and their command lines."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:  # gone meanwhile
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def replicas(server) -> set[int]:
    return {pid for pid, command in descendants(server.proc.pid).items() if command.startswith(REPLICA)}


def kill_leftovers(processes: dict[int, str]):
    """SIGKILL those of `processes` (Ray's, recorded while it ran) that outlived a failed stop, if
    each pid still runs the same command."""
    for pid, command in processes.items():
        with contextlib.suppress(OSError):
            if (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip() == command:
                os.kill(pid, signal.SIGKILL)


def wait_for_line(server, text: str, after: int = 0, seconds: float = 300) -> str:
    """The first line of the server's log past character `after` that contains `text` (`seconds`
    only guards against a hang)."""
    def line():
        assert server.proc.poll() is None, f"sd serve --ray exited with {server.proc.returncode}:\n{server.log()}"
        return next((line for line in server.log()[after:].splitlines() if text in line), None)
    return wait_until(line, f"logged {text!r}", seconds)


def replica_pid(line: str) -> int:
    """The pid in Ray's prefix of a replica's log line: `(ServeReplica:sd:Replica pid=123) ...`."""
    return int(line.split("pid=")[1].split(")")[0])


@pytest.fixture(scope="module")
def ray_server(tiny_models, tmp_path_factory):
    """Two CPU replicas; a token; a 1 MiB body limit. The img2img and Lightning ids are left to the
    slow tests: a replica's first job of a model logs its speed, which tells them a job is running
    and where."""
    folder = tmp_path_factory.mktemp("ray")
    (folder / "weights").mkdir()
    m = tiny_models
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_DEDUP_LOGS", "0")  # every replica's lines in the log, even when alike
        server = ServerProcess(["--ray", "--replicas", "2", "--weights-dir", str(folder / "weights"),
                                "--api-token", TOKEN, "--max-body-mb", str(BODY_MB), "--model", f"{SDXL}={m['sdxl']}",
                                "--model", f"{LCM}={m['sd15']}", "--model", f"{IMG2IMG}={m['sd15']}",
                                "--model", f"{LIGHTNING}={m['sdxl']}"], folder / "ray.log", token=TOKEN)
    ours = {}
    try:
        wait_for_line(server, "serving on http://")
        ours = descendants(server.proc.pid)
        yield server
        assert server.stop(120) == 0, server.log()[-3000:]
    finally:
        server.stop(5)
        kill_leftovers({**ours, **descendants(server.proc.pid)})


def assert_png(data: bytes, size=(256, 256)):
    assert data.startswith(PNG_SIGNATURE), data[:200]
    assert Image.open(io.BytesIO(data)).size == size


# ---------------------------------------------------------------- the Serve config


def test_the_serve_config_is_valid_and_builds_the_application():
    """deploy/ray/serve.yaml passes Ray's own schema; its import path is the builder, which takes its
    args (as `sd serve` flags); its deployments are the application's."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema
    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder is ray_app.app
    assert type(builder(application["args"])).__name__ == "Application"
    assert {d["name"] for d in application["deployments"]} == {ray_app.Ingress.name, ray_app.Replica.name}
    assert next(d for d in application["deployments"] if d["name"] == "Replica")["ray_actor_options"]["num_gpus"] == 1


@SLOW  # first in the module: on its own new Ray, before the module's cluster starts (two would share ports)
def test_serve_run_takes_the_config(tiny_models, tmp_path):
    """`serve run deploy/ray/serve.yaml`, changed only where this machine differs (CPU replicas, the
    tiny model, a free loopback port), answers a generation; Ctrl-C takes it down."""
    import yaml
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (application,) = config["applications"]
    application["args"] |= {"weights-dir": str(tmp_path), "device": "cpu", "model": [f"{LCM}={tiny_models['sd15']}"]}
    next(d for d in application["deployments"] if d["name"] == "Replica")["ray_actor_options"] = {"num_cpus": 1}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1",  # a new local Ray, not one running here
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SD_API_TOKEN", None)
    log_path = tmp_path / "serve-run.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "serve.yaml")],
                                cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    ours = {}
    try:
        def ready():  # Ray's proxy answers 404 until the application's route is up
            assert proc.poll() is None, log_path.read_text(errors="replace")
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        wait_until(ready, "serve run's application ready", 300)
        ours = descendants(proc.pid)
        reply = httpx.post(f"http://127.0.0.1:{port}/ai/run/{LCM}", json={"prompt": "x", **SMALL}, timeout=300)
        assert reply.status_code == 200, reply.text
        assert_png(reply.content)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log_path.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers({**ours, **descendants(proc.pid)})


# ---------------------------------------------------------------- default suite


def test_the_workers_ai_docs_curl_call_through_ray(ray_server, tmp_path):
    """The README's curl call (Cloudflare's docs example: the host changed, and the LCM model, whose
    default 512x512 in few steps is quicker on a CPU than SDXL's 1024x1024), to Ray's proxy."""
    out = tmp_path / "cat.png"
    docs_curl(ray_server.url, LCM, out, timeout=300)
    assert_png(out.read_bytes(), (512, 512))


def test_the_official_clients_through_ray(ray_server):
    """Cloudflare's client (the model id percent-encoded), OpenAI's and A1111's txt2img, as against `sd serve`."""
    import cloudflare
    from openai import OpenAI
    cf = cloudflare.Cloudflare(api_token=TOKEN, base_url=f"{ray_server.url}/client/v4", max_retries=0)
    response = cf.ai.with_raw_response.run(LCM, account_id="acc", prompt="a red circle", seed=1, **SMALL)
    assert "/ai/run/@cf%2Flykon%2F" in str(response.http_request.url)
    assert_png(response.read())

    client = OpenAI(base_url=f"{ray_server.url}/v1", api_key=TOKEN, max_retries=0)
    result = client.images.generate(model=LCM, prompt="a blue square", size="256x256", n=2,
                                    extra_body={"num_steps": 2, "seed": 7})
    assert [image.seed for image in result.data] == [7, 8]
    for image in result.data:
        assert_png(base64.b64decode(image.b64_json))

    reply = httpx.post(f"{ray_server.url}/sdapi/v1/txt2img", auth=("sd", TOKEN), timeout=300,
                       json={"prompt": "a (green:1.2) triangle", "steps": 2, "width": 256, "height": 256, "seed": 3,
                             "sampler_name": "Euler a", "override_settings": {"sd_model_checkpoint": LCM}})
    assert reply.status_code == 200, reply.text
    assert_png(base64.b64decode(reply.json()["images"][0]))


def test_errors_keep_their_dialect_through_ray(ray_server):
    """The replica's checks answer as `sd serve` does; the Ingress's body limit in the dialect too."""
    url = ray_server.url
    no_token = httpx.post(f"{url}/ai/run/{LCM}", json={"prompt": "x"}, timeout=60)
    assert no_token.status_code == 401 and no_token.json()["success"] is False
    bad = httpx.post(f"{url}/v1/images/generations", headers=ray_server.headers, timeout=60,
                     json={"model": LCM, "prompt": "x", "size": "100x100"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size", bad.text
    sampler = httpx.post(f"{url}/sdapi/v1/txt2img", auth=("sd", TOKEN), timeout=60,
                         json={"prompt": "x", "sampler_name": "No Such Sampler"})
    assert sampler.status_code == 400 and "sampler_name" in sampler.json()["detail"], sampler.text
    # streamed (no Content-Length), so the Ingress counts the bytes as they come
    big = httpx.post(f"{url}/ai/run/{LCM}", headers=ray_server.headers, timeout=60,
                     content=iter([b"x" * 2 ** 16] * (BODY_MB * 16 + 1)))
    assert big.status_code == 413 and big.json()["errors"][0]["message"].startswith("body: larger than"), big.text


def test_sd_serve_needs_no_ray(tmp_path):
    """Ray is imported by sd/serve/ray_app.py alone: every other module of the service layer loads
    without it, and `--ray` without the extra says what to install."""
    modules = sorted(f"sd.serve.{p.stem}" for p in (REPO / "sd" / "serve").glob("*.py")
                     if p.stem not in ("ray_app", "__main__", "__init__"))
    code = ("import sys\nsys.modules['ray'] = None  # as if not installed: `import ray` fails\n"
            f"import {', '.join(modules)}\n"
            f"status = sd.serve.cli.main(['--weights-dir', {str(tmp_path)!r}, '--ray'])\n"
            "print(status, [m for m, module in sys.modules.items() if module and m.split('.')[0] == 'ray'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert done.stderr.strip().endswith("error: --ray: needs the ray extra: pip install 'sd[ray]'"), done.stderr


def test_flags_that_ray_refuses(tmp_path, capsys):
    """One line naming the flag, before Ray starts; a Serve config's args are read by the same parser."""
    assert cli.main(["--weights-dir", str(tmp_path), "--replicas", "2"]) == 2
    assert capsys.readouterr().err == ("error: --replicas: only with --ray (without it, one process serves the "
                                       "--device list)\n")
    assert cli.main(["--weights-dir", str(tmp_path), "--ray", "--device", "cpu,cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cpu,cpu: one device per replica under Ray")
    with pytest.raises(ValueError, match="^args: port: not an application argument"):
        ray_app.app({"port": 8000})
    with pytest.raises(ValueError, match=r"^argument --max-batch: must be a whole number in \[1, 1024\], got '0'"):
        ray_app.app({"max-batch": 0})
    assert ray_app.flags_of({"weights-dir": "/w", "model": ["A=a", "B=b"], "max-batch": 8}) == [
        "--weights-dir", "/w", "--model", "A=a", "--model", "B=b", "--max-batch", "8"]


class FakeReplica:
    """What the Ingress calls, `replica.request.remote(scope, body)`: the given ASGI messages, then
    the given exception (as Ray's streaming handle raises it)."""

    def __init__(self, messages: list[dict], error: Exception | None = None):
        self.messages, self.error, self.calls = messages, error, []
        self.request = self

    async def remote(self, scope, body):
        self.calls.append((scope, body))
        for message in self.messages:
            yield message
        if self.error is not None:
            raise self.error


def bare(deployment):
    """An instance of a deployment's class with none of its constructor run, nor its destructor
    (Ray awaits an `async def __del__`; Python's collector would only make the coroutine)."""
    cls = type(f"Bare{deployment.name}", (deployment.func_or_class,), {"__del__": lambda self: None})
    return cls.__new__(cls)


def through_ingress(replica: FakeReplica, path: str, body: bytes = b"{}") -> list[dict]:
    """One request through the Ingress's ASGI app, on no cluster: the messages its client gets."""
    import asyncio
    ingress = bare(ray_app.Ingress)
    ingress.args, ingress.replica = ray_app.parse_flags(["--queue-size", "3"]), replica
    incoming, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return incoming.pop() if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-length", str(len(body)).encode())], "ray.extra": object()}
    asyncio.run(ingress.forward(scope, receive, send))
    return sent


def test_the_ingress_answers_for_a_replica_that_died_or_a_full_queue_in_the_dialect():
    """The Ingress's own answers (on no cluster: a replica that stands in for Ray's handle): a
    replica that died before answering is a 503 with Retry-After: 1, Ray's router queue over its
    limit a 429, each in the envelope of the path's dialect; a replica's answer passes unchanged."""
    import json

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError
    for path, message_of in [(f"/ai/run/{LCM}", lambda b: b["errors"][0]["message"]),
                             ("/v1/images/generations", lambda b: b["error"]["message"]),
                             ("/sdapi/v1/txt2img", lambda b: b["detail"])]:
        for error, status, text in [(ActorDiedError(), 503, "the replica running this request stopped"),
                                    (BackPressureError(3, 3), 429, "every replica is busy and 3 requests wait")]:
            start, body = through_ingress(FakeReplica([], error), path)
            assert start["status"] == status and (b"retry-after", b"1") in start["headers"], (path, start)
            assert message_of(json.loads(body["body"])).startswith(text), (path, body)
    answer = [{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/png")]},
              {"type": "http.response.body", "body": PNG_SIGNATURE, "more_body": False}]
    replica = FakeReplica(answer)
    assert through_ingress(replica, f"/ai/run/{LCM}", b'{"prompt": "x"}') == answer
    ((scope, body),) = replica.calls
    assert body == b'{"prompt": "x"}' and "ray.extra" not in scope and scope["path"] == f"/ai/run/{LCM}"
    # once the answer has begun there is no other to give: the error cuts the connection
    with pytest.raises(ActorDiedError):
        through_ingress(FakeReplica(answer[:1], ActorDiedError()), f"/ai/run/{LCM}")


def test_a_replica_tells_its_app_when_the_client_has_left():
    """Replica.request, on no cluster: the app reads the body, answers in parts, then waits on
    `receive()`; closing the stream (what Ray does when the client leaves) reaches it as
    `http.disconnect`, and the app's task ends."""
    import asyncio
    heard = []

    async def app(scope, receive, send):
        heard.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"step 1", "more_body": True})
        heard.append(await receive())

    async def run():
        replica = bare(ray_app.Replica)
        replica.app = app
        stream = replica.request({"type": "http"}, b"the body")
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return got
    got = asyncio.run(run())
    assert [m["type"] for m in got] == ["http.response.start", "http.response.body"]
    assert heard == [{"type": "http.request", "body": b"the body", "more_body": False}, {"type": "http.disconnect"}]


# ---------------------------------------------------------------- SD_SLOW_TESTS=1


def generate(url: str, seed: int, **settings) -> httpx.Response:
    return httpx.post(f"{url}/ai/run/{LCM}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600,
                      json={"prompt": "a red circle", "seed": seed, **SMALL, **settings})


@SLOW
def test_sixteen_concurrent_requests_are_all_answered(ray_server):
    """Twelve Workers AI requests (six seeds, each twice), two OpenAI and two A1111 ones at once:
    every one answered 200, requests served by both replicas, and a seed gives the same picture on
    either (to within one level: a picture batched with others may round differently)."""
    start = len(ray_server.log())
    answers: dict[str, httpx.Response] = {}

    def openai(k):
        return httpx.post(f"{ray_server.url}/v1/images/generations", headers=ray_server.headers, timeout=600,
                          json={"model": LCM, "prompt": "a blue square", "size": "256x256", "num_steps": 2, "seed": k})

    def a1111(k):
        return httpx.post(f"{ray_server.url}/sdapi/v1/txt2img", auth=("sd", TOKEN), timeout=600,
                          json={"prompt": "a triangle", "steps": 2, "width": 256, "height": 256, "seed": k,
                                "override_settings": {"sd_model_checkpoint": LCM}})
    calls = {f"workers-ai {seed} {k}": (lambda seed=seed: generate(ray_server.url, seed))
             for seed in range(6) for k in "ab"}
    calls |= {f"openai {k}": (lambda k=k: openai(k)) for k in range(2)}
    calls |= {f"a1111 {k}": (lambda k=k: a1111(k)) for k in range(2)}
    threads = [threading.Thread(target=lambda name=name, call=call: answers.__setitem__(name, call()))
               for name, call in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 16
    assert {name: r.status_code for name, r in answers.items()} == {name: 200 for name in calls}
    for seed in range(6):
        a, b = (decode(answers[f"workers-ai {seed} {k}"].content).astype(int) for k in "ab")
        assert np.abs(a - b).max() <= 1, seed
    served = {replica_pid(line) for line in ray_server.log()[start:].splitlines()
              if "ServeReplica:sd:Replica pid=" in line and "status=200" in line}
    assert len(served) == 2, served


@SLOW
def test_a_client_that_leaves_stops_its_job(ray_server):
    """Ray cancels the request of a client that left; the replica's app hears it as a disconnect,
    stops the job and logs the 499, as `sd serve` does."""
    start = len(ray_server.log())
    body = f'{{"prompt": "a long job", "width": 1024, "height": 1024, "num_steps": 4, "seed": 1}}'.encode()
    with socket.create_connection(("127.0.0.1", ray_server.port)) as conn:
        conn.sendall(f"POST /ai/run/{LIGHTNING} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for_line(ray_server, f"{LIGHTNING}: a UNet call takes", start)  # its first job of the model runs
    line = wait_for_line(ray_server, "status=499(client-gone)", start)
    assert f"model={LIGHTNING}" in line


@SLOW
def test_a_replica_killed_mid_job_is_replaced_and_no_request_is_lost(ray_server):
    """Eight long requests; the replica that runs the first of them is killed (SIGKILL, as the OOM
    killer would). Each request is answered: 200, or a 503 with Retry-After in the Workers AI envelope
    that the client retries, after the time it says, to a 200. Ray starts a replica in its place,
    which serves. At least one 503: the killed replica was running a job."""
    before = replicas(ray_server)
    assert len(before) == 2
    start = len(ray_server.log())
    firsts: dict[int, httpx.Response] = {}
    statuses: dict[int, list[int]] = {k: [] for k in range(8)}

    def call(k):
        while True:
            reply = httpx.post(f"{ray_server.url}/ai/run/{IMG2IMG}", headers=ray_server.headers, timeout=600,
                               json={"prompt": f"job {k}", "width": 768, "height": 768, "num_steps": 20, "seed": k})
            statuses[k].append(reply.status_code)
            firsts.setdefault(k, reply)
            if reply.status_code != 503 or len(statuses[k]) > 20:
                return
            assert reply.json()["errors"][0]["message"].startswith("the replica running this request stopped")
            time.sleep(int(reply.headers["retry-after"]))  # as the answer asks

    threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    victim = replica_pid(wait_for_line(ray_server, f"{IMG2IMG}: a UNet call takes", start))
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join()
    assert {k: s[-1] for k, s in statuses.items()} == {k: 200 for k in range(8)}, statuses
    assert any(503 in s for s in statuses.values()), statuses
    for k, s in statuses.items():
        assert set(s[:-1]) <= {503}, s
        if s[0] == 503:
            assert firsts[k].headers["retry-after"] == "1"

    replaced = wait_until(lambda: len(now := replicas(ray_server)) == 2 and victim not in now and now,
                          "a replica in the killed one's place", 300)
    (newcomer,) = replaced - before

    def newcomer_served():  # Ray picks the less busy of two at random: ask until it picks the newcomer
        assert generate(ray_server.url, 0).status_code == 200
        return any(f"ServeReplica:sd:Replica pid={newcomer})" in line and "status=200" in line
                   for line in ray_server.log()[start:].splitlines())
    wait_until(newcomer_served, "a request served by the new replica", 300)
