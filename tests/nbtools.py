"""Execute a notebook with small parameters (papermill), then check it with nbval.

Each notebook test runs in two steps:
1. papermill executes `notebooks/NN_name.ipynb` with the test parameters into a temporary copy;
2. nbval re-executes that copy (its injected parameters included) and compares the outputs of the
   cells marked `# NBVAL_CHECK_OUTPUT`: the deterministic ones (counts, noise multiplier, epsilon,
   table shapes). Timings, paths and progress bars are never in checked cells.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def execute_notebook(name: str, out_dir: Path, **parameters: Any) -> Path:
    """Run notebooks/<name> with papermill into out_dir and return the executed copy."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / name
    papermill.execute_notebook(
        str(NOTEBOOKS / name), str(executed), parameters=parameters, kernel_name="python3",
        cwd=str(REPO), progress_bar=False,
    )
    return executed


def nbval_check(executed: Path) -> subprocess.CompletedProcess:
    """Re-execute an executed notebook with nbval (lax mode) and return the finished pytest run."""
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-current-env", str(executed)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"nbval found differences in {executed.name}:\n{result.stdout[-4000:]}"
    return result
