"""Speed and memory of sd next to diffusers, in one process, on the same full-size checkpoint.

    python scripts/bench.py                                   # SD 1.5, CPU, fp32, 256x256, 4 steps
    python scripts/bench.py --model sdxl --device cuda --dtype float16 --size 1024 --steps 20 --compile
    python scripts/bench.py --tiny --size 64 --steps 2 --repeats 1     # the same code paths in seconds

The checkpoint is the real architecture with random weights, in the official single-file
layout, written once under --cache. Both libraries load that same file; each row is the
median of --repeats runs after a warm-up run (CUDA events on a GPU), and the last column is
sd's number over diffusers'. This is a script, not a test: the suite never times anything.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import sd
from sd.clip import CLIP_BIG_G, CLIP_L, CLIPConfig, CLIPTextModel
from sd.writer import scheduler_config, write_configs, write_single_file
from sd.schedule import ScheduleConfig
from sd.tokenizer import bpe_model
from sd.unet import SD15, SDXL, UNet, UNetConfig, timestep_embedding
from sd.vae import VAE_SD15, VAE_SDXL, AutoencoderKL, VAEConfig
from sd.weights import no_weight_init

PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--size", type=int, help="image side (default: 256 on the CPU, else the model's own)")
    p.add_argument("--steps", type=int, help="steps of the whole-generate row (default: 4 on the CPU, else 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add rows for sd with compile=True")
    p.add_argument("--tiled", type=int, metavar="SIZE",
                   help="add a VAE decode of a SIZE x SIZE image, tiled and whole: time and peak memory (one run)")
    p.add_argument("--file-dtype", choices=list(DTYPES), default="float32",
                   help="of the checkpoint written (float16 makes SDXL's 7 GB instead of 14)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny stand-ins of the models (every block type, a few MB): rehearses the script in seconds")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="load and time one library, free it, then the other (when both do not fit in memory)")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: measure this library's load peak, print it
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("SD_BENCH_CACHE",
                                                                      Path.home() / ".cache" / "sd-bench")))
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--peers", action="store_true",
                   help="instead: sd, diffusers, stable-diffusion.cpp and OpenVINO (SD 1.5, CPU), each row in a "
                        "fresh process (scripts/bench_peers.py), rounds interleaved, ratios to sd float32")
    p.add_argument("--peers-python", type=Path,
                   help="the Python of the peers' environment (default: CACHE/peers/bin/python; see docs/PERFORMANCE.md)")
    p.add_argument("--caches", action="store_true",
                   help="with --peers, instead: sd's step cache at N = 2, 3, 5 and stable-diffusion.cpp's cache modes "
                        "at their defaults, next to both uncached (float32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="with --peers: threads for every library")
    return p.parse_args()


# ---------------------------------------------------------------- the checkpoint and diffusers' configs

@dataclass(frozen=True)
class Arch:
    """The models of one checkpoint: the UNet, the VAE, and CLIP-L (then, for SDXL, bigG)."""
    unet: UNetConfig
    vae: VAEConfig
    texts: tuple[CLIPConfig, ...]


ARCHS = {"sd15": Arch(SD15, VAE_SD15, (CLIP_L,)), "sdxl": Arch(SDXL, VAE_SDXL, (CLIP_L, CLIP_BIG_G))}
# Every block type of the real ones at a few MB, for rehearsing a run on a CPU in seconds
# (scripts/gpu_check.py --quick). They keep the rules the single-file loader reads configs by:
# 8 heads per UNet level for SD 1.5, 64 channels per head for SDXL and for CLIP, and GroupNorm's
# 32 groups; the VAE keeps its 8x downscaling, and bigG is wider than CLIP-L, as diffusers'
# single-file loader tells the two apart by their width.
_TINY_CLIP_L = CLIPConfig(width=64, layers=2, heads=1, mlp_width=128)
_TINY_BIG_G = CLIPConfig(width=128, layers=2, heads=2, mlp_width=256, act="gelu", projection_dim=128)
TINY_ARCHS = {
    "sd15": Arch(UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0),
                            heads=(8, 8, 8), context_dim=64),
                 VAEConfig(channels=32, channel_mult=(1, 1, 2, 2)), (_TINY_CLIP_L,)),
    "sdxl": Arch(UNetConfig(model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                            mid_transformer_depth=2, heads=(1, 2, 2), context_dim=64 + 128, linear_proj=True,
                            adm_in_channels=128 + 6 * 8),
                 VAEConfig(channels=32, channel_mult=(1, 1, 2, 2), scaling_factor=VAE_SDXL.scaling_factor),
                 (_TINY_CLIP_L, _TINY_BIG_G)),
}


def init_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights of a sane scale (so float16 neither overflows nor underflows): matrices and
    kernels N(0, 0.02), norms' scales 1, biases 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def write_checkpoint(model: str, path: Path, dtype: torch.dtype, arch: Arch | None = None,
                     device: str | torch.device = "cpu"):
    """Random weights of `arch` (default: the full-size model) in the official single-file
    layout, in `dtype`. The modules are built in that dtype and init_weights sets every weight,
    so torch's own initialisation is skipped: SDXL in float16 takes 7 GB to build, not a 10 GB
    float32 UNet first. On a GPU (`device`) the random numbers take a second instead of minutes."""
    arch = arch or ARCHS[model]
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with no_weight_init(), torch.device(device):
            unet, vae = init_weights(UNet(arch.unet)), init_weights(AutoencoderKL(arch.vae))
            texts = [init_weights(CLIPTextModel(cfg)) for cfg in arch.texts]
    finally:
        torch.set_default_dtype(torch.float32)
    write_single_file(path, unet, vae, texts)  # SD 1.5 or SDXL by the number of text encoders


def size_embed_dim(arch: Arch) -> int:
    """SDXL: the width of each of the six size/crop numbers' embeddings (256 in SDXL)."""
    return (arch.unet.adm_in_channels - arch.texts[-1].projection_dim) // 6


