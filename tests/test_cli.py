"""`sd generate` end to end on a tiny single-file checkpoint made from our own modules."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd.cli import main
from sd.clip import CLIPConfig, CLIPTextModel
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    parts = {
        "model.diffusion_model.": UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1),
                                                  heads=(8, 8), context_dim=64)),
        "first_stage_model.": AutoencoderKL(VAEConfig(channels=32, channel_mult=(1, 2))),
        "cond_stage_model.transformer.text_model.": CLIPTextModel(CLIPConfig(width=64, layers=2, heads=1, mlp_width=37)),
    }
    state = {prefix + k: v.contiguous() for prefix, m in parts.items() for k, v in m.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(state, str(path))
    return path


def test_generate_writes_png_with_settings(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    rc = main(["generate", "a red circle", "-o", str(out), "--model", str(tiny_checkpoint), "--width", "64",
               "--height", "48", "--steps", "3", "--seed", "7", "--sampler", "dpmpp_2m", "--negative-prompt", "blue"])
    assert rc == 0
    image = Image.open(out)
    assert image.size == (64, 48)
    settings = json.loads(image.text["sd"])
    assert settings == {"prompt": "a red circle", "negative_prompt": "blue", "width": 64, "height": 48,
                        "num_steps": 3, "guidance": 7.5, "seed": 7, "sampler": "dpmpp_2m",
                        "model": str(tiny_checkpoint)}
    assert "Seed: 7" in image.text["parameters"]
    err = capsys.readouterr().err
    assert "step 3/3" in err and "wrote" in err  # the progress bar reached the end


def test_missing_weights_say_what_to_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SD_WEIGHTS_DIR", str(tmp_path / "w"))
    assert main(["generate", "a cat", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "v1-5-pruned-emaonly.safetensors" in err and str(tmp_path / "w") in err and "huggingface.co" in err


def test_bad_size_is_a_clear_error_not_a_traceback(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tiny_checkpoint), "--width", "50", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "width: must be a positive multiple of 8, got 50" in err and "Traceback" not in err


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "sd", "generate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--negative-prompt" in done.stdout and "--sampler" in done.stdout
