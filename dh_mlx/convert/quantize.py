"""Quantize a GGUF file with llama.cpp's own quantizer, through the `llama-cpp-python` package."""

from __future__ import annotations

import ctypes
from pathlib import Path

from ..files import write_atomic
from .errors import ConvertError

# --quantize name -> llama.cpp's llama_ftype constant
QUANT_TYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
# Tensors the quantizer must leave in float32 (see gguf_tensors.KEEP_F32): regexes over GGUF names.
KEEP_F32 = (r"attn_k_b\.weight", r"attn_v_b\.weight")
GGML_TYPE_F32 = 0

INSTALL_HINT = ("`quantize` runs llama.cpp's quantizer from the llama-cpp-python package, which is not installed: "
                "pip install llama-cpp-python (or pip install 'dh-mlx[llama]'; it compiles llama.cpp, ~15-20 min)")


def check_quantizer(kind: str):
    """The llama_cpp module, once `kind` is known to be valid; ConvertError saying how to install it if absent."""
    if kind not in QUANT_TYPES:
        raise ConvertError(f"quantize {kind!r}: expected one of {', '.join(QUANT_TYPES)}")
    try:
        import llama_cpp
    except ImportError:
        raise ConvertError(INSTALL_HINT) from None
    return llama_cpp


def quantize_gguf(src: str | Path, dst: str | Path, kind: str, *, threads: int = 0) -> Path:
    """Quantize the GGUF file `src` into `dst` as `kind` (Q4_K_M, Q5_K_M or Q8_0)."""
    llama_cpp = check_quantizer(kind)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = threads
    overrides = (llama_cpp.llama_model_tensor_override * (len(KEEP_F32) + 1))(
        *[llama_cpp.llama_model_tensor_override(p.encode(), GGML_TYPE_F32) for p in KEEP_F32],
        llama_cpp.llama_model_tensor_override(None, 0))  # the list ends at a null pattern
    params.tt_overrides = overrides

    def run(tmp: str) -> None:  # into a fresh temporary file, renamed over `dst` (never through a link there)
        code = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if code != 0:
            raise ConvertError(f"{src}: llama.cpp's quantizer failed (code {code}); its log above says why")
    write_atomic(Path(dst), run)
    return Path(dst)