def write_diffusers_configs(model: str, folder: Path, arch: Arch | None = None):
    """The component configs diffusers' from_single_file needs (it would fetch them from the Hub):
    sd.writer's, with SD's schedule on Euler."""
    arch = arch or ARCHS[model]
    write_configs(folder, model, arch.unet, arch.vae, list(arch.texts), 1024 if model == "sdxl" else 512,
                  scheduler_config("euler", "default", ScheduleConfig()))


# ---------------------------------------------------------------- measuring

def rss_peak_reset():
    """Linux: reset the process's peak resident memory (VmHWM) to its current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Timer:
    """Seconds one call takes: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        if self.device is None:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Start from an idle GPU: with earlier work still running, fn's kernels would queue up
        # meanwhile, and the time the host takes to launch them would be hidden.
        torch.cuda.synchronize(self.device)
        start.record()
        fn()
        end.record()
        end.synchronize()  # elapsed_time needs both events to have happened
        return start.elapsed_time(end) / 1000


def touch(modules) -> float:
    """Read one value in every 4 KiB of every weight, so memory-mapped weights are paged in."""
    total = 0.0
    for module in modules:
        for p in module.parameters():
            total += p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].float().sum().item()
    return total


def measure_load(lib, repeats: int, device: torch.device):
    """Median seconds to load, and to load and then read every weight once (weights that are
    memory-mapped are only read from the file when first used), over `repeats` runs after a
    warm-up run."""
    loads, ready, pipe = [], [], None
    for _ in range(repeats + 1):
        pipe = None
        gc.collect()
        t = time.perf_counter()
        pipe = lib.load()
        loads.append(time.perf_counter() - t)
        touch(lib.modules(pipe))
        if device.type == "cuda":
            torch.cuda.synchronize()
        ready.append(time.perf_counter() - t)
    return statistics.median(loads[1:]), statistics.median(ready[1:]), pipe


