"""The dsmae package: its public names, each imported from its module on first use."""

import subprocess
import sys

import pytest

import dsmae
from dsmae.config import ARCHS, ConfigError
from dsmae.export import load_encoder
from dsmae.models import DSMAE, MAE


def test_every_public_name_is_there_and_listed():
    for name in dsmae.__all__:
        assert getattr(dsmae, name) is not None, name
    assert set(dsmae.__all__) <= set(dir(dsmae))
    assert dsmae.ARCHS is ARCHS and dsmae.ConfigError is ConfigError
    assert dsmae.DSMAE is DSMAE and dsmae.load_encoder is load_encoder
    assert isinstance(dsmae.build("mae", arch="vit_tiny", img_size=8, patch_size=4), MAE)
    assert isinstance(dsmae.build("dsmae-ly", arch="vit_tiny", img_size=8, patch_size=4), DSMAE)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        dsmae.nothing  # noqa: B018


def test_importing_the_package_waits_for_no_torch():
    code = (
        "import sys, dsmae; assert 'torch' not in sys.modules and 'timm' not in sys.modules; "
        "dsmae.momentum_at(1, 2); assert 'torch' not in sys.modules; "
        "dsmae.DSMAE; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at its top (the
    imports under ``TYPE_CHECKING`` included: they are arrows too), as dotted names; a
    ``from P import name`` that names a submodule is an arrow to that submodule."""
    import ast
    from pathlib import Path

    root = Path(dsmae.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        body = list(tree.body)
        for node in tree.body:  # if TYPE_CHECKING: ... (and other top-level blocks)
            if isinstance(node, ast.If):
                body += node.body
        arrows = set()
        for node in body:
            if isinstance(node, ast.Import):
                arrows |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    arrows.add(sub if sub in modules else node.module)
        # a package's own __init__ importing its submodules is how packages are made
        graph[name] = {a for a in arrows if a != name and not name.startswith(a + ".")}
    return graph


def test_no_module_imports_itself_round_a_circle():
    """Every arrow points one way: from the modules that use to the modules they use
    (error types, durations and choices below ``config/``, the pre-training state above
    what it saves and resumes)."""
    graph = _import_graph()
    seen: dict[str, int] = {}  # 1: on the path being walked, 2: done
    circles = []

    def walk(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in seen:
                walk(nxt, [*path, nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            walk(module, [module])
    assert circles == []
