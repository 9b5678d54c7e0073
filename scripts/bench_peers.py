"""One library's numbers for scripts/bench.py --peers, in a process of its own.

    python scripts/bench_peers.py sdcpp --mode q8_0 --model sd15.safetensors --size 256 --steps 4
    python scripts/bench_peers.py openvino --mode bf16 --folder sd15-folder --export CACHE/ov-bf16
    python scripts/bench_peers.py sd --mode bfloat16 --model sd15.safetensors --step-cache 3

Every library is measured the same way, in a fresh process: load, one warm-up generate, then
--repeats timed ones; a UNet step (the CFG batch) is the gap between the library's own
per-step callbacks (their mean, first step left out), the VAE decode what follows the last step. It prints one JSON object on its
last line: seconds to load, per step, per decode and per generate (medians), and the process's
peak resident memory. stable-diffusion.cpp and OpenVINO run in the peers' own environment (their
Python packages are no dependency of sd, and optimum pins its own stack); sd and diffusers in
sd's, where this script borrows bench.py's loaders.
"""

import argparse
import json
import os
import statistics
import time

PROMPT = "a photograph of an astronaut riding a horse"  # bench.py's prompt
NEGATIVE = ""


def peak_rss() -> int:
    """This process's peak resident memory (Linux VmHWM), bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def step_time(marks: list[float]) -> float:
    """Seconds per step: the mean gap between the ends of consecutive steps (the first step, which
    also waits for the text encoder, left out). A mean, not a median, so that a step cache's
    alternation of whole and shallow steps counts as it costs."""
    return (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else float("nan")


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


# ---------------------------------------------------------------- stable-diffusion.cpp


def run_sdcpp(args) -> dict:
    """stable-diffusion.cpp (ggml): the official single file read as it is, weights in --mode
    (f32, f16, q8_0); Euler, CFG, the threads asked for. A step's time is the gap between the
    binding's per-step callbacks; the decode is the rest of generate after the last step."""
    from stable_diffusion_cpp import StableDiffusion
    start = time.perf_counter()
    model = StableDiffusion(model_path=args.model, wtype=args.mode, n_threads=args.threads, verbose=False,
                            rng_type="cpu")
    load = time.perf_counter() - start

    def once():
        marks = []
        begin = time.perf_counter()
        model.generate_image(PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size, cfg_scale=7.5,
                             sample_method="euler", sample_steps=args.steps, seed=0, cache_mode=args.cache_mode,
                             progress_callback=lambda step, steps, _: marks.append(time.perf_counter()))
        end = time.perf_counter()
        return {"generate": end - begin, "step": step_time(marks), "decode": end - marks[-1] if marks else float("nan")}

    once()  # warm-up
    runs = [once() for _ in range(args.repeats)]
    return {"load": load, **{k: median_of(runs, k) for k in ("step", "decode", "generate")}}


# ---------------------------------------------------------------- OpenVINO


def run_openvino(args) -> dict:
    """OpenVINO through optimum-intel: the diffusers folder exported once to OpenVINO IR (cached
    in --export), weights in --mode (f32; bf16 as the inference precision, where the CPU has
    it; int8 weight compression). A step's time is the gap between step callbacks."""
    from optimum.intel import OVStableDiffusionPipeline
    config = {"INFERENCE_NUM_THREADS": str(args.threads), "NUM_STREAMS": "1",
              "INFERENCE_PRECISION_HINT": "bf16" if args.mode == "bf16" else "f32"}
    if not os.path.isdir(args.export):
        export(args)
    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(args.export, ov_config=config, compile=True)
    load = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)

    def once():
        import numpy as np
        marks = []

        def mark(pipeline, i, t, tensors):
            marks.append(time.perf_counter())
            return tensors
        begin = time.perf_counter()
        latents = pipe(PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size, guidance_scale=7.5,
                       num_inference_steps=args.steps, output_type="latent", callback_on_step_end=mark,
                       generator=np.random.RandomState(0)).images
        sampled = time.perf_counter()
        pipe.vae_decoder(latent_sample=latents / pipe.vae_decoder.config["scaling_factor"])
        end = time.perf_counter()
        return {"generate": end - begin, "step": step_time(marks), "decode": end - sampled}

    once()
    runs = [once() for _ in range(args.repeats)]
    return {"load": load, **{k: median_of(runs, k) for k in ("step", "decode", "generate")}}


def export(args):
    """The folder to OpenVINO IR, once: in float32, or with 8-bit weights (nncf) for int8."""
    from optimum.intel import OVStableDiffusionPipeline
    extra = {}
    if args.mode == "int8":
        from optimum.intel import OVWeightQuantizationConfig
        extra["quantization_config"] = OVWeightQuantizationConfig(bits=8)
    pipe = OVStableDiffusionPipeline.from_pretrained(args.folder, export=True, compile=False, **extra)
    pipe.save_pretrained(args.export)


# ---------------------------------------------------------------- sd and diffusers


def run_torch(args) -> dict:
    """sd or diffusers on the single file, through bench.py's loaders; --mode is the dtype."""
    import torch

    import bench
    torch.set_num_threads(args.threads)
    dtype = bench.DTYPES[args.mode]
    path = args.model
    if args.peer == "sd":
        lib = bench.Ours(path, torch.device("cpu"), dtype)
    else:
        lib = bench.Diffusers(path, torch.device("cpu"), dtype, "sd15", args.folder)
    start = time.perf_counter()
    with torch.inference_mode():
        lib.setup(lib.load())
        load = time.perf_counter() - start

        def once():
            marks = []
            begin = time.perf_counter()
            if args.peer == "sd":
                lib.pipe.generate(PROMPT, width=args.size, height=args.size, num_steps=args.steps, guidance=7.5,
                                  seed=0, sampler="euler", step_cache=args.step_cache,
                                  callback=lambda step: marks.append(time.perf_counter()))
            else:
                def mark(pipeline, i, t, tensors):
                    marks.append(time.perf_counter())
                    return tensors
                lib.pipe(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps,
                         guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=mark)
            end = time.perf_counter()
            return {"generate": end - begin, "step": step_time(marks), "decode": end - marks[-1]}

        once()
        runs = [once() for _ in range(args.repeats)]
    return {"load": load, **{k: median_of(runs, k) for k in ("step", "decode", "generate")}}


RUNNERS = {"sdcpp": run_sdcpp, "openvino": run_openvino, "sd": run_torch, "diffusers": run_torch}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("peer", choices=list(RUNNERS))
    p.add_argument("--mode", default="f32", help="sdcpp: f32, f16, q8_0; openvino: f32, bf16, int8; "
                                                   "sd, diffusers: float32, bfloat16")
    p.add_argument("--model", help="sdcpp, sd, diffusers: the single-file checkpoint")
    p.add_argument("--folder", help="openvino: the diffusers folder to export; diffusers: its config folder")
    p.add_argument("--export", help="openvino: where the exported IR is cached")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-mode", default="disabled", help="sdcpp: its step cache (easycache, ucache, ...)")
    p.add_argument("--step-cache", type=int, help="sd: DeepCache's interval (generate's step_cache)")
    args = p.parse_args()
    row = RUNNERS[args.peer](args)
    print(json.dumps({**row, "peak_rss": peak_rss()}))


if __name__ == "__main__":
    main()
