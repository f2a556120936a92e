"""What `pip install .` puts in site-packages: distrib and its subpackages, launch/ as distrib.launch, nothing else."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "distrib").rglob("__init__.py")}
    on_disk |= {"distrib.launch"}
    assert on_disk - listed == set(), f"add these packages to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"pyproject lists packages that do not exist: {sorted(listed - on_disk)}"


@pytest.mark.slow
def test_the_wheel_holds_launch_inside_distrib_and_no_top_level_launch(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("distrib-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"distrib"}, f"top-level entries of the wheel: {sorted(top)}"
    for needed in ("distrib/launch/env.py", "distrib/launch/local.py", "distrib/commands/cli.py",
                   "distrib/commands/eval_tasks/distrib_code_ppl.yaml"):
        assert needed in names
