"""Converters: GGUF for llama.cpp, an HF directory for transformers/vLLM, and importers from PyTorch files.

Each is one call: `export_gguf(model_dir, "m.gguf", outtype="f16", quantize="Q4_K_M")`,
`export_hf(model_dir, "hf_dir")`, `import_checkpoint("weights.pt", "model_dir", config="config.json")`.
"""

from .errors import ConvertError
from .hf import export_hf
from .importers import import_checkpoint

__all__ = ["ConvertError", "export_gguf", "export_hf", "import_checkpoint"]


def __getattr__(name: str):
    # export_gguf needs the optional `gguf` package; the other converters must not
    if name == "export_gguf":
        try:
            from .gguf import export_gguf
        except ModuleNotFoundError as e:
            if e.name != "gguf":
                raise
            raise ConvertError("writing GGUF needs the gguf package: pip install gguf (or 'dh-mlx[gguf]')") from None
        return export_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
