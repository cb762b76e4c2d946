import sys
from pathlib import Path

from dh_mlx import backend

backend.setup(training=True)  # as `dh-mlx train` does, before MLX's first eval: two-stream training steps

sys.path.insert(0, str(Path(__file__).parent))
