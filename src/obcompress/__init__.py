"""obcompress: post-training joint pruning and quantization with exact OBS solvers."""

__version__ = "0.1.0"
