"""Checkpoint I/O in one place: the framework-free file layout (`layout`, shared with the PyTorch twin),
MLX model directories (`weights`), quantized copies (`quantized`) and training-run checkpoints (`training`).
Importing this package imports nothing else."""