def load_peak(lib, device: torch.device) -> int:
    """Bytes by which one load, with every weight then read once, raises the process's peak
    resident memory above its size before the load."""
    gc.collect()
    before = rss()
    rss_peak_reset()
    touch(lib.modules(lib.load()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rss("VmHWM") - before


def release_memory():
    """Free what is unreachable and hand freed heap memory back to the system (glibc keeps
    it otherwise, and SDXL's 14 GB would stay with this process)."""
    gc.collect()
    if platform.system() == "Linux":
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_peak_in_fresh_process(lib) -> int:
    """load_peak in a new process (this script again, with --peak-of): a process that has
    loaded before can reuse memory it already holds, which would hide part of the peak."""
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--peak-of", lib.name],
                           capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"measuring {lib.name}'s load peak failed:\n{child.stderr[-3000:]}")
    return int(child.stdout.split()[-1])


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, calls: int = 10) -> float:
    """The device's measured matrix-multiply rate, floating-point operations per second. On a GPU
    the matrices are 8192 square: 2048 square ones take microseconds there, and launching them
    would be timed instead of multiplying. A CPU has no fast float16 kernels (0.4 GFLOP/s on the
    Xeon of docs/PERFORMANCE.md), where 256 square ones take a second and 2048 square minutes."""
    n = n or (8192 if device.type == "cuda" else 256 if dtype == torch.float16 else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    timer = Timer(device)
    a @ b
    return 2 * n ** 3 * calls / timer(lambda: [a @ b for _ in range(calls)])


def unet_flops(lib, x, t, inputs) -> int:
    """Floating-point operations of one UNet call, counted by torch (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        lib.unet(x, t, inputs)
    return counter.get_total_flops()


# ---------------------------------------------------------------- the two libraries, row by row

class Ours:
    name = "sd"

    def __init__(self, path, device, dtype, compile=False):
        self.compiled = compile
        def load():
            bpe_model.cache_clear()  # each load reads the vocabulary, as the first in a process does
            return sd.load(path, device=device, dtype=dtype, compile=compile)
        self.load = load

    def setup(self, pipe):
        self.pipe = pipe

    @staticmethod
    def modules(pipe):
        return [pipe.unet, pipe.vae, *pipe.text_encoders]

    def text(self):
        return self.pipe.encode_prompts([PROMPT, ""])

    def unet(self, x, t, inputs):
        return self.pipe.unet(x, t, inputs["context"], y=inputs.get("y"))

    def decode(self, z, tiled=False):
        self.pipe.vae_tiling = tiled
        # The pipeline's own cast: SDXL's VAE stays float32 in a float16 pipeline.
        return self.pipe.vae.decode(z.to(self.pipe.vae_dtype),
                                    tile=self.pipe.vae_tile(*(side * self.pipe.vae.scale for side in z.shape[-2:])))

    def generate(self, size, steps):
        return self.pipe.generate(PROMPT, width=size, height=size, num_steps=steps, guidance=7.5, seed=0,
                                  sampler="euler")


class Diffusers:
    name = "diffusers"

    def __init__(self, path, device, dtype, model, config_dir):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import logging
        logging.disable_progress_bar()  # "Loading pipeline components" bars and warnings would bury the table
        logging.set_verbosity_error()
        cls = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
        extra = {} if model == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}

        def load():
            pipe = cls.from_single_file(str(path), config=str(config_dir), torch_dtype=dtype,
                                        local_files_only=True, **extra).to(device)
            pipe.set_progress_bar_config(disable=True)
            return pipe
        self.load, self.device, self.sdxl = load, device, model == "sdxl"

    def setup(self, pipe):
        self.pipe = pipe

    @staticmethod
    def modules(pipe):
        return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]

    def text(self):
        return self.pipe.encode_prompt(PROMPT, device=self.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=True, negative_prompt="")

    def unet(self, x, t, inputs):
        extra = {}
        if self.sdxl:
            extra = {"added_cond_kwargs": {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}}
        return self.pipe.unet(x, t, encoder_hidden_states=inputs["context"], **extra).sample

    def decode(self, z, tiled=False):
        vae = self.pipe.vae
        vae.enable_tiling() if tiled else vae.disable_tiling()
        # As diffusers' SDXL pipeline decodes: a float16 VAE whose config says force_upcast runs
        # in float32 for the decode, then goes back to float16. vae.decode alone would not.
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        try:
            return vae.decode(z.to(vae.dtype)).sample
        finally:
            if upcast:
                vae.to(torch.float16)

    def generate(self, size, steps):
        return self.pipe(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(0)).images[0]


def unet_inputs(model: str, size: int, device, dtype, arch: Arch | None = None) -> tuple:
    """Batch-2 (CFG) UNet inputs as each pipeline makes them inside generate: latents and text
    in `dtype`, the timestep a float32 scalar (so a compiled UNet sees the same input here as in
    generate and is not compiled twice), and for SDXL the pooled text with the size ids (sd:
    `y`, the ids embedded in float32 then cast; diffusers: `pooled` and `time_ids` in `dtype`)."""
    arch = arch or ARCHS[model]
    g = torch.Generator("cpu").manual_seed(0)
    h = size // 8
    x = torch.randn(2, arch.unet.in_channels, h, h, generator=g).to(device, dtype)
    t = torch.tensor(500.0, device=device)
    inputs = {"context": torch.randn(2, 77, arch.unet.context_dim, generator=g).to(device, dtype)}
    if model == "sdxl":
        pooled = torch.randn(2, arch.texts[-1].projection_dim, generator=g).to(device, dtype)
        sizes = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=torch.float32)
        embedded = timestep_embedding(sizes.flatten(), size_embed_dim(arch)).reshape(2, -1)
        inputs.update(y=torch.cat([pooled, embedded.to(dtype)], dim=-1), pooled=pooled, time_ids=sizes.to(dtype))
    return x, t, inputs


def run(libs, args, device) -> dict[str, dict]:
    """Every row for every library. Loads are measured one library at a time; the other rows
    alternate between the libraries run by run, so a machine that slows down or speeds up
    while the benchmark runs weighs on both alike."""
    rows = {lib.name: {} for lib in libs}
    with torch.inference_mode():
        for lib in libs:
            print(f"loading with {lib.name}", flush=True)
            seconds, ready, pipe = measure_load(lib, args.repeats, device)
            lib.setup(pipe)
            rows[lib.name].update({"load (s)": seconds, "load, then every weight read once (s)": ready})
    for name, values in time_rows(libs, args, device).items():
        rows.setdefault(name, {}).update(values)
    return rows


def time_rows(libs, args, device, arch: Arch | None = None, on_row=None) -> dict[str, dict]:
    """The rows after loading, for libraries already set up: text encoding, UNet step, VAE
    decode, whole generate, the UNet's floor, on a GPU the peak device memory, and with
    args.tiled the large decode. `on_row(rows)` is called after each row (to save partial
    results). `args` needs model, size, steps, dtype, repeats and tiled."""
    rows = {lib.name: {} for lib in libs}
    arch = arch or (TINY_ARCHS if getattr(args, "tiny", False) else ARCHS)[args.model]
    on_row = on_row or (lambda rows: None)
    with torch.inference_mode():
        dtype = DTYPES[args.dtype]
        x, t, inputs = unet_inputs(args.model, args.size, device, dtype, arch)
        latent = (1, arch.vae.latent_channels, args.size // 8, args.size // 8)
        z = torch.randn(latent, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        work = {"text encoding (s)": lambda lib: lib.text(),
                "UNet step, batch 2 (s)": lambda lib: lib.unet(x, t, inputs),
                "VAE decode (s)": lambda lib: lib.decode(z),
                f"generate {args.size}x{args.size}, {args.steps} steps (s)": lambda lib: lib.generate(args.size,
                                                                                                     args.steps)}
        flops, rate = unet_flops(libs[0], x, t, inputs), matmul_rate(device, dtype)
        # The step's floor, then what it is made of (the table prints only the first).
        rows["floor"] = {"UNet step, batch 2 (s)": flops / rate, "UNet step (GFLOP)": flops / 1e9,
                         "matmul rate (GFLOP/s)": rate / 1e9}
        print(f"UNet step: {flops / 1e9:.0f} GFLOP; matmul rate {rate / 1e9:.0f} GFLOP/s; "
              f"floor {flops / rate:.3f} s", flush=True)
        on_row(rows)
        timer = Timer(device)
        for row, fn in work.items():
            print(f"timing {row}", flush=True)
            for lib in libs:  # warm-up (and compile) each once
                fn(lib)
            times = {lib.name: [] for lib in libs}
            for _ in range(args.repeats):
                for lib in libs:
                    times[lib.name].append(timer(lambda: fn(lib)))
            for lib in libs:
                rows[lib.name][row] = statistics.median(times[lib.name])
            on_row(rows)
        if device.type == "cuda":
            for lib in libs:
                # Its own weights plus the rise during generate: the other library's weights, on the
                # same device, count for neither.
                weights = sum(p.numel() * p.element_size() for m in lib.modules(lib.pipe) for p in m.parameters()
                              if p.device.type == "cuda") / 1e9
                rows[lib.name]["peak device memory, generate (GB)"] = weights + peak_memory(
                    lambda: lib.generate(args.size, args.steps), device)[1]
            on_row(rows)
        if args.tiled:
            latent = (1, arch.vae.latent_channels, args.tiled // 8, args.tiled // 8)
            z = torch.randn(latent, generator=torch.Generator().manual_seed(2)).to(device, dtype)
            for tiled in (True, False):
                how = "tiled" if tiled else "whole"
                for lib in (lib for lib in libs if not getattr(lib, "compiled", False)):
                    print(f"VAE decode {args.tiled}x{args.tiled} {how}, {lib.name}", flush=True)
                    seconds, peak = peak_memory(lambda: lib.decode(z, tiled), device)
                    rows[lib.name][f"VAE decode {args.tiled}x{args.tiled} {how}, one run (s)"] = seconds
                    rows[lib.name][f"VAE decode {args.tiled}x{args.tiled} {how}, peak memory (GB)"] = peak
                    on_row(rows)
    return rows


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def peak_memory(fn, device) -> tuple[float, float]:
    """(seconds, peak memory in GB above what was in use before) of one call of `fn`: device
    memory on a GPU, resident host memory on the CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss()
        rss_peak_reset()
    seconds = Timer(device)(fn)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss("VmHWM")
    return seconds, (peak - before) / 1e9


# ---------------------------------------------------------------- peers: every library in its own process

SD_CPP_CACHE_MODES = ("easycache", "ucache", "dbcache", "taylorseer")  # stable-diffusion.cpp's, at its defaults


def peer_rows(args, path: Path, config_dir: Path, folder: Path) -> dict[str, list[str]]:
    """(label -> bench_peers.py arguments) for --peers: each library in float32 and in its usual
    fast mode on this CPU (sd and OpenVINO bfloat16 where the CPU has AMX, stable-diffusion.cpp
    f16 and q8_0, OpenVINO int8 weights)."""
    if not folder.is_dir():
        print(f"writing {folder} (the same weights as a diffusers folder, for OpenVINO's export)", flush=True)
        sd.save(sd.load(path, device="cpu"), folder, layout="diffusers")
    common = ["--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads)]
    rows = {f"sd {m}": ["sd", "--mode", m, "--model", str(path)] for m in ("float32", "bfloat16")}
    rows["diffusers float32"] = ["diffusers", "--mode", "float32", "--model", str(path), "--folder", str(config_dir)]
    rows.update({f"sd.cpp {m}": ["sdcpp", "--mode", m, "--model", str(path)] for m in ("f32", "f16", "q8_0")})
    rows.update({f"OpenVINO {m}": ["openvino", "--mode", m, "--folder", str(folder),
                                   "--export", str(folder.with_name(f"{folder.name}-openvino-{m}"))]
                 for m in ("f32", "bf16", "int8")})
    if args.caches:  # step caches against the same libraries uncached, in float32
        rows = {label: rows[label] for label in ("sd float32", "sd.cpp f32")}
        rows.update({f"sd float32, step cache {n}": ["sd", "--mode", "float32", "--model", str(path),
                                                     "--step-cache", str(n)] for n in (2, 3, 5)})
        rows.update({f"sd.cpp f32, cache {mode}": ["sdcpp", "--mode", "f32", "--model", str(path),
                                                   "--cache-mode", mode] for mode in SD_CPP_CACHE_MODES})
    return {label: argv + common for label, argv in rows.items()}


def run_peers(args, path: Path, config_dir: Path, folder: Path):
    """Every library in rounds: in each, one fresh process per row (load, warm-up, one timed
    generate), so that a machine that slows down weighs on all alike; medians over rounds."""
    script = Path(__file__).with_name("bench_peers.py")
    peers_python = args.peers_python or args.cache / "peers" / "bin" / "python"
    rows, results = peer_rows(args, path, config_dir, folder), {}
    if not peers_python.is_file():
        print(f"no peers' environment at {peers_python} (docs/PERFORMANCE.md says how to make it): "
              "stable-diffusion.cpp and OpenVINO rows left out", flush=True)
        rows = {label: argv for label, argv in rows.items() if argv[0] not in ("sdcpp", "openvino")}
    for round_ in range(args.repeats):
        for label, argv in rows.items():
            python = peers_python if argv[0] in ("sdcpp", "openvino") else Path(sys.executable)
            print(f"round {round_ + 1}/{args.repeats}: {label}", flush=True)
            done = subprocess.run([str(python), str(script), *argv, "--repeats", "1"], capture_output=True,
                                  text=True, cwd=script.parent)
            if done.returncode != 0:
                print(f"  {label} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            results.setdefault(label, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = {label: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
             for label, runs in results.items()}
    base = table.get("sd float32", {})
    print(f"\nSD 1.5, {args.size}x{args.size}, {args.steps} Euler steps, CFG 7.5, {args.threads} threads, "
          f"{cpu_name()}, median of {args.repeats} rounds\n")
    keys = [("load", "load (s)"), ("step", "UNet step, CFG batch (s)"), ("decode", "VAE decode (s)"),
            ("generate", "whole generate (s)"), ("peak_rss", "peak RSS (GB)")]
    print("| library | " + " | ".join(name for _, name in keys) + " | " +
          " | ".join(f"{name.split(' (')[0]} / sd" for _, name in keys) + " |")
    print("|---" * (2 * len(keys) + 1) + "|")
    for label, row in table.items():
        scale = {"peak_rss": 1e9}
        values = [f"{row[k] / scale.get(k, 1):.3g}" for k, _ in keys]
        ratios = [f"{row[k] / base[k]:.2f}" if base.get(k) else "" for k, _ in keys]
        print(f"| {label} | " + " | ".join(values) + " | " + " | ".join(ratios) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": table,
                                         "runs": results}, indent=1))


