"""scripts/gpu_check.py, rehearsed on the CPU so that a device's 15 minutes are not spent on a typo.

The default suite runs each part's code in this process on the smallest inputs: part 1 on one
case in float32 and bfloat16 (every case is built) and the float16 SDXL VAE check, a speed step
on bench's tiny SD 1.5 stand-in and its compile=True twin (dynamo's eager backend), the report
from those results, the time budget, and the kill of a step that overruns. The whole rehearsal,
every step in its own process as on the device, takes minutes on a 2-core CPU: it runs with
SD_SLOW_TESTS=1.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def cpu_args(tmp_path, *extra):
    return gpu_check.parse_args(["--device", "cpu", "--quick", "--cache", str(tmp_path / "cache"),
                                 "--out", str(tmp_path / "out"), *extra])


def run_in_process(fn, *a) -> dict:
    """A step's function as its child process runs it, with the results it saves collected."""
    result = {}
    fn(*a, lambda **values: result.update(values))
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Part 1 on one case and the VAE check, and two speed steps, as the device would run them."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    args = cpu_args(tmp, "--cases", "sd15,sdxl-vae-float16")
    args.cache.mkdir(parents=True)
    steps = {s.name: s for s in gpu_check.STEPS}
    return {"parity": run_in_process(gpu_check.parity, args),
            **{name: run_in_process(gpu_check.speed, steps[name], args)
               for name in ("sd15-float16", "sd15-float16-compile")}}


def test_parity_case_runs_in_float32_and_bfloat16(results):
    cases = results["parity"]["cases"]
    assert [(e["case"], e["dtype"]) for e in cases] == [("sd15", "float32"), ("sd15", "bfloat16")]
    for e in cases:
        assert "error" not in e, e.get("error")
        assert e["ok"], e
    # float32 on one device is the suite's parity: rounding only, and the CPU's own image exactly.
    assert cases[0]["vs diffusers"]["max"] <= gpu_check.PARITY["float32"].max
    assert cases[0]["vs CPU float32"]["max"] == 0


def test_every_case_builds_from_the_suite_s_builders(tmp_path):
    """Each case takes its models, inputs and reference runs from tests/test_*.py: building them
    all here catches a helper renamed there before a device run would (the images are made only
    in the full rehearsal, and for sd15 above)."""
    for name, make in gpu_check.CASES.items():
        case = make(tmp_path)
        assert callable(case.load) and callable(case.ours) and callable(case.theirs), name


def test_float32_bar_is_the_suite_s():
    from helpers import PIXEL_TOL
    assert gpu_check.PARITY["float32"].max == PIXEL_TOL


