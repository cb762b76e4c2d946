from .transformer import Model, Output

__all__ = ["Model", "Output"]
