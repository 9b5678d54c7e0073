"""Which queued jobs may share one UNet batch, the one `Pipeline.generate` call that runs them, and
how many images a batch may hold on a device.

Jobs share a batch when they ask for the same model and the same `generate` arguments except the
per-image ones (prompt, negative_prompt, seed, num_images): the core then makes image k of the
batch as its seed makes it alone (tests/test_generate_api.py, tests/test_batching.py), so batching
never changes an answer. The exceptions, each of which would change one:
- a job with a negative prompt never shares with one without (SDXL conditions on zeros only when
  no image of the batch has one);
- weighted prompts (`prompt_style` other than "plain") pad every prompt of a batch to its longest
  one's count of 75-token windows, so they share only with jobs of the same counts;
- input pictures and masks share only when they are the same bytes (a PIL image never does);
- latent output never shares.
A job's own num_images N takes N places of the batch, seeds seed..seed+N-1; a job without a seed
draws its first one when the batch is planned, so its answer does not depend on its company.
"""

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..prompts import chunk, parse
from ..request import batch_of
from .jobs import GenerationJob

PER_IMAGE = ("prompt", "negative_prompt", "seed", "num_images")
CPU_MAX_BATCH = 4      # see batch_limit
GPU_MAX_BATCH = 16     # past this a GPU is busy enough at any size; larger only delays the first answer
MEMORY_HEADROOM = 0.7  # of the memory free after loading: the allocator's fragmentation, other tenants


@dataclass(frozen=True)
class Share:
    """A job's part of a batch: one prompt, negative prompt (None: none given) and seed per image."""
    key: tuple
    prompts: tuple[str, ...]
    negatives: tuple[str | None, ...]
    seeds: tuple[int, ...]

    @property
    def images(self) -> int:
        return len(self.seeds)


def share_of(job: GenerationJob, prompt_style: str, tokenizers=None) -> Share | None:
    """The job's part of a batch, or None when it must run alone: its per-image arguments are
    not what `generate` accepts (it then fails alone, with generate's own message), it asks
    for latents, an argument cannot be compared, or its prompts are weighted and `tokenizers`
    (the loaded model's) are not at hand to count their windows."""
    kwargs = job.kwargs
    if kwargs.get("output", "pil") != "pil":
        return None
    try:
        prompts, negatives, seeds, _ = batch_of(*(kwargs.get(name) for name in PER_IMAGE))
    except InputError:
        return None
    style = kwargs.get("prompt_style") or prompt_style
    if style == "plain":
        windows = ()
    elif tokenizers is None:
        return None
    else:  # prompts.encode pads to the batch's most windows, negative prompts included when used
        windows = (_windows(prompts, tokenizers), _windows([n for n in negatives if n is not None], tokenizers))
    shared = {name: value for name, value in kwargs.items() if name not in PER_IMAGE}
    key = (job.model, _frozen(shared), negatives[0] is None, windows)
    try:
        hash(key)
    except TypeError:  # a PIL image, or another value that has no equality by content
        return None
    return Share(key, tuple(prompts), tuple(negatives), tuple(seeds))


def _windows(texts: list[str], tokenizers) -> int:
    return max((len(chunk(parse(text), tok)) for text in texts for tok in tokenizers), default=0)


def _frozen(value):
    """A hashable stand-in, equal exactly when the values are (types included: 1 is not 1.0 here)."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return (type(value).__name__, value)


def batch_kwargs(shares: list[Share], kwargs: dict) -> dict:
    """The `generate` arguments of one batch: the shared ones (those of any job of it) and a list
    of prompts, negative prompts and seeds, job after job."""
    negatives = [n for share in shares for n in share.negatives]
    return {**{k: v for k, v in kwargs.items() if k not in PER_IMAGE},
            "prompt": [p for share in shares for p in share.prompts],
            "negative_prompt": None if negatives[0] is None else negatives,
            "seed": [s for share in shares for s in share.seeds]}


def rows(shares: list[Share]) -> list[slice]:
    """Each job's rows of the batch, in order."""
    ends = [sum(s.images for s in shares[:k + 1]) for k in range(len(shares))]
    return [slice(end - share.images, end) for share, end in zip(shares, ends)]


# ---------------------------------------------------------------- how many images a batch holds


def batch_limit(pipe) -> int:
    """Images per batch for a model just loaded: on a GPU, what the memory left after loading
    holds at the model's native size (measured); elsewhere CPU_MAX_BATCH. A CPU (or MPS) is busy
    with one image at any size that matters, so a batch of B takes about B times as long as one:
    batching saves only the per-call overheads (Python, small kernels, the text encoder), which a
    few images already share, and larger batches would only delay every answer in them."""
    if pipe.device.type != "cuda":
        return CPU_MAX_BATCH
    try:
        per_image = memory_per_image(pipe)
    except torch.cuda.OutOfMemoryError:  # not even two images fit at the native size
        return 1
    torch.cuda.empty_cache()  # what the measurement left cached counts as free
    free, _ = torch.cuda.mem_get_info(pipe.device)
    return limit_from_memory(free, per_image)


def limit_from_memory(free: int, per_image: int) -> int:
    return max(1, min(GPU_MAX_BATCH, int(MEMORY_HEADROOM * free / max(per_image, 1))))


def memory_per_image(pipe) -> int:
    """Device bytes one more image adds to a batch at the model's native size: the larger of the
    UNet's (a CFG pair of calls) and the VAE decoder's growth from one image to two, from the
    allocator's peaks (the one-image run first, so the two-image one finds the workspace made)."""
    cfg, scale, side = pipe.unet.cfg, pipe.vae.scale, pipe.sample_size // pipe.vae.scale
    device, dtype = pipe.device, pipe.dtype

    def unet(images: int):
        b = 2 * images
        x = torch.zeros(b, cfg.in_channels, side, side, device=device, dtype=dtype)
        context = torch.zeros(b, 77, cfg.context_dim, device=device, dtype=dtype)
        y = torch.zeros(b, cfg.adm_in_channels, device=device, dtype=dtype) if cfg.adm_in_channels else None
        w = torch.zeros(b, device=device) if cfg.time_cond_proj_dim else None
        pipe.unet(x, torch.full((b,), 500.0, device=device), context, y, w)

    def vae(images: int):
        pipe.vae.decode(torch.zeros(images, pipe.vae.cfg.latent_channels, side, side, device=device,
                                    dtype=pipe.vae_dtype), tile=pipe.vae_tile(side * scale, side * scale))

    def peak(run, images: int) -> int:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            run(images)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    return max(peak(run, 2) - peak(run, 1) for run in (unet, vae))
