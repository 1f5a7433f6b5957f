"""torch_ref: the PyTorch reference implementation of jaxbench's ResNet-9 recipe.

It shares the framework-neutral modules (`jaxbench.configs`, `stream`,
`schedule`, `report`, `data`), which import numpy only, so importing torch_ref
never starts JAX.
"""
