"""GPU benchmarks of ssf-tasks, installed as ``ssf_tasks_bench``; not part of the library.

Every benchmark is a function that returns its rows (one dict per variant, also printed as one JSON line each), so
the ``ssf-tasks bench ...`` commands (``cli/bench.py``) call them directly and tests check their set-up on CPU:

- ``inference``: the mixed-task forward against the plain backbone, a per-task loop and PEFT LoRA; task scale.
- ``training``: one AdamW step of SSF against full fine-tuning, a linear probe, LoRA and a frozen-backbone floor.
- ``fold``: a folded (exported) task model against the plain timm model.
- ``serving``: ``predict`` from JPEG files and ``serve`` under concurrent clients.
- ``kernels``: micro-benchmarks of each Triton kernel (``ssf-tasks bench kernel NAME``).
- ``common``: what they share (CUDA-event timing, relative errors, compiling, rows, the environment).

Importing this package imports nothing heavy; its modules import torch and timm. The numbers, and the command and
raw file behind each table, are in BENCHMARKS.md.
"""
