"""A plain (non-editable) install works as the README says: the shipped configs travel in the
wheel, so `evoformer train` with no file, or `configs/...` names, need no checkout."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_wheel_install_trains_from_its_shipped_configs(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    # Without build isolation (no download): setuptools and wheel come with the dev extra.
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(wheels), str(REPO)], check=True, timeout=300)
    (wheel,) = wheels.glob("evoformer-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, timeout=300)
    # The wheel first on the path, run away from the checkout: nothing can come from REPO.
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()

    def evoformer(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "evoformer", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    where = subprocess.run(
        [sys.executable, "-c", "import evoformer; print(evoformer.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout
    shown = evoformer("inspect", "configs/models/tiny/llama.yaml")
    assert shown.returncode == 0 and "158,016 total" in shown.stdout, shown.stderr
    run = evoformer(
        "train",
        "train.max_steps=2",
        "train.log_every=1",
        "run.progress=off",
        "model.n_layers=1",
        f"run.output_dir={work / 'run'}",
    )
    assert run.returncode == 0, run.stderr
    assert (work / "run" / "checkpoints" / "step_2").is_dir()
