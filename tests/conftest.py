import sys
from pathlib import Path

import dh_mlx  # noqa: F401  (loads the fast BLAS and its shim before any test module imports mlx.core)

sys.path.insert(0, str(Path(__file__).parent))
