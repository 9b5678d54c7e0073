"""Grids of samplers x step counts and samplers x schedules for one prompt and seed: the pictures
to look at when trying a sampler. On the tiny shapes model, `--score N` also reads N prompts'
pictures back (sd/shapes.py) and prints how often each cell drew what was asked, as markdown tables.

    python scripts/sampler_grid.py                  # the tiny model: docs/tiny/sampler_grid.png, ..._schedules.png
    python scripts/sampler_grid.py --score 16       # plus the accuracy tables (README, "The tiny model")
    python scripts/sampler_grid.py --model weights/v1-5.safetensors --prompt "a fox" --scale 0.25
    python scripts/sampler_grid.py --step-caches 2 3 5 --score 16   # step caching: ..._step_cache.png, its table
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
MAIN_SCHEDULES = ["default", "karras", "exponential", "beta", "sgm_uniform", "align_your_steps"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(CHECKPOINT), help="any source sd.load takes (default: the tiny model)")
    p.add_argument("--prompt", default="a large red triangle on the left, yellow background")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="default: the model's")
    p.add_argument("--samplers", nargs="+", default=list(sd.SAMPLERS), choices=sd.SAMPLERS)
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--schedules", nargs="+", default=MAIN_SCHEDULES, choices=sd.SCHEDULES)
    p.add_argument("--schedule-steps", type=int, default=8, help="the step count of the schedules grid")
    p.add_argument("--scale", type=float, default=1.0, help="cell size relative to the picture (nearest-neighbour)")
    p.add_argument("--score", type=int, default=0, metavar="N",
                   help="also score each cell over N random shape prompts (tiny model only)")
    p.add_argument("--step-caches", nargs="+", type=int, metavar="N",
                   help="instead: samplers x these DeepCache intervals (and off) at --cache-steps, with the read-back "
                        "accuracy and the pixel difference to the uncached picture (generate's step_cache)")
    p.add_argument("--cache-steps", type=int, default=20, help="the step count of the step-cache grid")
    p.add_argument("-o", "--output", type=Path, default=Path("docs/tiny/sampler_grid.png"),
                   help="the steps grid; the schedules grid goes beside it, named ..._schedules.png")
    return p.parse_args()


def score(pipe, n: int, pictures: list | None = None, **settings) -> dict[str, float]:
    """Share of n random scenes whose picture reads back as the prompt said, per attribute; the
    pictures are appended to `pictures` when given."""
    rng = np.random.default_rng(1)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    hits = {key: 0 for key in KEYS}
    for seed, scene in enumerate(scenes):
        picture = pipe.generate(scene.caption(), seed=seed, **settings)
        if pictures is not None:
            pictures.append(np.asarray(picture, dtype=np.float64))
        read = shapes.read_scene(picture)
        for key in KEYS:
            hits[key] += read[key] == getattr(scene, key)
    return {key: hits[key] / n for key in KEYS}


def cache_table(pipe, args, guidance):
    """Step caching's price: per sampler and interval, the read-back accuracy over --score prompts
    and the mean / largest pixel difference (of 255) from the same prompts and seeds uncached."""
    print(f"\nstep cache (DeepCache, depth 2) at {args.cache_steps} steps, read back over {args.score} prompts "
          "(colour / background / position / shape), and |cached - uncached| mean / max:\n")
    print("| sampler | off | " + " | ".join(f"N = {n}" for n in args.step_caches) + " |")
    print("|---|---|" + "---|" * len(args.step_caches))
    for name in args.samplers:
        settings = dict(sampler=name, guidance=guidance, num_steps=args.cache_steps)
        plain = []
        cells = [" / ".join(f"{v:.0%}" for v in score(pipe, args.score, plain, **settings).values())]
        for n in args.step_caches:
            cached = []
            acc = score(pipe, args.score, cached, step_cache=n, **settings)
            diff = np.abs(np.stack(cached) - np.stack(plain))
            cells.append(" / ".join(f"{v:.0%}" for v in acc.values()) + f"; {diff.mean():.1f} / {diff.max():.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def draw_grid(cells: dict[tuple[str, str], Image.Image], rows, columns, title: str) -> Image.Image:
    w, h = next(iter(cells.values())).size
    left, top, gap = 120, 40, 4
    width = max(left + len(columns) * (w + gap), 8 * len(title))
    grid = Image.new("RGB", (width, top + len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill="black")
    for j, column in enumerate(columns):
        draw.text((left + j * (w + gap) + 2, top - 14), column, fill="black")
    for i, row in enumerate(rows):
        draw.text((4, top + i * (h + gap) + h // 2 - 6), row, fill="black")
        for j, column in enumerate(columns):
            grid.paste(cells[row, column], (left + j * (w + gap), top + i * (h + gap)))
    return grid


def run_grid(pipe, args, columns: dict[str, dict], title: str, output: Path) -> None:
    """One grid (samplers x columns, each column a dict of generate() settings) and its table."""
    cells, table = {}, {}
    start = time.time()
    for name in args.samplers:
        for column, settings in columns.items():
            image = pipe.generate(args.prompt, seed=args.seed, sampler=name, guidance=args.guidance, **settings)
            size = (max(1, round(image.width * args.scale)), max(1, round(image.height * args.scale)))
            cells[name, column] = image.resize(size, Image.NEAREST)
            if args.score:
                table[name, column] = acc = score(pipe, args.score, sampler=name, guidance=args.guidance, **settings)
                print(f"{name:>18} {column:>16}: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()), flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(cells, args.samplers, list(columns), title).save(output)
    print(f"wrote {output} in {time.time() - start:.0f} s")
    if table:
        print(f"\n{title}; read back over {args.score} prompts (colour / background / position / shape):\n")
        print("| sampler | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name in args.samplers:
            print(f"| {name} | " + " | ".join(" / ".join(f"{table[name, c][k]:.0%}" for k in KEYS) for c in columns)
                  + " |")
        print()


def main():
    args = parse_args()
    pipe = sd.load(args.model)
    guidance = args.guidance if args.guidance is not None else pipe.defaults.guidance
    title = f'"{args.prompt}", seed {args.seed}, guidance {guidance}'
    if args.step_caches:
        columns = {"off": dict(num_steps=args.cache_steps)}
        columns.update({f"N = {n}": dict(num_steps=args.cache_steps, step_cache=n) for n in args.step_caches})
        score_n, args.score = args.score, 0  # the grid's own cells unscored: cache_table scores with diffs
        run_grid(pipe, args, columns, f"{title}, {args.cache_steps} steps, step cache",
                 args.output.with_name(args.output.stem + "_step_cache.png"))
        args.score = score_n
        if args.score:
            cache_table(pipe, args, guidance)
        return
    steps = {f"{n} step{'s' if n > 1 else ''}": dict(num_steps=n) for n in args.steps}
    run_grid(pipe, args, steps, title, args.output)
    schedules = {name: dict(num_steps=args.schedule_steps, schedule=name) for name in args.schedules}
    run_grid(pipe, args, schedules, f"{title}, {args.schedule_steps} steps",
             args.output.with_name(args.output.stem + "_schedules.png"))


if __name__ == "__main__":
    main()
