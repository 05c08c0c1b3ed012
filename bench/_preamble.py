"""What the CPU benchmark scripts set before numpy or torch load.

One BLAS/OpenMP thread per process (the scripts' worker processes are the parallelism, and the
machine is shared), and the repository on ``sys.path``: the scripts run as plain files
(``python bench/<script>.py``), and spawned workers import them again by path. A script imports it
first, as ``bench._preamble`` when it is itself imported as ``bench.<script>`` (the tests), else as
``_preamble`` (its folder is then ``sys.path[0]``).
"""

import os
import sys
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
