"""torch_ref: the PyTorch reference implementation of jaxbench's recipes. It shares only the
framework-neutral modules of jaxbench (`configs`, `stream`, `schedule`, ...): it never starts JAX.
"""
