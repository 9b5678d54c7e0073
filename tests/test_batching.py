"""Batching inside a worker (issue 18, part 1): queued jobs that can share a UNet batch run as one,
and each image equals the image its job gets alone (same seed; within BATCH_LEVELS, the rounding
of batched matmuls, as tests/test_generate_api.py allows), so batching never changes an answer;
a job that gives up leaves its batch without stopping the others.

The workers here run without the web app (tests/worker_fixtures.py), on tiny random-weight SD 1.5
and SDXL files (tests/server_fixtures.py) at 64x64; one test goes through HTTP."""

import asyncio
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.register_assert_rewrite("server_fixtures", "worker_fixtures")
from server_fixtures import InProcessServer, LogWatch, wait_until, write_sd15, write_sdxl  # noqa: E402
from worker_fixtures import MODEL, Gate, echo_cache, model_cache, run_jobs, worker  # noqa: E402

from sd.serve import batching  # noqa: E402
from sd.serve.jobs import GenerationJob, GenerationResult  # noqa: E402
from sd.tiny import CHECKPOINT  # noqa: E402

BATCH_LEVELS = 1
SMALL = dict(width=64, height=64, num_steps=3, guidance=7.5)


def job(prompt="a red circle", **kw) -> GenerationJob:
    return GenerationJob(MODEL, {"prompt": prompt, **SMALL, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching-models")
    return {"folder": folder, "sd15": write_sd15(folder / "sd15.safetensors"),
            "sdxl": write_sdxl(folder / "sdxl.safetensors", seed=2)}


@pytest.fixture(scope="module")
def sd15(files):
    cache = model_cache(files["folder"], files["sd15"])
    cache.get(MODEL)
    return cache


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


_ALONE: dict = {}


def alone(pipe, job: GenerationJob, settings: dict) -> np.ndarray:
    """The image `settings` (one image of the job's answer) names, made by the job's arguments alone."""
    kwargs = {**job.kwargs, "seed": settings["seed"], "num_images": None}
    key = (id(pipe), repr(sorted(kwargs.items())))
    if key not in _ALONE:
        _ALONE[key] = np.asarray(pipe.generate(**kwargs), dtype=np.int16)
    return _ALONE[key]


def assert_each_as_alone(pipe, jobs, outcomes) -> float:
    worst = 0.0
    for j, result in zip(jobs, outcomes):
        assert isinstance(result, GenerationResult), result
        assert len(result.pictures) == (j.kwargs.get("num_images") or 1)
        for picture in result.pictures:
            got = pixels(picture.png)
            assert picture.settings["prompt"] == j.kwargs["prompt"]
            assert picture.settings["negative_prompt"] == j.kwargs.get("negative_prompt")
            assert got.std() > 5, "a flat picture proves little"
            worst = max(worst, float(np.abs(got - alone(pipe, j, picture.settings)).max()))
    assert worst <= BATCH_LEVELS, f"a batched image differs from its job's own by {worst} levels"
    return worst


# ---------------------------------------------------------------- batched = alone


def test_batched_images_equal_each_job_alone(sd15):
    """Three jobs share one batch (one asks for two images, one for a random seed); two with negative
    prompts share another; other steps run alone. Every image is its job's own."""
    jobs = [job(seed=1), job("a blue square", seed=2, num_images=2), job("a green triangle"),
            job(seed=3, negative_prompt="blurry"), job(seed=4, num_steps=4),
            job("yellow", seed=5, negative_prompt="dark")]
    w = worker(sd15, max_batch=8)
    tickets, outcomes = run_jobs(w, jobs)
    assert w.metrics.batches == [4, 2, 1]
    seeds = [p.settings["seed"] for p in outcomes[1].pictures]
    assert seeds == [2, 3]  # a job's own N images: seeds s..s+N-1
    assert all(t.state == "done" and t.step == t.steps == t.job.kwargs["num_steps"] for t in tickets)
    assert [t.denoised.shape[0] for t in tickets] == [1, 2, 1, 1, 1, 1]  # each ticket's rows of its batch
    assert_each_as_alone(sd15.pipelines[MODEL], jobs, outcomes)


def test_max_batch_1_runs_each_job_alone_and_a_job_of_n_images_is_one_batch(sd15):
    w = worker(sd15, max_batch=1)
    jobs = [job(seed=1), job(seed=2, num_images=3)]
    _, outcomes = run_jobs(w, jobs)
    assert w.metrics.batches == [1, 3]
    assert_each_as_alone(sd15.pipelines[MODEL], jobs, outcomes)


def test_sdxl_jobs_with_and_without_a_negative_prompt_never_share(files):
    """SDXL's unconditional input is zeros only when no image of the batch has a negative prompt,
    so the two kinds batch apart; mixed, the one without would be conditioned on "" instead."""
    cache = model_cache(files["folder"], files["sdxl"])
    jobs = [job(seed=1), job(seed=2, negative_prompt="blurry"), job("a blue square", seed=3)]
    w = worker(cache, max_batch=8)
    _, outcomes = run_jobs(w, jobs)
    assert w.metrics.batches == [2, 1]
    pipe = cache.pipelines[MODEL]
    assert_each_as_alone(pipe, jobs, outcomes)
    # The rule is needed: the same three in one batch change the answer of a job without a negative prompt.
    mixed = pipe.generate(**{**SMALL, "prompt": ["a red circle", "a red circle"], "negative_prompt": ["", "blurry"],
                             "seed": [1, 2]})
    own = alone(pipe, jobs[0], {"seed": 1})
    assert np.abs(np.asarray(mixed[0], dtype=np.int16) - own).max() > 10 * BATCH_LEVELS


def test_weighted_prompts_share_only_with_equal_window_counts(files, monkeypatch):
    """Weighted prompts pad to the batch's most 75-token windows: a two-window prompt never batches
    with one-window ones, whose answers it would change (shown by breaking the rule). On the tiny
    shapes model: emphasis keeps each window's mean, which a random text encoder's outputs, about
    0, make degenerate."""
    cache = model_cache(files["folder"], CHECKPOINT)
    long = ", ".join(["a (red:1.2) circle on a blue background"] * 12)  # past 75 tokens: two windows
    jobs = [job(seed=1, prompt_style="weighted", num_steps=2), job(long, seed=2, prompt_style="weighted", num_steps=2),
            job("a [blue] square", seed=3, prompt_style="weighted", num_steps=2)]
    w = worker(cache, max_batch=8)
    _, outcomes = run_jobs(w, jobs[:1] + jobs[2:])
    assert w.metrics.batches == [1, 1]  # windows are counted by the model's tokenizers: none before it loads
    pipe = cache.pipelines[MODEL]

    w = worker(cache, max_batch=8)  # loaded: the two one-window prompts share, the two-window one runs apart
    _, outcomes = run_jobs(w, jobs)
    assert w.metrics.batches == [2, 1]
    assert_each_as_alone(pipe, jobs, outcomes)

    monkeypatch.setattr(batching, "_windows", lambda texts, tokenizers: 1)  # the rule broken
    w = worker(cache, max_batch=8)
    _, outcomes = run_jobs(w, jobs)
    assert w.metrics.batches == [3]
    with pytest.raises(AssertionError, match="differs from its job's own"):
        assert_each_as_alone(pipe, jobs, outcomes)


def test_the_oldest_job_runs_first_and_compatible_ones_join_it_up_to_max_batch(tmp_path):
    cache = echo_cache(tmp_path)
    jobs = [job("a", seed=1), job("b", seed=2, num_images=2), job("c", seed=3), job("d", num_steps=4),
            job("e", seed=5), job("f", seed=6)]
    w = worker(cache, max_batch=2)
    batches = []
    w.listeners.append(lambda t: batches.append(tuple(x.job.kwargs["prompt"] for x in w.running_batch))
                       if t.state == "running" and t.step == 0 and t is w.running else None)
    tickets, outcomes = run_jobs(w, jobs)
    # a (1) + b (2) > 2: b waits; c joins a. Then b alone (full), d (other steps) alone, then e + f.
    assert batches == [("a", "c"), ("b",), ("d",), ("e", "f")]
    assert outcomes[3].pictures[0].settings["seed"] == tickets[3].share.seeds[0]  # alone, with the seed it was given
    assert [[p.settings["prompt"] for p in r.pictures] for r in outcomes] == [["a"], ["b", "b"], ["c"], ["d"], ["e"],
                                                                              ["f"]]


def test_what_shares_a_batch():
    base = job(seed=1)
    key = batching.share_of(base, "plain").key
    same = [job("another prompt", seed=9), job(seed=[4, 5]), job(num_images=3), job(negative_prompt=None, seed=2)]
    assert all(batching.share_of(j, "plain").key == key for j in same)
    apart = [job(seed=1, num_steps=4), job(seed=1, width=128), job(seed=1, negative_prompt="x"),
             job(seed=1, sampler="euler"), job(seed=1, sampler_options={"eta": 0.5}), job(seed=1, guidance=8),
             job(seed=1, guidance=7), GenerationJob("@cf/lykon/dreamshaper-8-lcm", base.kwargs)]
    keys = [batching.share_of(j, "plain").key for j in apart]
    assert key not in keys and len(set(keys)) == len(keys)
    png = Image.new("RGB", (8, 8))
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    with_bytes = [batching.share_of(job(seed=k, image=buf.getvalue()), "plain").key for k in (1, 2)]
    assert with_bytes[0] == with_bytes[1] != key  # the same picture's bytes share
    for alone_ in (job(image=png), job(output="latent"), job(num_images=0), job(seed=-1), job(prompt=5),
                   job(prompt_style="weighted")):  # weighted without the model's tokenizers at hand
        assert batching.share_of(alone_, "plain") is None, alone_
    drawn = batching.share_of(job(num_images=3), "plain")
    assert drawn.seeds[1:] == (drawn.seeds[0] + 1, drawn.seeds[0] + 2)  # drawn once, when planned
    assert batching.share_of(job(prompt_style="weighted"), "plain", tokenizers=[]) is not None


def test_the_default_max_batch(monkeypatch):
    """A CPU: CPU_MAX_BATCH. A GPU: what 70% of the memory free after measuring holds at the measured
    bytes per image (the measurement itself needs a GPU: scripts/gpu_check.py's business), 1 when
    the measurement runs out of memory."""
    assert batching.batch_limit(type("Pipe", (), {"device": torch.device("cpu")})()) == batching.CPU_MAX_BATCH
    assert batching.limit_from_memory(free=10 * 2 ** 30, per_image=2 ** 30) == 7
    assert batching.limit_from_memory(free=2 ** 40, per_image=2 ** 20) == batching.GPU_MAX_BATCH
    assert batching.limit_from_memory(free=2 ** 20, per_image=2 ** 30) == 1
    gpu = type("Pipe", (), {"device": torch.device("cuda", 0)})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * 2 ** 30, 80 * 2 ** 30))
    monkeypatch.setattr(batching, "memory_per_image", lambda pipe: 3 * 2 ** 30)
    assert batching.batch_limit(gpu) == 4  # 0.7 x 20 / 3

    def out_of_memory(pipe):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(batching, "memory_per_image", out_of_memory)
    assert batching.batch_limit(gpu) == 1