def main():
    args = parse_args()
    device = torch.device(args.device)
    args.size = args.size or (256 if device.type == "cpu" else 1024 if args.model == "sdxl" else 512)
    args.steps = args.steps or (4 if device.type == "cpu" else 20)
    file_dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[args.file_dtype]
    name = args.model + ("-tiny" if args.tiny else "")
    arch = (TINY_ARCHS if args.tiny else ARCHS)[args.model]
    path = args.cache / f"{name}-random-{file_dtype}.safetensors"
    config_dir = args.cache / f"{name}-diffusers-config"
    if not path.is_file():
        print(f"writing {path} (full-size random weights, once)", flush=True)
        write_checkpoint(args.model, path, DTYPES[args.file_dtype], arch, device)
    write_diffusers_configs(args.model, config_dir, arch)
    if args.peers:
        return run_peers(args, path, config_dir, args.cache / f"{name}-random-{file_dtype}-folder")
    file_bytes = path.stat().st_size
    dtype = DTYPES[args.dtype]
    libs = [Ours(path, device, dtype), Diffusers(path, device, dtype, args.model, config_dir)]
    if args.compile:
        libs.insert(1, Ours(path, device, dtype, compile=True))
        libs[1].name = "sd compile=True"
    if args.peak_of:
        with torch.inference_mode():
            print(load_peak(next(lib for lib in libs if lib.name == args.peak_of), device))
        return
    # First, while this process holds no model, so that the fresh processes have the memory.
    peaks = {}
    for lib in libs:
        print(f"load peak memory of {lib.name}, in a fresh process", flush=True)
        peaks[lib.name] = load_peak_in_fresh_process(lib) / file_bytes
    if args.one_at_a_time:
        rows = {}
        for lib in libs:
            rows.update(run([lib], args, device))
            lib.pipe = None
            release_memory()
    else:
        rows = run(libs, args, device)
    for lib in libs:
        rows[lib.name]["load peak host memory, fresh process (x file)"] = peaks[lib.name]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"\n{args.model}, {args.dtype}, {machine}, torch {torch.__version__}, "
          f"{args.file_dtype} file {file_bytes / 1e9:.2f} GB, {args.size}x{args.size}, median of {args.repeats} "
          f"after a warm-up{', one library at a time' if args.one_at_a_time else ''}\n")
    names = [n for n in rows if n != "floor"]
    print("| | " + " | ".join(names) + " | " + " | ".join(f"{n} / diffusers" for n in names if n != "diffusers")
          + " | floor (FLOPs / matmul rate) |")
    print("|---" * (2 * len(names) + 1) + "|")
    for key in rows["sd"]:
        values = [rows[n].get(key) for n in names]
        ratios = [rows[n][key] / rows["diffusers"][key] if key in rows[n] and rows["diffusers"].get(key) else None
                  for n in names if n != "diffusers"]  # a peak of 0 (a tiny model's) has no ratio
        floor = rows["floor"].get(key)
        print(f"| {key} | " + " | ".join(f"{v:.3g}" if v is not None else "" for v in values) + " | "
              + " | ".join(f"{r:.2f}" if r is not None else "" for r in ratios)
              + f" | {f'{floor:.3g}' if floor else ''} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
                                         "file_bytes": file_bytes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
