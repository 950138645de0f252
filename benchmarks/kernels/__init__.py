"""Micro-benchmarks of the Triton kernels of ``ssf_tasks.kernels``, one module each with a ``main()``, run as
``ssf-tasks bench kernel NAME`` (NAME is the module's name with dashes). They time one kernel at one ViT-B shape
against what torch.compile makes of the same work, check every result against a wider reference, and (``--sweep``,
where a kernel keeps its tile as module constants) time a grid of tiles (``tiles``). They rank tiles and kernels;
only the whole forward or training step (``ssf-tasks bench inference``, ``training``) compares them in place. Each
needs a CUDA GPU and Triton. Numbers: BENCHMARKS.md.
"""