# ---------------------------------------------------------------- giving up


def test_a_job_given_up_mid_batch_leaves_the_others_running(sd15):
    jobs = [job(seed=1), job("a blue square", seed=2), job("a green triangle", seed=3)]
    w, gate = worker(sd15, max_batch=8), Gate(at=1)
    w.listeners.append(gate)

    async def during(tickets):
        await gate.wait()
        w.abandon(tickets[1])
        gate.release()
        return [tickets[0], tickets[2]]

    tickets, outcomes = run_jobs(w, jobs, during)
    assert w.metrics.batches == [3]  # the batch ran to its end
    assert [t.state for t in tickets] == ["done", "stopped", "done"]
    assert tickets[1].step == 1 and not tickets[1].future.done()  # dropped: its client was answered already
    assert_each_as_alone(sd15.pipelines[MODEL], [jobs[0], jobs[2]], outcomes)


def test_a_batch_stops_when_every_job_of_it_gives_up(tmp_path):
    w, gate = worker(echo_cache(tmp_path), max_batch=8), Gate(at=1)
    w.listeners.append(gate)

    async def during(tickets):
        await gate.wait()
        for t in tickets:
            w.abandon(t)
        gate.release()
        while w.running_batch:  # the consumer lets go of it once the thread returns
            await asyncio.sleep(0.01)
        return [w.submit(job("next", seed=9), "next")]  # the worker is free again

    tickets, outcomes = run_jobs(w, [job(seed=1, num_steps=5), job("b", seed=2, num_steps=5)], during)
    assert [t.state for t in tickets] == ["stopped", "stopped"] and [t.step for t in tickets] == [1, 1]
    assert w.cache.fakes[MODEL].calls == [2, 1] and w.metrics.batches == [1]  # stopped at step 2's checkpoint
    assert outcomes[0].pictures[0].settings["prompt"] == "next"


