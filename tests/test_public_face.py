"""The public face (modeguard/__init__.py): what `import modeguard` offers, lazily at run
time and statically to type checkers, and that the two agree."""

import ast
import subprocess
import sys
from pathlib import Path

import modeguard

INIT = Path(modeguard.__file__)


def _type_checking_block():
    tree = ast.parse(INIT.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return node.body
    raise AssertionError("no `if TYPE_CHECKING:` block in modeguard/__init__.py")


def test_the_static_names_are_the_lazy_names():
    block = _type_checking_block()
    imported = {alias.asname or alias.name for n in block if isinstance(n, ast.ImportFrom) for alias in n.names}
    assert imported == set(modeguard._LAZY)
    for n in block:
        if isinstance(n, ast.ImportFrom):
            for alias in n.names:
                # The module the static import names is the one __getattr__ loads it from.
                assert "." + n.module == modeguard._LAZY[alias.name], alias.name


def test_the_static_warning_classes_are_the_rule_classes_with_their_bases():
    declared = {n.name: [b.id for b in n.bases] for n in _type_checking_block() if isinstance(n, ast.ClassDef)}
    runtime = modeguard._rule_classes()
    assert set(declared) == set(runtime)
    for name, bases in declared.items():
        assert [b.__name__ for b in runtime[name].__bases__] == bases, name
        assert getattr(modeguard, name) is runtime[name]


def test_py_typed_ships_with_the_package():
    assert (INIT.parent / "py.typed").exists()


def test_importing_modeguard_does_not_import_torch():
    code = "import sys, modeguard; modeguard.Severity; modeguard.FailOn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_private_modules_are_not_offered_as_attributes():
    for name in ("guard", "auto", "cli", "markers"):
        assert not hasattr(modeguard, name), name


def test_modeguard_needs_no_framework_and_an_integration_says_what_it_needs():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate'):\n"
        "    sys.modules[name] = None  # as if not installed: importing it raises ImportError\n"
        "import torch, modeguard, modeguard.integrations\n"
        "m = torch.nn.Linear(2, 2)\n"
        "with modeguard.watch(m, torch.optim.SGD(m.parameters(), lr=0.1)):\n"
        "    m(torch.randn(1, 2))\n"
        "try:\n"
        "    import modeguard.integrations.lightning\n"
        "except ImportError as exc:\n"
        "    print('lightning:', exc)\n"
        "try:\n"
        "    import modeguard.integrations.transformers\n"
        "except ImportError as exc:\n"
        "    print('transformers: ImportError')\n"
        "print(sorted(n for n in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if sys.modules.get(n)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "lightning: modeguard.integrations.lightning needs PyTorch Lightning: pip install lightning (or pytorch-lightning)",
        "transformers: ImportError",
        "[]",
    ]
