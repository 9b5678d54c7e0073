"""Command line: `sd generate`, `sd models`, `sd download`, `sd serve`."""

import argparse
import sys
import time
from pathlib import Path

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


def cmd_generate(args) -> int:
    import sd
    inputs = {name: path for name, path in (("image", args.image), ("mask", args.mask)) if path is not None}
    for name, path in inputs.items():  # before loading the model, which takes a while
        if not Path(path).exists():
            raise ValueError(f"{name}: no such file: {path}")
    from .registry import load_model
    model = args.model or default_model(registry(args))
    if model == "tiny":
        model = str(CHECKPOINT)
    if model.startswith("@cf/"):
        if args.unet or args.lightning_steps:
            raise ValueError("--unet / --lightning-steps: a Workers AI id brings its own UNet and settings")
        print(f"loading {model}", file=sys.stderr)
        pipe = load_model(model, registry(args), device=args.device, dtype=args.dtype)
    else:
        print(f"loading {model}", file=sys.stderr)
        pipe = sd.load(model, unet=args.unet, device=args.device, dtype=args.dtype,
                       lightning_steps=args.lightning_steps)
    image = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                          num_steps=args.steps, guidance=args.guidance, seed=args.seed, sampler=args.sampler,
                          schedule=args.schedule, image=args.image, mask=args.mask, strength=args.strength,
                          keep_unmasked=args.keep_unmasked, clip_skip=args.clip_skip,
                          prompt_style="weighted" if args.weighted else None, callback=ProgressBar())
    settings = image.info["sd"]
    if settings.get("prompt_tokens_dropped"):
        print(f"warning: the prompt's last {settings['prompt_tokens_dropped']} tokens were dropped (the text encoder "
              "reads 75); --weighted keeps them, encoding long prompts in chunks of 75", file=sys.stderr)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, pnginfo=png_metadata({**settings, **inputs}, model))
    print(f"wrote {out} (seed {settings['seed']})", file=sys.stderr)
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
    g.add_argument("-o", "--output", default="out.png", help="PNG to write (default: out.png)")
    g.add_argument("--model", help="a .safetensors checkpoint, a diffusers folder, a Workers AI id (`sd models` "
                                   "lists them), or `tiny` (default: SD 1.5 when downloaded, else the first model "
                                   "downloaded, else the tiny shapes model shipped with sd)")
    g.add_argument("--unet", help="a UNet-only .safetensors file replacing the model's (e.g. SDXL-Lightning)")
    g.add_argument("--lightning-steps", type=int,
                   help="steps the --unet was distilled for, when its file name doesn't say (..._4step_...)")
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
    g.add_argument("--sampler", choices=sampler_names(),
                   help="default: the model's scheduler, else euler; lcm for LCM-distilled models (few steps)")
    g.add_argument("--schedule", choices=list(SCHEDULES),
                   help="how the steps' noise levels are spread (default: the model's, i.e. the sampler's own)")
    g.add_argument("--clip-skip", type=int, metavar="N",
                   help="read the text encoder's output N layers before its last, for the prompt (diffusers' "
                        "clip_skip; A1111's 'Clip skip 2' is 1)")
    g.add_argument("--weighted", action="store_true",
                   help="A1111's prompt syntax: (word) x1.1, [word] /1.1, (word:1.3), \\( for a bracket, BREAK; "
                        "prompts of any length, in chunks of 75 tokens")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 elsewhere")
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
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input, missing weights: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
