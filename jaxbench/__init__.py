"""jaxbench: fast CIFAR-10 training in JAX, with a PyTorch reference to race and check against.

Importing the package is cheap: configs, the batch stream and the schedule are
numpy-only, so `torch_ref` can share them without starting JAX.
"""

__version__ = "0.1.0"
