"""fusedgrad.kernels: pure ``@triton.jit`` device code, one module per op family.

Nothing here imports from the ops layer (``fusedgrad`` proper); launchers,
validation and autograd live there. The dependency arrow is one way:
ops -> kernels.
"""
