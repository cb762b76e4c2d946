import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dh_mlx import backend

backend.setup(training=True)  # as `dh-mlx train` does, before MLX's first eval: two-stream training steps

# JSONL given to train is prepared into a cache: the tests' own, not the user's (subprocesses inherit it).
os.environ["DH_MLX_DATA_CACHE"] = tempfile.mkdtemp(prefix="dh-mlx-test-data-")
atexit.register(shutil.rmtree, os.environ["DH_MLX_DATA_CACHE"], True)

sys.path.insert(0, str(Path(__file__).parent))
