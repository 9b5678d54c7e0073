"""A grid of samplers x step counts for one prompt and seed: the picture to look at when
trying a sampler. On the tiny shapes model, `--score N` also reads N prompts' pictures back
(sd/shapes.py) and prints how often each sampler and step count drew what was asked.

    python scripts/sampler_grid.py                                   # the tiny model, docs/tiny/sampler_grid.png
    python scripts/sampler_grid.py --score 40                        # plus an accuracy table
    python scripts/sampler_grid.py --model weights/v1-5.safetensors --prompt "a fox" --scale 0.25
"""

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import sd
from sd import shapes
from sd.tiny import CHECKPOINT

KEYS = ("colour", "background", "position", "shape")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(CHECKPOINT), help="any source sd.load takes (default: the tiny model)")
    p.add_argument("--prompt", default="a large red triangle on the left, yellow background")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="default: the model's")
    p.add_argument("--samplers", nargs="+", default=list(sd.SAMPLERS), choices=sd.SAMPLERS)
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--scale", type=float, default=2.0, help="cell size relative to the picture (nearest-neighbour)")
    p.add_argument("--score", type=int, default=0, metavar="N",
                   help="also score each cell over N random shape prompts (tiny model only)")
    p.add_argument("-o", "--output", type=Path, default=Path("docs/tiny/sampler_grid.png"))
    return p.parse_args()


def score(pipe, sampler: str, steps: int, n: int, guidance) -> dict[str, float]:
    """Share of n random scenes whose picture reads back as the prompt said, per attribute."""
    rng = np.random.default_rng(1)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    hits = {key: 0 for key in KEYS}
    for seed, scene in enumerate(scenes):
        read = shapes.read_scene(pipe.generate(scene.caption(), seed=seed, sampler=sampler, num_steps=steps,
                                               guidance=guidance))
        for key in KEYS:
            hits[key] += read[key] == getattr(scene, key)
    return {key: hits[key] / n for key in KEYS}


def draw_grid(cells: dict[tuple[str, int], Image.Image], samplers, steps, title: str) -> Image.Image:
    w, h = next(iter(cells.values())).size
    left, top, gap = 110, 40, 4
    grid = Image.new("RGB", (left + len(steps) * (w + gap), top + len(samplers) * (h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill="black")
    for j, n in enumerate(steps):
        draw.text((left + j * (w + gap) + 4, top - 14), f"{n} step{'s' if n > 1 else ''}", fill="black")
    for i, name in enumerate(samplers):
        draw.text((4, top + i * (h + gap) + h // 2 - 6), name, fill="black")
        for j, n in enumerate(steps):
            grid.paste(cells[name, n], (left + j * (w + gap), top + i * (h + gap)))
    return grid


def main():
    args = parse_args()
    pipe = sd.load(args.model)
    cells, table = {}, []
    start = time.time()
    for name in args.samplers:
        for n in args.steps:
            image = pipe.generate(args.prompt, seed=args.seed, sampler=name, num_steps=n, guidance=args.guidance)
            size = (max(1, round(image.width * args.scale)), max(1, round(image.height * args.scale)))
            cells[name, n] = image.resize(size, Image.NEAREST)
            if args.score:
                acc = score(pipe, name, n, args.score, args.guidance)
                table.append((name, n, acc))
                print(f"{name:>16} {n:>3} steps: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()), flush=True)
    guidance = args.guidance if args.guidance is not None else pipe.defaults.guidance
    grid = draw_grid(cells, args.samplers, args.steps, f'"{args.prompt}", seed {args.seed}, guidance {guidance}')
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    print(f"wrote {args.output} in {time.time() - start:.0f} s")
    if table:
        print(f"\nRead back over {args.score} prompts (colour / background / position / shape):\n")
        print("| sampler | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in args.steps) + " |")
        print("|---|" + "---|" * len(args.steps))
        for name in args.samplers:
            row = [" / ".join(f"{acc[k]:.0%}" for k in KEYS) for s, _, acc in table if s == name]
            print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
