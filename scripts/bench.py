"""Speed and memory of sd next to diffusers, in one process, on the same full-size checkpoint.

    python scripts/bench.py                                   # SD 1.5, CPU, fp32, 256x256, 4 steps
    python scripts/bench.py --model sdxl --device cuda --dtype float16 --size 1024 --steps 20 --compile

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
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import sd
from sd.clip import CLIP_BIG_G, CLIP_L, CLIPTextModel
from sd.tokenizer import ASSETS, bpe_model
from sd.unet import SD15, SDXL, UNet
from sd.vae import VAE_SD15, VAE_SDXL, AutoencoderKL
from sd.weights import hf_to_openclip, no_weight_init

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
    p.add_argument("--one-at-a-time", action="store_true",
                   help="load and time one library, free it, then the other (when both do not fit in memory)")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: measure this library's load peak, print it
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("SD_BENCH_CACHE",
                                                                      Path.home() / ".cache" / "sd-bench")))
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args()


# ---------------------------------------------------------------- the checkpoint and diffusers' configs

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


def write_checkpoint(model: str, path: Path, dtype: torch.dtype):
    """Full-size random weights in the official single-file layout, in `dtype`. The modules
    are built in that dtype and init_weights sets every weight, so torch's own initialisation
    is skipped: SDXL in float16 takes 7 GB to build, not a 10 GB float32 UNet first."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with no_weight_init():
            state = random_state(model)
    finally:
        torch.set_default_dtype(torch.float32)
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path) + ".part")
    os.replace(str(path) + ".part", path)


def random_state(model: str) -> dict[str, torch.Tensor]:
    def weights(prefix, module):
        return {prefix + k: v.contiguous() for k, v in init_weights(module).state_dict().items()}
    if model == "sd15":
        return {**weights("model.diffusion_model.", UNet(SD15)),
                **weights("first_stage_model.", AutoencoderKL(VAE_SD15)),
                **weights("cond_stage_model.transformer.text_model.", CLIPTextModel(CLIP_L)),
                "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    big_g = hf_to_openclip(init_weights(CLIPTextModel(CLIP_BIG_G)).state_dict())
    return {**weights("model.diffusion_model.", UNet(SDXL)),
            **weights("first_stage_model.", AutoencoderKL(VAE_SDXL)),
            **weights("conditioner.embedders.0.transformer.text_model.", CLIPTextModel(CLIP_L)),
            **{"conditioner.embedders.1.model." + k: v for k, v in big_g.items()}}


def clip_config(cfg, with_projection: bool) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "hidden_size": cfg.width, "intermediate_size": cfg.mlp_width,
            "num_attention_heads": cfg.heads, "num_hidden_layers": cfg.layers, "max_position_embeddings": 77,
            "hidden_act": cfg.act, "vocab_size": cfg.vocab_size, "projection_dim": cfg.projection_dim or 768,
            "layer_norm_eps": cfg.eps, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}


def write_diffusers_configs(model: str, folder: Path):
    """The component configs diffusers' from_single_file needs (it would fetch them from the Hub)."""
    euler = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
             "timestep_spacing": "leading", "prediction_type": "epsilon"}
    if model == "sd15":
        unet = {"_class_name": "UNet2DConditionModel", "attention_head_dim": 8, "cross_attention_dim": 768,
                "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "sample_size": 64,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
        index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
                 "feature_extractor": [None, None], "requires_safety_checker": False}
        encoders = {"text_encoder": clip_config(CLIP_L, False)}
        vae_scale = VAE_SD15.scaling_factor
    else:
        unet = {"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20],
                "cross_attention_dim": 2048, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816, "sample_size": 128}
        index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                 "force_zeros_for_empty_prompt": True}
        encoders = {"text_encoder": clip_config(CLIP_L, False), "text_encoder_2": clip_config(CLIP_BIG_G, True)}
        vae_scale = VAE_SDXL.scaling_factor
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "latent_channels": 4, "scaling_factor": vae_scale, "force_upcast": model == "sdxl",
           "sample_size": 1024 if model == "sdxl" else 512}  # also the side of diffusers' VAE tiles
    files = {"model_index.json": {**index, "unet": ["diffusers", "UNet2DConditionModel"],
                                  "vae": ["diffusers", "AutoencoderKL"],
                                  "scheduler": ["diffusers", "EulerDiscreteScheduler"]},
             "unet/config.json": unet, "vae/config.json": vae, "scheduler/scheduler_config.json": euler}
    files.update({f"{name}/config.json": cfg for name, cfg in encoders.items()})
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(content))
    for i, name in enumerate(["tokenizer"] + (["tokenizer_2"] if model == "sdxl" else [])):
        (folder / name).mkdir(exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(ASSETS / f, folder / name / f)
        pad = "<|endoftext|>" if i == 0 else "!"
        (folder / name / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": pad, "tokenizer_class": "CLIPTokenizer"}))


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
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
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


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, calls: int = 10) -> float:
    """The device's measured matrix-multiply rate, floating-point operations per second."""
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
        return self.pipe.vae.decode(z, tile=self.pipe.vae_tile(*(side * self.pipe.vae.scale for side in z.shape[-2:])))

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
            pooled, sizes = inputs["y"][:, :1280], inputs["time_ids"]
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes}}
        return self.pipe.unet(x, t, encoder_hidden_states=inputs["context"], **extra).sample

    def decode(self, z, tiled=False):
        vae = self.pipe.vae
        vae.enable_tiling() if tiled else vae.disable_tiling()
        return vae.decode(z).sample

    def generate(self, size, steps):
        return self.pipe(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(0)).images[0]


