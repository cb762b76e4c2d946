"""Converters: GGUF for llama.cpp (more to come: an HF directory, importers from PyTorch files)."""

from .errors import ConvertError

__all__ = ["ConvertError", "export_gguf"]


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
