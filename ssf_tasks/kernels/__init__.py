"""GPU kernels: pure functions of tensors and their autograd ops, each with a torch version that runs anywhere.

Nothing here knows about modules, sites or tasks: callers pass weights, γ/β rows or tables and task indices. Launch
shapes (grid sizes) come from the device the tensors live on (``triton_support.device_programs``), and each tile was
chosen by a sweep that ``ssf-tasks bench kernel ...`` reruns.
"""

__all__: list[str] = []
