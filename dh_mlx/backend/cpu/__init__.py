"""The CPU backend: an optimised BLAS (`blas`), compiler flags and kernel rewriting for mx.compile (`jit`,
`kernel_vectorize`), native kernels (`native`), the second stream (`streams`) and the operations built on
them (`layers`, `attention`, `experts`, `training`). Importing this package imports nothing else."""