def test_a_job_given_up_while_queued_never_joins_a_batch(tmp_path):
    w, gate = worker(echo_cache(tmp_path), max_batch=8), Gate(at=1)
    w.listeners.append(gate)

    async def during(tickets):
        await gate.wait()  # the first runs; the others wait
        w.abandon(tickets[2])
        gate.release()
        return [tickets[1], tickets[3]]

    tickets, outcomes = run_jobs(w, [job("a", num_steps=4), job("b", seed=1), job("c", seed=2), job("d", seed=3)],
                                 during)
    assert w.metrics.batches == [1, 2] and tickets[2].state == "queued" and tickets[2].step == 0
    assert [r.pictures[0].settings["prompt"] for r in outcomes] == ["b", "d"]


def test_a_failing_batch_fails_each_of_its_jobs_and_out_of_memory_runs_it_in_halves(tmp_path):
    cache = echo_cache(tmp_path)
    w = worker(cache, max_batch=None, size_batches=lambda pipe: 4)
    first, *rest = [job(str(k), seed=k) for k in range(5)]
    run_jobs(w, [first])  # loads the model: 4 images a batch from now on
    cache.fakes[MODEL].fail_above = (2, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    _, outcomes = run_jobs(w, rest)
    assert cache.fakes[MODEL].calls == [1, 4, 2, 2] and w.limits[MODEL] == 2
    assert [r.pictures[0].settings["prompt"] for r in outcomes] == ["1", "2", "3", "4"]

    cache.fakes[MODEL].fail_above = (0, RuntimeError("a bug"))
    tickets, outcomes = run_jobs(w, rest[:2])
    assert [str(e) for e in outcomes] == ["a bug", "a bug"] and [t.state for t in tickets] == ["failed", "failed"]


def test_a_job_the_device_cannot_finish_in_time_leaves_its_batch(tmp_path):
    """The time check runs per job in the thread, once the rate is measured: a job of many images
    fails alone (TooSlow), the others of its batch run."""
    from sd.serve.speed import Speeds, TooSlow
    from sd.serve.worker import Worker
    cache = echo_cache(tmp_path)
    w = Worker(cache, Speeds(1.0, "cpu"), 32, lambda pipe: 1.0, max_batch=16)
    jobs = [job(seed=1, width=256, height=256), job(seed=2, width=256, height=256, num_images=8)]
    _, outcomes = run_jobs(w, jobs)
    # 1 s per megapixel per UNet call: 0.066 MP x 3 steps x 2 (CFG) = 0.4 s per image; 8 images: 3.1 s > 2 x 1 s
    assert isinstance(outcomes[1], TooSlow) and outcomes[0].pictures[0].settings["seed"] == 1
    assert cache.fakes[MODEL].calls == [1]


# ---------------------------------------------------------------- through HTTP


def test_requests_queued_over_http_batch_and_a_client_that_leaves_leaves_its_batch(files):
    """Workers AI requests queue behind a held one, run as one batch of three; one client hangs up
    while its batch runs: 499 for it, 200 for the others, each image its request's own."""
    cache = model_cache(files["folder"], files["sd15"])
    server, log, gate = InProcessServer(cache), LogWatch(), Gate(at=1)
    server.service.worker.max_batch = 8
    server.service.worker.listeners.append(gate)
    body = {"width": 256, "height": 256, "num_steps": 2, "guidance": 1.0}
    url = f"{server.url}/ai/run/{MODEL}"
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(httpx.post, url, json={**body, "prompt": "first", "seed": 0}, timeout=60)
            gate.reached.wait(60)
            others = [pool.submit(httpx.post, url, json={**body, "prompt": f"picture {k}", "seed": k}, timeout=60)
                      for k in (1, 3)]
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                leaving = json.dumps({**body, "prompt": "picture 2", "seed": 2}).encode()
                s.sendall(f"POST /ai/run/{MODEL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(leaving)}\r\n\r\n".encode() + leaving)
                wait_until(lambda: server.health()["queue"] == 3, "three queued")
                gate.reached.clear()
                gate.open.set()  # the first finishes; the three run as one batch, held again at its step 1
                gate.open.clear()
                assert gate.reached.wait(60)
                assert server.health()["devices"][0]["batch"] == 3
            log.wait_for("status=499")  # answered at once, while its batch is held
            gate.release()
            assert first.result().status_code == 200
            answers = [f.result() for f in others]
        assert [r.status_code for r in answers] == [200, 200]
        pipe = cache.pipelines[MODEL]
        for r, seed in zip(answers, (1, 3)):
            own = np.asarray(pipe.generate(**{**body, "prompt": f"picture {seed}", "seed": seed}), dtype=np.int16)
            assert np.abs(pixels(r.content) - own).max() <= BATCH_LEVELS
        log.wait_for("given up while its batch ran")
    finally:
        gate.release()
        log.detach()
        server.stop()


def test_a_job_that_cannot_be_planned_fails_alone_and_the_worker_goes_on(tmp_path):
    """Without the app's checks in front (a Ray replica's worker, say), an unknown model reaches the
    worker: it fails with the registry's error, and the next job runs."""
    from sd.registry import UnknownModel
    w = worker(echo_cache(tmp_path), max_batch=8)
    _, outcomes = run_jobs(w, [GenerationJob("@cf/no/such-model", {"prompt": "x"}), job(seed=1)])
    assert isinstance(outcomes[0], UnknownModel) and outcomes[1].pictures[0].settings["seed"] == 1
