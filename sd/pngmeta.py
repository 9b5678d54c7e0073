"""The settings of a generated image, stored in its PNG so that it can be made again."""

import json


def png_metadata(settings: dict, model: str):
    """Settings as a JSON text chunk ("sd") and in the one-line "parameters" form other tools read
    (A1111's), for `image.save(..., pnginfo=...)`."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("sd", json.dumps({**settings, "model": model}))
    line = (f"{settings['prompt']}\nNegative prompt: {settings['negative_prompt'] or ''}\n"
            f"Steps: {settings['num_steps']}, Sampler: {settings['sampler']}, Schedule type: {settings['schedule']}, "
            f"CFG scale: {settings['guidance']}, "
            f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, Model: {model}")
    if "strength" in settings:
        line += f", Denoising strength: {settings['strength']}"
    info.add_text("parameters", line)
    return info