def test_diffusers_draws_in_float32_inside_the_check():
    """The device's torch draws another sequence in float16 than in float32 (docs/PERFORMANCE.md,
    GPU): inside noise_in_float32 every diffusers binding draws float32 and casts, so its noise
    is sd's whatever the build; outside, the original is back."""
    import torch
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a
    from diffusers.utils import torch_utils
    original = torch_utils.randn_tensor
    float32 = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    with gpu_check.noise_in_float32():
        assert euler_a.randn_tensor is not original
        drawn = euler_a.randn_tensor((2, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float16)
    assert drawn.dtype == torch.float16 and torch.equal(drawn, float32.half())
    assert euler_a.randn_tensor is original and torch_utils.randn_tensor is original
    assert set(gpu_check.half_draws()) == {"float16", "bfloat16"}


def test_float16_sdxl_vae_check_passes_and_has_teeth(results):
    check = results["parity"]["sdxl_vae_float16"]
    assert "error" not in check, check.get("error")
    assert check["ok"] and check["vae dtype"] == "float32" and check["decode finite"]
    assert check["the VAE in float16 overflows (the check has teeth)"]


def test_speed_step_times_every_row_for_both_libraries(results):
    step = results["sd15-float16"]
    # On a CPU SD 1.5's float16 step runs in bfloat16 (no fast float16 convolutions there).
    assert step["settings"]["dtype"] == "bfloat16" and step["settings"]["steps"] == gpu_check.QUICK.steps
    rows = step["rows"]
    for lib in ("sd", "diffusers"):
        assert {"text encoding (s)", "UNet step, batch 2 (s)", "VAE decode (s)"} <= set(rows[lib])
        assert all(seconds > 0 for seconds in rows[lib].values())
    assert rows["floor"]["UNet step (GFLOP)"] > 0 and rows["floor"]["matmul rate (GFLOP/s)"] > 0
    assert step["finite"] == {"sd": True, "diffusers": True}


def test_compile_step_runs_sd_compiled_next_to_eager(results):
    step = results["sd15-float16-compile"]
    assert set(step["loads"]) == {"sd", "sd compile=True"}
    assert any("eager backend" in note for note in step["notes"])
    assert step["rows"]["sd compile=True"]["UNet step, batch 2 (s)"] > 0


def test_report_from_those_results(results, tmp_path, capsys):
    args = cpu_args(tmp_path)
    args.out.mkdir(parents=True)
    report = gpu_check.Report(args)
    for step in gpu_check.STEPS:
        if step.name in results:
            report.record(step, {"status": "ok", "seconds": 1.0, "result": results[step.name]})
        else:
            report.record(step, {"status": "skipped: time budget (0 s left, needs 1)"})
    report.write()
    assert report.all_passed()
    md = (args.out / "gpu_check.md").read_text()
    assert "| sd15 | bfloat16 |" in md and "SDXL VAE in a float16 pipeline" in md
    # The compile step's ratios are taken against the eager step's diffusers rows.
    assert "| sd compile=True / diffusers |" in md and "from step sd15-float16" in md
    summary = report.summary().splitlines()
    assert len(summary) == 2 + len(gpu_check.STEPS) and "2/2 within bars" in summary[2]
    data = json.loads((args.out / "gpu_check.json").read_text())
    assert data["steps"]["parity"]["result"]["cases"][0]["ok"]


def test_no_time_left_skips_every_step_and_still_reports(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--quick", "--budget", "0", "--cache", str(tmp_path / "cache"),
                           "--out", str(tmp_path / "out")]) == 1  # nothing checked is no pass
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["status"].split(" (")[0] for s in data["steps"].values()] == ["skipped: time budget"] * len(
        gpu_check.STEPS)
    assert capsys.readouterr().out.rstrip().endswith("|")  # the table comes last


def test_a_step_past_its_time_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "pid"
    with open(tmp_path / "log", "w") as log:
        outcome = gpu_check.run_child(["sh", "-c", f"sleep 600 & echo $! > {pid_file}; wait"], 2, log)
    assert outcome["status"] == "timed out after 2 s"
    grandchild = int(pid_file.read_text())
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"  # gone, or dead unreaped


def test_a_step_dies_with_the_script(tmp_path):
    """Should the run call's command be killed, its step must not run on in its own session."""
    pid_file = tmp_path / "pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r})
import gpu_check
gpu_check.run_child(["sh", "-c", "echo $$ > {pid_file}.part && mv {pid_file}.part {pid_file} && exec sleep 600"],
                    600, open({str(tmp_path / 'log')!r}, "w"))
"""])
    try:
        wait_for(pid_file.exists, "the step to start")
    finally:
        parent.kill()
        parent.wait()
    step = Path(f"/proc/{int(pid_file.read_text())}/stat")
    wait_for(lambda: not step.exists() or step.read_text().split(")")[1].split()[0] == "Z", "the step to die")


def wait_for(condition, what: str, limit_s: float = 120):
    """Poll for a state; the limit only bounds a test that would otherwise hang."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {limit_s} s for {what}"
        time.sleep(0.05)


def test_wrapper_runs_the_script():
    out = subprocess.run([str(ROOT / "scripts" / "gpu_check"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--budget" in out.stdout


def test_wheel_folder_is_ignored_by_git():
    """The wheels travel to the device by `carry`, never in the working tree or a commit."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", ".whl/diffusers-0.42.1-py3-none-any.whl"],
                          cwd=ROOT).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SD_SLOW_TESTS"), reason="minutes on a 2-core CPU; set SD_SLOW_TESTS=1")
def test_cpu_rehearsal_end_to_end(tmp_path):
    """The device's command, on the CPU: every step in its own process, every check passing."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {name: s["status"] for name, s in data["steps"].items()} == {s.name: "ok" for s in gpu_check.STEPS}
    assert data["steps"]["sdxl-float16"]["result"]["rows"]["sd"]["VAE decode 128x128 tiled, one run (s)"] > 0
    assert out.stdout.rstrip().splitlines()[-1].startswith("| sd15-float16-compile | ok |")
