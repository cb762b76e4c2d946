import sys
from pathlib import Path

import dh_mlx  # noqa: F401  (loads the fast BLAS and its shim before any test module imports mlx.core)
from dh_mlx.device import widen_eval_order

widen_eval_order()  # as `dh-mlx train` does: training steps split batches over both CPU streams

sys.path.insert(0, str(Path(__file__).parent))
