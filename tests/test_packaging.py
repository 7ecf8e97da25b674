"""The package as a pip user gets it: a wheel built from a clean copy of the checkout, installed (not editable) into
a fresh virtual environment that cannot see the source tree, and run from there by its console command."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from .conftest import REPO

# a ml-100k subset (users with 20-30 ratings, histories up to 20 items) on the tiny random backbone: seconds a model
TINY = ["--dataset=ml-100k", "--backbone_path=tiny-random", "--epochs=1", "--show_progress=False", "--log_wandb=False",
        "--user_inter_num_interval=[20,30]", "--MAX_ITEM_LIST_LENGTH=20", "--mpo_stages=None"]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def run(self, *argv: str | Path, cwd: Path) -> subprocess.CompletedProcess:
        """A command of the virtual environment, from a folder outside the checkout, without PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _copy_checkout(dest: Path) -> None:
    """The files git tracks or would track: a stale ``build/`` in the checkout ships its old modules in the next
    wheel, which hides a package the build no longer finds."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    _copy_checkout(root / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "wheel"), str(root / "source")], check=True, capture_output=True, timeout=600)
    (wheel,) = (root / "wheel").glob("recbole_speeder-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The installed dependencies, offline: a folder named in a .pth joins sys.path, but the .pth files inside it are
    # not read, so the editable install's finder (which maps recbole_speeder to a source tree) stays out.
    (Path(purelib) / "deps.pth").write_text("\n".join([*site.getsitepackages(), site.getusersitepackages()]) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return Installed(wheel, venv)


def test_the_wheel_ships_every_module_the_properties_and_the_command(installed, tmp_path):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "recbole-speeder = recbole_speeder.launch:main" in entry_points
    modules = {p.relative_to(REPO).as_posix() for pkg in ("recbole_speeder", "dataset_prep")
               for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert {"recbole_speeder/experiments/commands.py", "recbole_speeder/__main__.py"} <= modules
    assert not modules - names, f"the wheel lacks {sorted(modules - names)}"
    properties = {f"recbole_speeder/{p.relative_to(REPO).as_posix()}" for p in (REPO / "properties").rglob("*")
                  if p.is_file()}
    assert "recbole_speeder/properties/overall.yaml" in properties and not properties - names

    probe = ("import sys, recbole_speeder.launch; print('torch' in sys.modules); import recbole_speeder.cli; "
             "from recbole_speeder.resources import properties_dir; print(recbole_speeder.__file__); "
             "print(properties_dir())")
    done = installed.run(installed.bin / "python", "-I", "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_loaded, package, properties_folder = done.stdout.split()
    assert torch_loaded == "False"  # launch sets OMP_WAIT_POLICY before anything imports torch
    assert Path(package).is_relative_to(installed.venv) and Path(properties_folder).is_relative_to(installed.venv)
    assert (Path(properties_folder) / "model" / "Speeder.yaml").is_file()


def test_the_installed_command_trains_speeder_and_prints_the_test_result(installed, tmp_path, feature_cache):
    done = installed.run("recbole-speeder", "--model=Speeder", *TINY, f"--checkpoint_dir={tmp_path / 'saved'}",
                         f"--feature_cache_dir={feature_cache}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (test_line,) = [line for line in (done.stdout + done.stderr).splitlines() if "test result" in line]
    assert "ndcg@10" in test_line


def test_the_installed_command_compares_two_models(installed, tmp_path, feature_cache):
    done = installed.run("recbole-speeder", "--compare=Speeder,SASRec", *TINY, "--state=WARNING",
                         f"--checkpoint_dir={tmp_path / 'saved'}", f"--feature_cache_dir={feature_cache}",
                         f"--results_dir={tmp_path / 'results'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (csv,) = (tmp_path / "results" / "ml-100k").glob("*/results.csv")
    table = pd.read_csv(csv)
    assert table["model"].tolist() == ["Speeder", "SASRec"]
    assert table["status"].tolist() == ["ok", "ok"], table.get("error")
    assert table["full/ndcg@10"].between(0, 1).all()


def test_python_m_forms_and_a_mistake_through_the_installed_command(installed, tmp_path):
    python = installed.bin / "python"
    usage = installed.run(python, "-I", "-m", "recbole_speeder", "--help", cwd=tmp_path)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: python -m recbole_speeder [-h] [--model MODEL]")
    assert "--compare" in usage.stdout and "--nproc" in usage.stdout
    prep = installed.run(python, "-I", "-m", "dataset_prep", "--help", cwd=tmp_path)
    assert prep.returncode == 0 and "usage" in prep.stdout
    done = installed.run("recbole-speeder", "--dataset=NoSuchData", f"--checkpoint_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: dataset 'NoSuchData' not found")
