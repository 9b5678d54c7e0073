"""The core (sd/*.py) never imports the service layer (sd/serve/): importing it loads none of
sd.serve, and no core module names it; only the command line's `serve` dispatch does, lazily."""

import ast
import subprocess
import sys
from pathlib import Path

SD = Path(__file__).resolve().parent.parent / "sd"
CORE = sorted(p for p in SD.glob("*.py") if p.name not in ("__main__.py",))
SERVICE = ("sd.serve", "sd.server", "sd.api", "sd.models")  # the subpackage, and the modules it replaced


def service_imports(path: Path) -> list[tuple[str, ast.AST]]:
    """(module, node) for every import in `path` of the service layer, absolute or relative."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("sd." + (node.module or "")).rstrip(".") if node.level == 1 else node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, node) for name in names if any(name == s or name.startswith(s + ".") for s in SERVICE)]
    return found


def test_importing_the_core_loads_no_service_module():
    modules = [f"sd.{p.stem}" for p in CORE if p.stem != "__init__"]
    code = (f"import sys, sd; import {', '.join(modules)}; "
            "print(sorted(m for m in sys.modules if m.startswith(('sd.serve', 'starlette', 'uvicorn'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=SD.parent, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_no_core_module_imports_the_service_layer():
    offenders = {p.name: [name for name, _ in service_imports(p)] for p in CORE if p.name != "cli.py"}
    assert not any(offenders.values()), offenders
    # the command line dispatches `sd serve` to it, from inside main(), so `sd generate` never loads it
    cli = SD / "cli.py"
    tree = ast.parse(cli.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert [name for name, node in service_imports(cli) if not main.lineno < node.lineno <= main.end_lineno] == []
    assert {name for name, _ in service_imports(cli)} <= {"sd.serve.cli", "sd.serve.cli.main"}


def test_the_scan_sees_each_form_of_import(tmp_path):
    """The scan itself, on a module that imports the service layer in each way it could."""
    for line in ("import sd.serve.app", "from sd.serve import app", "from .serve.worker import Worker",
                 "from . import serve", "from .server import main", "from .models import Models"):
        (tmp_path / "m.py").write_text(line + "\n")
        assert service_imports(tmp_path / "m.py"), line
    (tmp_path / "m.py").write_text("from .registry import REGISTRY\nimport sd.pipeline\nfrom . import samplers\n")
    assert service_imports(tmp_path / "m.py") == []
