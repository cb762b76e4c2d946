"""Ships the repository's top-level presets, sample tokenizer and sample corpus inside the wheel, under
dh_mlx/_bundled/, where dh_mlx.config finds them when the package is installed outside a checkout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = {"parameters": ["*.json"], "data": ["tokenizer/*", "train_data.jsonl"]}


class BuildPyWithBundled(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the checkout
            return
        for folder, patterns in BUNDLED.items():
            for pattern in patterns:
                for src in sorted((ROOT / folder).glob(pattern)):
                    dst = Path(self.build_lib, "dh_mlx", "_bundled", folder, src.relative_to(ROOT / folder))
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)


setup(cmdclass={"build_py": BuildPyWithBundled})
