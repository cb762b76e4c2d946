"""Converters: GGUF for llama.cpp and an HF directory for transformers/vLLM.

Each is one call: `export_gguf(model_dir, "m.gguf", outtype="f16", quantize="Q4_K_M")`,
`export_hf(model_dir, "hf_dir")`.
"""

from .errors import ConvertError
from .hf import export_hf

__all__ = ["ConvertError", "export_gguf", "export_hf"]


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
