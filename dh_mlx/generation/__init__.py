"""Generation: the latent cache, sampling, the steps (prefill, decode, compiled cached steps), MTP speculative
decoding as draft / verify / accept, and the loops that compose them."""

from .generate import GenerationResponse, GenerationStats, generate, generate_tokens, stream_generate
from .options import SamplingOptions
from .speculative import DraftPolicy
from .steps import PromptCache, compiled_decode_step, decode_step, prefill

__all__ = ["generate", "generate_tokens", "stream_generate", "GenerationStats", "GenerationResponse", "SamplingOptions",
           "DraftPolicy", "PromptCache", "prefill", "decode_step", "compiled_decode_step"]
