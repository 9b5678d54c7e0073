"""`sd generate` end to end on a tiny single-file checkpoint made from our own modules."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sd
# The fixture lives in conftest; test_models.py still imports it from here, until it takes conftest's.
from sd.cli import main


@pytest.fixture
def picture(tmp_path):
    """A random 64x48 RGB PNG."""
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def mask(tmp_path):
    """64x48, white (repaint) in the middle, black (keep) around it."""
    path = tmp_path / "mask.png"
    array = np.zeros((48, 64), dtype=np.uint8)
    array[16:32, 16:48] = 255
    Image.fromarray(array).save(path)
    return path


def run(tiny_checkpoint, out, *args):
    return main(["generate", "a red circle", "-o", str(out), "--model", str(tiny_checkpoint), "--device", "cpu",
                 "--steps", "3", "--seed", "7", *map(str, args)])


def test_generate_writes_png_with_settings(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    rc = main(["generate", "a red circle", "-o", str(out), "--model", str(tiny_checkpoint), "--width", "64",
               "--height", "48", "--steps", "3", "--seed", "7", "--sampler", "dpmpp_2m", "--negative-prompt", "blue"])
    assert rc == 0
    image = Image.open(out)
    assert image.size == (64, 48)
    settings = json.loads(image.text["sd"])
    assert settings == {"prompt": "a red circle", "negative_prompt": "blue", "width": 64, "height": 48,
                        "num_steps": 3, "guidance": 7.5, "seed": 7, "sampler": "dpmpp_2m", "schedule": "default",
                        "model": str(tiny_checkpoint)}
    assert "Seed: 7" in image.text["parameters"]
    err = capsys.readouterr().err
    assert "step 3/3" in err and "wrote" in err  # the progress bar reached the end


def test_missing_weights_say_what_to_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SD_WEIGHTS_DIR", str(tmp_path / "w"))
    assert main(["generate", "a cat", "--model", "@cf/runwayml/stable-diffusion-v1-5-img2img",
                 "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "w" / "stable-diffusion-v1-5-img2img" / "v1-5-pruned-emaonly.safetensors") in err
    assert "sd download @cf/runwayml/stable-diffusion-v1-5-img2img" in err and "Traceback" not in err


def test_bad_size_is_a_clear_error_not_a_traceback(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "--width", "50",
                 "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "--width: must be a positive multiple of 8, got 50" in err and "Traceback" not in err


def test_img2img_takes_the_image_size_and_records_strength(tiny_checkpoint, picture, tmp_path):
    out = tmp_path / "out.png"
    assert run(tiny_checkpoint, out, "--image", picture, "--strength", "0.7") == 0
    image = Image.open(out)
    assert image.size == (64, 48)
    settings = json.loads(image.text["sd"])
    assert settings["strength"] == 0.7 and settings["image"] == str(picture) and "mask" not in settings
    assert (settings["width"], settings["height"]) == (64, 48)
    assert "Denoising strength: 0.7" in image.text["parameters"]


def test_img2img_output_is_the_python_apis(tiny_checkpoint, tmp_path):
    """The CLI adds nothing of its own: same pixels as sd.load(...).generate(...) with the same settings."""
    path = tmp_path / "odd.png"  # 61x45: rounded down to 56x40 by the pipeline, not the CLI
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out.png"
    assert run(tiny_checkpoint, out, "--image", path, "--strength", "0.5", "--sampler", "euler_a",
               "--negative-prompt", "blue") == 0
    expected = sd.load(str(tiny_checkpoint), device="cpu").generate(
        "a red circle", negative_prompt="blue", num_steps=3, seed=7, sampler="euler_a", image=path, strength=0.5)
    got = Image.open(out)
    assert got.size == expected.size == (56, 40)
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))


def test_inpainting_keeps_unmasked_pixels_exactly(tiny_checkpoint, picture, mask, tmp_path):
    out = tmp_path / "out.png"
    assert run(tiny_checkpoint, out, "--image", picture, "--mask", mask, "--keep-unmasked") == 0
    image = Image.open(out)
    settings = json.loads(image.text["sd"])
    assert settings["strength"] == 1.0 and settings["keep_unmasked"] is True
    assert settings["image"] == str(picture) and settings["mask"] == str(mask)
    got, before = np.asarray(image.convert("RGB")), np.asarray(Image.open(picture))
    keep = np.asarray(Image.open(mask)) == 0
    assert np.array_equal(got[keep], before[keep])
    assert not np.array_equal(got[~keep], before[~keep])  # and the masked part was repainted


def test_lcm_sampler(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.png"
    assert run(tiny_checkpoint, out, "--sampler", "lcm", "--width", "32", "--height", "32", "--steps", "2") == 0
    settings = json.loads(Image.open(out).text["sd"])
    assert settings["sampler"] == "lcm" and settings["num_steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["--mask", "{mask}"], "--mask: needs an image to inpaint"),
    (["--image", "{picture}", "--strength", "1.5"], "--strength: must be a number in [0, 1], got 1.5"),
    (["--strength", "0.5"], "--strength: only applies with an image"),
    (["--image", "{picture}", "--keep-unmasked"], "--keep-unmasked: only applies to inpainting"),
    (["--image", "{text}"], "--image: not a readable image (PNG, JPEG or WebP expected)"),
    (["--image", "{tmp}/nope.png"], "--image: no such file: {tmp}/nope.png"),
    (["--image", "{picture}", "--mask", "{tmp}/nope.png"], "--mask: no such file: {tmp}/nope.png"),
])
def test_bad_image_options_are_one_line_errors(tiny_checkpoint, picture, mask, tmp_path, capsys, args, message):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    paths = dict(picture=picture, mask=mask, text=text, tmp=tmp_path)
    out = tmp_path / "out.png"
    assert run(tiny_checkpoint, out, *(a.format(**paths) for a in args)) == 2
    err = capsys.readouterr().err
    assert message.format(**paths) in err and "Traceback" not in err
    assert not out.exists()


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "sd", "generate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--negative-prompt" in done.stdout and "--sampler" in done.stdout
    text = " ".join(done.stdout.split())  # undo argparse's line wrapping
    for option in ("--image", "--mask", "--strength", "--keep-unmasked", "lcm", "int(steps * strength) steps"):
        assert option in text


# ---------------------------------------------------------------- one-line errors, before any slow work
# (issue 16, items 8 and 10-13: each failed, or came after a full load, before.)


def loads(err: str) -> bool:
    return "loading" in err


@pytest.mark.parametrize("device, message", [
    ("foo", "--device: 'foo' is not a device"),
    pytest.param("cuda", "--device: cuda: CUDA is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_bad_device_is_one_line_before_loading(tiny_checkpoint, tmp_path, capsys, device, message):
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "--device", device,
                 "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not loads(err)


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_checkpoint, tmp_path):
    """A byte that is not UTF-8 (`$'a red \\xff circle'` in bash) reaches Python as a lone surrogate."""
    done = subprocess.run([sys.executable.encode(), b"-m", b"sd", b"generate", b"a red \xff circle",
                           b"--model", str(tiny_checkpoint).encode(), b"-o", str(tmp_path / "o.png").encode()],
                          capture_output=True)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2 and "PROMPT: is not valid UTF-8 text" in err and "Traceback" not in err


@pytest.mark.parametrize("output, message", [
    ("{tmp}", "-o: {tmp}: needs a picture file extension"),
    ("{tmp}/noextension", "-o: {tmp}/noextension: needs a picture file extension"),
    ("{tmp}/adir.png", "-o: {tmp}/adir.png: exists and is not a regular file"),
    ("/dev/full.png", "-o: /dev/full.png: /dev is not writable"),
])
def test_the_output_path_is_checked_before_loading(tiny_checkpoint, tmp_path, capsys, output, message):
    (tmp_path / "adir.png").mkdir()
    if output.startswith("/dev/") and os.access("/dev", os.W_OK):
        pytest.skip("/dev is writable here (running as root)")
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "-o", output.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err and not loads(err)


def test_a_device_file_is_not_an_output(tiny_checkpoint, tmp_path, capsys):
    """`-o /dev/full`: not a picture file name; a device with an extension is no regular file either."""
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "-o", "/dev/full"]) == 2
    assert "-o: /dev/full: needs a picture file extension" in capsys.readouterr().err
    device = tmp_path / "null.png"
    os.symlink("/dev/null", device)
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "-o", str(device)]) == 2
    assert f"-o: {device}: exists and is not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "1e30"], "--guidance: must be a number in [0, 100], got 1e+30"),
    (["--guidance", "-50"], "--guidance: must be a number in [0, 100], got -50.0"),
    (["--steps", "0"], "--steps: must be a whole number of at least 1, got 0"),
    (["--seed", "-1"], "--seed: must be a whole number in [0, 18446744073709551615], got -1"),
    (["--clip-skip", "-2"], "--clip-skip: must be a whole number of at least 0, got -2"),
    (["--sampler", "euler", "--sampler-option", "eta=1"], "--sampler-option: euler takes no option 'eta'"),
    (["--sampler-option", "eta"], "--sampler-option: expected NAME=VALUE, got 'eta'"),
    (["--num-images", "0"], "--num-images: must be a whole number of at least 1, got 0"),
])
def test_flag_errors_name_the_flag_before_loading(tiny_checkpoint, tmp_path, capsys, flags, message):
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "-o", str(tmp_path / "o.png"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not loads(err)


def test_large_sizes_warn_and_show_progress_from_the_start(tmp_path, capsys):
    """The shipped tiny model's native side is 64: 256x256 is 16x its area. The user hears about it,
    and about loading and generating, before the first step."""
    assert main(["generate", "a red circle", "--model", "tiny", "-o", str(tmp_path / "o.png"), "--width", "256",
                 "--height", "256", "--steps", "1"]) == 0
    err = capsys.readouterr().err
    order = [err.index(s) for s in ("loading", "loaded in", "warning: 256x256 is 16x the model's native",
                                    "generating 256x256", "step 1/1")]
    assert order == sorted(order), err


def test_num_images_writes_one_file_each(tiny_checkpoint, tmp_path):
    out = tmp_path / "batch.png"
    assert run(tiny_checkpoint, out, "--num-images", "3", "--width", "64", "--height", "64") == 0
    seeds = [json.loads(Image.open(tmp_path / f"batch-{k}.png").text["sd"])["seed"] for k in (1, 2, 3)]
    assert seeds == [7, 8, 9] and not out.exists()


def test_sampler_options_reach_the_sampler(tiny_checkpoint, tmp_path):
    out = tmp_path / "o.png"
    assert run(tiny_checkpoint, out, "--sampler", "euler_a", "--sampler-option", "eta=0.5", "--width", "64",
               "--height", "64") == 0
    assert json.loads(Image.open(out).text["sd"])["sampler_options"] == {"eta": 0.5}


def test_lora_flag_merges_and_names_its_errors(tmp_path, capsys):
    """--lora FILE[:SCALE] gives the picture sd.load(..., loras=...) gives; a missing file is one line."""
    gen = torch.Generator().manual_seed(0)
    layer = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # kohya, single-file names
    lora = tmp_path / "style.safetensors"
    save_file({f"{layer}.lora_down.weight": torch.randn(4, 64, generator=gen),
               f"{layer}.lora_up.weight": torch.randn(64, 4, generator=gen), f"{layer}.alpha": torch.tensor(4.0)},
              str(lora))
    out = tmp_path / "o.png"
    assert main(["generate", "a red circle", "--model", "tiny", "-o", str(out), "--seed", "3", "--steps", "4",
                 "--lora", f"{lora}:0.8"]) == 0
    expected = sd.load(sd.tiny.CHECKPOINT, loras=[(lora, 0.8)]).generate("a red circle", seed=3, num_steps=4)
    plain = sd.load(sd.tiny.CHECKPOINT).generate("a red circle", seed=3, num_steps=4)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(plain)), "the LoRA changed nothing"
    assert main(["generate", "a cat", "--model", "tiny", "-o", str(out), "--lora", str(tmp_path / "no.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--lora: " in err and "no such LoRA file" in err and "Traceback" not in err
