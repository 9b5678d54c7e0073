"""docs/SAMPLERS.md's code runs as written, so the doc can't rot: every ```python block, in
order, in one namespace, in a scratch folder."""

import re
from pathlib import Path

import pytest
from PIL import Image

import sd
from sd.samplers import SAMPLERS, sampler_names

DOC = Path(__file__).parent.parent / "docs" / "SAMPLERS.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
MAX_EXAMPLE_LINES = 25  # the promise: a sampler idea, or a loop, in under 25 lines


@pytest.fixture
def registry_restored():
    """The doc registers a sampler; other tests iterate the registry, so take it back out."""
    before = dict(SAMPLERS)
    yield
    SAMPLERS.clear()
    SAMPLERS.update(before)


def test_samplers_doc_runs(tmp_path, monkeypatch, registry_restored):
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 4, "the doc's examples went missing"
    custom_sampler, custom_loop = blocks[0], blocks[1]
    for name, code in (("custom sampler", custom_sampler), ("custom loop", custom_loop)):
        lines = [line for line in code.splitlines() if line.strip()]
        assert len(lines) < MAX_EXAMPLE_LINES, f"the {name} example has {len(lines)} lines"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), namespace)
    # A new sampler is one function and one line: registered, named everywhere, cited by its docstring.
    assert "euler_x0_average" in sampler_names()
    assert SAMPLERS["euler_x0_average"].cite.startswith("Euler on a blend of the current and previous x0")
    assert SAMPLERS["euler_x0_average"].options == {"weight": 0.5}
    for picture in ("triangle.png", "circle.png"):
        assert Image.open(tmp_path / picture).size == (64, 64)
    assert namespace["image"].info["sd"]["guidance"] == "guidance_interval"
    assert namespace["grad"].abs().max() > 0


def test_the_docs_custom_sampler_differs_from_euler_only_by_its_idea(registry_restored):
    """With weight 0 the example sampler is Euler itself: the doc's example is a real sampler."""
    namespace = {}
    exec(compile(BLOCK.findall(DOC.read_text())[0].replace('image.save("triangle.png")', ""), str(DOC), "exec"),
         namespace)
    pipe = namespace["pipe"]
    kw = dict(seed=2, num_steps=6)
    ours = pipe.generate("a red circle", sampler="euler_x0_average", sampler_options={"weight": 0.0}, **kw)
    euler = pipe.generate("a red circle", sampler="euler", **kw)
    assert ours.tobytes() == euler.tobytes()
    assert isinstance(pipe, sd.Pipeline)
