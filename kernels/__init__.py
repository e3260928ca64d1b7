"""CUDA C sources of dmamig's device kernels, shipped inside the package as ``dmamig.kernels``."""