def unet_inputs(model: str, size: int, device, dtype) -> tuple:
    """Batch-2 (CFG) UNet inputs: latents, timestep, text (and for SDXL, pooled text + size ids)."""
    g = torch.Generator("cpu").manual_seed(0)
    h = size // 8
    x = torch.randn(2, 4, h, h, generator=g).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    width = 2048 if model == "sdxl" else 768
    inputs = {"context": torch.randn(2, 77, width, generator=g).to(device, dtype)}
    if model == "sdxl":
        pooled = torch.randn(2, 1280, generator=g).to(device, dtype)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)
        from sd.unet import timestep_embedding
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1).to(dtype)], dim=-1)
        inputs.update(y=y, time_ids=time_ids)
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
        dtype = DTYPES[args.dtype]
        x, t, inputs = unet_inputs(args.model, args.size, device, dtype)
        z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(1))
        z = z.to(device, dtype)
        work = {"text encoding (s)": lambda lib: lib.text(),
                "UNet step, batch 2 (s)": lambda lib: lib.unet(x, t, inputs),
                "VAE decode (s)": lambda lib: lib.decode(z),
                f"generate {args.size}x{args.size}, {args.steps} steps (s)": lambda lib: lib.generate(args.size,
                                                                                                     args.steps)}
        flops, rate = unet_flops(libs[0], x, t, inputs), matmul_rate(device, dtype)
        rows["floor"] = {"UNet step, batch 2 (s)": flops / rate}
        print(f"UNet step: {flops / 1e9:.0f} GFLOP; matmul rate {rate / 1e9:.0f} GFLOP/s; "
              f"floor {flops / rate:.3f} s", flush=True)
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
        if device.type == "cuda":
            for lib in libs:
                # Its own weights plus the rise during generate: the other library's weights, on the
                # same device, count for neither.
                weights = sum(p.numel() * p.element_size() for m in lib.modules(lib.pipe) for p in m.parameters()
                              if p.device.type == "cuda") / 1e9
                rows[lib.name]["peak device memory, generate (GB)"] = weights + peak_memory(
                    lambda: lib.generate(args.size, args.steps), device)[1]
        if args.tiled:
            z = torch.randn(1, 4, args.tiled // 8, args.tiled // 8, generator=torch.Generator().manual_seed(2))
            z = z.to(device, dtype)
            for tiled in (True, False):
                how = "tiled" if tiled else "whole"
                for lib in (lib for lib in libs if not getattr(lib, "compiled", False)):
                    print(f"VAE decode {args.tiled}x{args.tiled} {how}, {lib.name}", flush=True)
                    seconds, peak = peak_memory(lambda: lib.decode(z, tiled), device)
                    rows[lib.name][f"VAE decode {args.tiled}x{args.tiled} {how}, one run (s)"] = seconds
                    rows[lib.name][f"VAE decode {args.tiled}x{args.tiled} {how}, peak memory (GB)"] = peak
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
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss()
        rss_peak_reset()
    seconds = Timer(device)(fn)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss("VmHWM")
    return seconds, (peak - before) / 1e9


def main():
    args = parse_args()
    device = torch.device(args.device)
    args.size = args.size or (256 if device.type == "cpu" else 1024 if args.model == "sdxl" else 512)
    args.steps = args.steps or (4 if device.type == "cpu" else 20)
    file_dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[args.file_dtype]
    path = args.cache / f"{args.model}-random-{file_dtype}.safetensors"
    config_dir = args.cache / f"{args.model}-diffusers-config"
    if not path.is_file():
        print(f"writing {path} (full-size random weights, once)", flush=True)
        write_checkpoint(args.model, path, DTYPES[args.file_dtype])
    write_diffusers_configs(args.model, config_dir)
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
        ratios = [rows[n][key] / rows["diffusers"][key] if key in rows[n] else None
                  for n in names if n != "diffusers"]
        floor = rows["floor"].get(key)
        print(f"| {key} | " + " | ".join(f"{v:.3g}" if v is not None else "" for v in values) + " | "
              + " | ".join(f"{r:.2f}" if r is not None else "" for r in ratios)
              + f" | {f'{floor:.3g}' if floor else ''} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
                                         "file_bytes": file_bytes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
