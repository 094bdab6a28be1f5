"""The example notebooks run headless, cell by cell, and show the reports they promise.

Each notebook runs in a fresh ipykernel started with this interpreter (a kernel spec
written to a temporary folder, so nothing needs installing beforehand). Cells are found
by their tags; the test fails on any cell error and on a missing or unexpected report.

To refresh the outputs committed with the notebooks after editing them:

    .venv/bin/python tests/test_notebooks.py
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "modeguard-test"
CODE = re.compile(r"\bMG\d{3}\b")


def write_kernel_spec(folder: Path) -> KernelSpecManager:
    """A kernel spec for the running interpreter, in ``folder``; IPython's own files go
    there too, so running the notebooks writes nothing to the home directory."""
    spec_dir = folder / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (modeguard tests)",
        "language": "python",
        # MODEGUARD in the caller's environment would change what the notebooks show; the
        # models are tiny, and one thread each keeps kernels from fighting over the cores.
        "env": {"IPYTHONDIR": str(folder / "ipython"), "MODEGUARD": "", "OMP_NUM_THREADS": "1"},
    }))
    return KernelSpecManager(kernel_dirs=[str(folder / "kernels")])


async def _execute(path: Path, folder: Path, ksm: KernelSpecManager):
    nb = nbformat.read(path, as_version=4)
    km = AsyncKernelManager(
        kernel_name=KERNEL, kernel_spec_manager=ksm, connection_file=str(folder / f"kernel-{path.stem}.json"),
    )
    client = NotebookClient(
        nb, km=km, timeout=120, record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        await client.async_execute()
    finally:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    return nb


def execute(paths, folder: Path) -> dict:
    """Run notebooks top to bottom, each in its own kernel, side by side (most of the time
    is kernels starting and importing torch). Maps each path to its executed notebook, or
    to the exception (CellExecutionError for a failing cell) that stopped it."""
    ksm = write_kernel_spec(folder)

    async def run_all():
        return await asyncio.gather(*(_execute(p, folder, ksm) for p in paths), return_exceptions=True)

    return dict(zip(paths, asyncio.run(run_all())))


def text_of(cell) -> str:
    """Everything a cell shows, as text: streams, plain-text and HTML displays, errors."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.extend(str(v) for k, v in out.data.items() if k in ("text/plain", "text/html"))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "\n".join(parts)


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def html_of(cell) -> str:
    return "\n".join(
        out.data["text/html"] for out in cell.get("outputs", [])
        if out.output_type == "display_data" and "text/html" in out.data
    )


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    results = execute(sorted(NOTEBOOKS.glob("*.ipynb")), tmp_path_factory.mktemp("jupyter"))

    def get(name: str):
        nb = results[NOTEBOOKS / name]
        if isinstance(nb, BaseException):
            raise nb
        return nb

    return get


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["finetune_frozen_backbone.ipynb", "quickstart.ipynb"]


def test_committed_notebooks_carry_their_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.execution_count is not None for c in code), f"{path.name} was saved without running it"
        assert any("MG" in text_of(c) for c in code), f"{path.name} was saved without its reports"
        assert all(c.cell_type != "code" or not any(o.output_type == "error" for o in c.outputs) for c in nb.cells)
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2, f"{path.name}: explain the steps"


def test_quickstart(executed):
    nb = executed("quickstart.ipynb")

    buggy = tagged(nb, "buggy-loop")
    assert "MG101" in text_of(buggy)
    assert "MG101" in html_of(buggy), "the report is shown as HTML in Jupyter"
    assert "validate" in text_of(buggy), "the report says where the mode was set"
    assert set(CODE.findall(text_of(buggy))) == {"MG101"}

    mode_map = text_of(tagged(nb, "mode-map"))
    assert "eval" in mode_map and "validate" in mode_map and "BatchNorm1d" in mode_map
    assert "ipykernel" not in mode_map, "cells are named In[n], not by the kernel's temporary files"

    fixed = text_of(tagged(nb, "fixed-loop"))
    assert "epoch 2" in fixed
    assert not CODE.findall(fixed), f"the fixed loop must get no report:\n{fixed}"

    final = text_of(tagged(nb, "final-report"))
    assert set(CODE.findall(final)) == {"MG101"}


def test_finetune_frozen_backbone(executed):
    nb = executed("finetune_frozen_backbone.ipynb")

    pretrain = text_of(tagged(nb, "pretrain"))
    assert not CODE.findall(pretrain), pretrain

    bug = text_of(tagged(nb, "frozen-bn-bug"))
    assert set(CODE.findall(bug)) == {"MG301"}
    assert "backbone" in bug
    drift = float(re.search(r"running_mean moved by ([0-9.e-]+)", bug).group(1))
    assert drift > 0

    fix = text_of(tagged(nb, "frozen-bn-fix"))
    assert not CODE.findall(fix), fix
    assert float(re.search(r"running_mean moved by ([0-9.e-]+)", fix).group(1)) == 0.0

    undeclared = text_of(tagged(nb, "bn-eval-undeclared"))
    assert set(CODE.findall(undeclared)) == {"MG101"}
    declared = text_of(tagged(nb, "bn-eval-frozen"))
    assert not CODE.findall(declared), declared

    allowed = text_of(tagged(nb, "allow"))
    assert not CODE.findall(allowed), allowed
    assert float(re.search(r"running_mean moved by ([0-9.e-]+)", allowed).group(1)) > 0

    final = text_of(tagged(nb, "final-report"))
    assert set(CODE.findall(final)) == {"MG101", "MG301"}


def _refresh_outputs() -> None:
    """Re-run every notebook and save it with its outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        results = execute(sorted(NOTEBOOKS.glob("*.ipynb")), Path(tmp))
    for path, nb in results.items():
        if isinstance(nb, BaseException):
            raise nb
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
        nbformat.write(nb, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    _refresh_outputs()
