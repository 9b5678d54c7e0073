"""Command line: `sd generate`, `sd convert`, `sd models`, `sd download`, `sd serve`."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import lone_surrogate
from .images import read_image
from .lora import parse_lora_flag
from .pngmeta import png_metadata
from .samplers import sampler_names
from .schedule import SCHEDULES
from .tiny import CHECKPOINT


def registry(args):
    from .registry import Registry, default_weights_dir, parse_overrides
    return Registry(Path(args.weights_dir) if args.weights_dir else default_weights_dir(),
                    parse_overrides(getattr(args, "model_overrides", None) or []))


class ProgressBar:
    """One line on stderr, redrawn in place: `step 7/20 [#######.............] 1.9 it/s`.
    A sampler callback: called with each finished step."""

    def __init__(self, stream=None, width: int = 30):
        self.stream, self.width, self.start = stream or sys.stderr, width, time.perf_counter()

    def __call__(self, step):
        done, total = step.i + 1, step.n
        filled = self.width * done // total
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\rstep {done}/{total} [{'#' * filled}{'.' * (self.width - filled)}] {rate:.1f} it/s")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def default_model(reg) -> str:
    """SD 1.5 when its weights are here, else any registry model that is, else the tiny model
    shipped in the package, so a fresh install makes a picture offline."""
    from .registry import DEFAULT_MODEL, REGISTRY
    for model_id in (DEFAULT_MODEL, *REGISTRY):
        if not reg.missing(model_id):
            return model_id
    print(f"no model weights in {reg.weights_dir}: using the tiny model shipped with sd, which draws one "
          "coloured shape (circle, square, triangle) on a plain background at 64x64, e.g. "
          '"a small red circle on the left, blue background". For Stable Diffusion 1.5: '
          f"sd download {DEFAULT_MODEL}", file=sys.stderr)
    return str(CHECKPOINT)


# generate()'s argument -> the flag that sets it, so errors name what the user typed.
FLAGS = {"prompt": "PROMPT", "negative_prompt": "--negative-prompt", "width": "--width", "height": "--height",
         "num_steps": "--steps", "guidance": "--guidance", "seed": "--seed", "sampler": "--sampler",
         "schedule": "--schedule", "sampler_options": "--sampler-option", "strength": "--strength",
         "keep_unmasked": "--keep-unmasked", "clip_skip": "--clip-skip", "num_images": "--num-images",
         "image": "--image", "mask": "--mask", "dtype": "--dtype", "lightning_steps": "--lightning-steps",
         "step_cache": "--step-cache", "step_cache depth": "--step-cache"}
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# Past this many times the model's native area, steps get slow and pictures repeat themselves.
LARGE_AREA = 4


class CLIError(Exception):
    """A one-line error about the command line; the message names the flag."""


def flagged(message: str) -> str:
    """`num_steps: must be ...` -> `--steps: must be ...`."""
    name, sep, rest = message.partition(":")
    return f"{FLAGS[name]}:{rest}" if sep and name in FLAGS else message


def output_paths(output: str, count: int) -> list[Path]:
    """Where the pictures go, checked before any slow work: a file name with a picture extension,
    not a directory or a device, in a folder that can be written. Several images: out-1.png, ..."""
    out = Path(output)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise CLIError(f"-o: {output}: needs a picture file extension ({', '.join(OUTPUT_FORMATS)})")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(1, count + 1)]
    for path in paths:
        if path.exists() and not path.is_file():
            raise CLIError(f"-o: {path}: exists and is not a regular file")
    writable_folder(out.parent, f"-o: {output}")
    return paths


def writable_folder(folder: Path, what: str):
    """Make `folder` now (so a slow job doesn't fail at its very end) and check it can be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"{what}: cannot create {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{what}: {folder} is not writable")


def check_device(name: str | None) -> str | None:
    """--device parsed and present on this machine, before loading anything."""
    if name is None:
        return None
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: {name!r} is not a device (cpu, cuda, cuda:1, mps ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device: {name}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device: {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device: {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device: {name}: sd runs on cpu, cuda or mps")
    return name


def sampler_options(pairs: list[str] | None) -> dict:
    """["eta=0.5", "solver_type=heun"] -> {"eta": 0.5, "solver_type": "heun"}: numbers and
    true/false as such, anything else as text."""
    options = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--sampler-option: expected NAME=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options[key] = value
    return options


def generation_arguments(args) -> dict:
    """generate()'s keyword arguments from the flags, checked as far as they can be without the model."""
    from .defaults import Defaults
    from .request import check
    for name in ("prompt", "negative_prompt"):
        text = getattr(args, name)
        if text is not None and lone_surrogate(text) is not None:
            raise CLIError(f"{FLAGS[name]}: is not valid UTF-8 text (check the shell's encoding)")
    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_images=args.num_images,
                  width=args.width, height=args.height, num_steps=args.steps, guidance=args.guidance, seed=args.seed,
                  sampler=args.sampler, schedule=args.schedule, sampler_options=sampler_options(args.sampler_option),
                  strength=args.strength, keep_unmasked=args.keep_unmasked, clip_skip=args.clip_skip,
                  prompt_style="weighted" if args.weighted else None, step_cache=args.step_cache)
    # The same checks generate() makes, on a stand-in model, so a typo costs no model load.
    check(Defaults(), multiple=8, sdxl=False, has_image=args.image is not None, has_mask=args.mask is not None,
          **kwargs)
    return kwargs


def load_pipeline(args, model: str, loras: list):
    import sd
    from .registry import load_model
    started = time.perf_counter()
    print(f"loading {model}" + "".join(f" + LoRA {path} x{scale:g}" for path, scale in loras), file=sys.stderr)
    if model.startswith("@cf/"):
        if args.unet or args.lightning_steps:
            raise CLIError("--unet / --lightning-steps: a Workers AI id brings its own UNet and settings")
        pipe = load_model(model, registry(args), device=args.device, dtype=args.dtype)
        for path, scale in loras:
            pipe.load_lora(path, scale)
    else:
        pipe = sd.load(model, unet=args.unet, device=args.device, dtype=args.dtype,
                       lightning_steps=args.lightning_steps, loras=loras)
    print(f"loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return pipe


def cmd_generate(args) -> int:
    inputs = {name: path for name, path in (("image", args.image), ("mask", args.mask)) if path is not None}
    for name, path in inputs.items():  # before loading the model, which takes a while
        if not Path(path).is_file():
            raise CLIError(f"--{name}: no such file: {path}")
        read_image(path, name)
    kwargs = generation_arguments(args)
    loras = [parse_lora_flag(text) for text in args.lora or []]
    paths = output_paths(args.output, args.num_images or 1)
    check_device(args.device)
    model = args.model or default_model(registry(args))
    if model == "tiny":
        model = str(CHECKPOINT)
    pipe = load_pipeline(args, model, loras)
    width, height = args.width or pipe.defaults.width, args.height or pipe.defaults.height
    if width * height > LARGE_AREA * pipe.sample_size ** 2:
        print(f"warning: {width}x{height} is {width * height / pipe.sample_size ** 2:.0f}x the model's native "
              f"{pipe.sample_size}x{pipe.sample_size} area: each step is that much slower, and pictures this far "
              "past the training size tend to repeat their subject", file=sys.stderr)
    print(f"generating {width}x{height}" + (f" from {args.image}" if args.image else ""), file=sys.stderr)
    result = pipe.generate(**kwargs, image=args.image, mask=args.mask, callback=ProgressBar())
    images = result if isinstance(result, list) else [result]
    for image, path in zip(images, paths):
        settings = image.info["sd"]
        if settings.get("prompt_tokens_dropped"):
            print(f"warning: the prompt's last {settings['prompt_tokens_dropped']} tokens were dropped (the text "
                  "encoder reads 75); --weighted keeps them, encoding long prompts in chunks of 75", file=sys.stderr)
        try:
            image.save(path, format=OUTPUT_FORMATS[path.suffix.lower()],
                       pnginfo=png_metadata({**settings, **inputs}, model))
        except OSError as e:
            raise CLIError(f"-o: {path}: cannot write it ({e.strerror or e})") from None
        print(f"wrote {path} (seed {settings['seed']})", file=sys.stderr)
    return 0


def convert_destination(source: Path, output: str, layout: str) -> Path:
    """Where `sd convert` writes, checked before loading: what sd.save takes (a .safetensors file, or
    a new or empty folder), not the source itself, in a folder made now and writable."""
    from .errors import InputError
    from .writer import checked_destination
    try:
        out = checked_destination(output, layout)
    except InputError as e:  # sd.save's `path` is OUT here
        raise CLIError("OUT" + str(e).removeprefix("path")) from None
    if out.resolve() == source.resolve():
        raise CLIError(f"OUT: {output} is the SOURCE itself")
    writable_folder(out if layout == "diffusers" else out.parent, f"OUT: {output}")
    return out


def cmd_convert(args) -> int:
    """A checkpoint written in the other layout (or the same one, in another dtype), LoRAs merged
    in: what `sd.load(SOURCE, dtype=..., loras=...)` holds, written by `sd.save`."""
    import sd
    from .writer import checked_dtype
    source = Path(CHECKPOINT if args.source == "tiny" else args.source)
    if not source.exists():
        raise CLIError(f"SOURCE: {args.source}: no such file or folder")
    if source.is_dir() and not (source / "model_index.json").is_file():
        raise CLIError(f"SOURCE: {args.source}: a folder must be in the diffusers layout (no model_index.json)")
    checked_dtype(args.dtype)
    loras = [parse_lora_flag(text) for text in args.lora or []]
    layout = "diffusers" if args.to_folder else "single-file"
    out = convert_destination(source, args.output, layout)
    started = time.perf_counter()
    print(f"loading {source} in {args.dtype}" + "".join(f" + LoRA {path} x{scale:g}" for path, scale in loras),
          file=sys.stderr)
    # Loaded in the dtype written, so that a LoRA is merged exactly as sd.load(..., loras=...) merges it.
    pipe = sd.load(source, device="cpu", dtype=args.dtype, loras=loras)
    print(f"writing {out} ({layout}, {args.dtype})", file=sys.stderr)
    sd.save(pipe, out, dtype=args.dtype, layout=layout)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    """The registry: what each model is, whether its weights are here, and how to get them."""
    reg = registry(args)
    for entry in reg.describe():
        state = "present" if entry["present"] else "missing"
        print(f"{entry['name']:48} {entry['mode']:10} {state:8} {entry['source']}")
        if not entry["present"]:
            print(f"{'':48} fetch with: sd download {entry['name']}")
    print(f"{'tiny':48} {'txt2img':10} {'shipped':8} {CHECKPOINT}")
    return 0


def cmd_download(args) -> int:
    from .registry import REGISTRY, download
    ids = list(REGISTRY) if args.all else args.ids
    if not ids:
        raise ValueError(f"ids: name at least one model (or --all): {', '.join(REGISTRY)}")
    from .download import DownloadError
    reg = registry(args)
    for model_id in ids:
        try:
            for path in download(model_id, reg):
                print(f"{model_id}: {path}", file=sys.stderr)
        except DownloadError as e:  # network and disk trouble: say what and how to resume, no traceback
            print(f"error: {model_id}: {e}", file=sys.stderr)
            return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd", description="Stable Diffusion in plain PyTorch. "
                                "`sd serve --help` for the Workers AI compatible server.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make an image from a prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png",
                   help="picture to write, .png (settings in its metadata), .jpg or .webp (default: out.png)")
    g.add_argument("--model", help="a .safetensors checkpoint, a diffusers folder, a Workers AI id (`sd models` "
                                   "lists them), or `tiny` (default: SD 1.5 when downloaded, else the first model "
                                   "downloaded, else the tiny shapes model shipped with sd)")
    g.add_argument("--unet", help="a UNet-only .safetensors file replacing the model's (e.g. SDXL-Lightning)")
    g.add_argument("--lightning-steps", type=int,
                   help="steps the --unet was distilled for, when its file name doesn't say (..._4step_...)")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="merge a LoRA (kohya-ss or diffusers/PEFT .safetensors) at SCALE (default 1); repeatable")
    g.add_argument("--negative-prompt")
    g.add_argument("--image", help="start from this picture (img2img; with --mask, inpainting)")
    g.add_argument("--mask", help="inpainting mask for --image: white = repaint, black = keep")
    g.add_argument("--strength", type=float,
                   help="how far to move from --image, in [0, 1]: int(steps * strength) steps run from the image "
                        "noised to that level, so 1 is almost pure generation and small values stay close to "
                        "the image (default 0.8 for img2img, 1 for inpainting)")
    g.add_argument("--keep-unmasked", action="store_true", default=None,
                   help="with --mask: paste the input's exact pixels back outside the mask "
                        "(always on for the Workers AI inpainting model)")
    g.add_argument("--width", type=int, help="default: --image's width rounded down to a multiple of 8, "
                                             "else the model's size")
    g.add_argument("--height", type=int, help="default: --image's height rounded down to a multiple of 8, "
                                              "else the model's size")
    g.add_argument("--steps", type=int, help="sampling steps (default: the model's; 50 for plain files)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale; > 1 enables it (default 7.5)")
    g.add_argument("--seed", type=int, help="random seed (default: random, recorded in the PNG)")
    g.add_argument("--num-images", type=int, metavar="N",
                   help="N images in one batch, seeds --seed, --seed+1, ...; written as OUT-1.png ... OUT-N.png")
    g.add_argument("--sampler", choices=sampler_names(),
                   help="default: the model's scheduler, else euler; lcm for LCM-distilled models (few steps)")
    g.add_argument("--schedule", choices=list(SCHEDULES),
                   help="how the steps' noise levels are spread (default: the model's, i.e. the sampler's own)")
    g.add_argument("--sampler-option", action="append", metavar="NAME=VALUE",
                   help="an option of the sampler, e.g. eta=0.5 or s_churn=10 (repeatable; see docs/SAMPLERS.md)")
    g.add_argument("--clip-skip", type=int, metavar="N",
                   help="read the text encoder's output N layers before its last, for the prompt (diffusers' "
                        "clip_skip; A1111's 'Clip skip 2' is 1)")
    g.add_argument("--weighted", action="store_true",
                   help="A1111's prompt syntax: (word) x1.1, [word] /1.1, (word:1.3), \\( for a bracket, BREAK; "
                        "prompts of any length, in chunks of 75 tokens")
    g.add_argument("--step-cache", type=int, metavar="N",
                   help="DeepCache: the whole UNet every N-th step, only its shallow layers in between (faster, "
                        "a slightly different picture; 2 to 5 are usual)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 elsewhere")
    c = sub.add_parser("convert", help="write a checkpoint as one .safetensors file or a diffusers folder, "
                                        "LoRAs merged in")
    c.add_argument("source", metavar="SOURCE", help="a .safetensors checkpoint, a diffusers folder, or `tiny`")
    c.add_argument("output", metavar="OUT", help="the .safetensors file to write (with --to-folder: a new folder)")
    c.add_argument("--to-folder", action="store_true",
                   help="write the diffusers layout, which sd and diffusers' from_pretrained read")
    c.add_argument("--dtype", default="float32", metavar="float32|float16|bfloat16",
                   help="of the written weights (default float32; float16 halves the file)")
    c.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="merge this LoRA into the weights at SCALE (default 1); repeatable")
    c.set_defaults(run=cmd_convert)
    for cmd in (g, m := sub.add_parser("models", help="list the Workers AI models and whether their weights "
                                                            "are here"),
                d := sub.add_parser("download", help="fetch a Workers AI model's official weights")):
        cmd.add_argument("--weights-dir", help="where registry weights live (default: $SD_WEIGHTS_DIR or ./weights)")
    m.add_argument("--model", dest="model_overrides", action="append", metavar="ID=SOURCE",
                   help="point a model id at a file or folder instead (repeatable)")
    d.add_argument("ids", nargs="*", metavar="ID", help="model ids, e.g. @cf/stabilityai/stable-diffusion-xl-base-1.0")
    d.add_argument("--all", action="store_true", help="every model in the registry")
    g.set_defaults(run=cmd_generate)
    m.set_defaults(run=cmd_models)
    d.set_defaults(run=cmd_download)
    sub.add_parser("serve", help="serve the Workers AI text-to-image API (options: sd serve --help)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the server parses its own options
        from .serve.cli import main as serve
        return serve(argv[1:])
    args = parser().parse_args(argv)
    from .registry import UnknownModel
    try:
        return args.run(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, UnknownModel) as e:  # bad input, missing weights: no traceback
        print(f"error: {flagged(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
