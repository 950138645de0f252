"""The mixed-batch attention kernel, run on the CPU by Triton's interpreter (tests/test_gpu.py runs it compiled).

The interpreter must be switched on before the kernel is defined, so the check runs in a child process.
"""

from __future__ import annotations

import pytest

from conftest import run_in_triton_interpreter

pytest.importorskip("triton")

CHECK = """
import json
import torch
from ssf_tasks.kernels.mixed_attention import _CONFIG, _launch, mixed_ssf_attention, mixed_ssf_attention_reference

torch.manual_seed(0)
errors = {}
shapes = [(3, 40, 2, 16), (2, 13, 1, 32), (4, 70, 2, 16), (2, 197, 1, 16), (2, 64, 1, 16), (2, 50, 2, 16)]
for batch, tokens, heads, head_dim in shapes:  # last key blocks of 16 keys, none, and 32
    width = 3 * heads * head_dim
    qkv = torch.randn(batch, tokens, width).half()
    scale = 1 + 0.3 * torch.randn(6, width)
    shift = torch.randn(6, width)  # large shifts: the k shift must cancel and the v shift carry over
    rows = torch.randint(0, 6, (2 * batch,))[::2]  # a strided view of task rows
    expected = mixed_ssf_attention_reference(qkv.double(), scale.double(), shift.double(), rows, heads)
    result = mixed_ssf_attention(qkv, scale, shift, rows, heads)  # the public op, given strided task rows
    errors[f"{batch}x{tokens}x{heads}x{head_dim}"] = float((result.double() - expected).norm() / expected.norm())
    # pointer loads, and Hopper's descriptor loads (which the interpreter emulates); the partial last key block
    # short or padded to a whole block
    for tma, short_tail in [(False, True), (True, True), (False, False), (True, False)]:
        result = torch.full((batch, tokens, heads * head_dim), float("nan")).half()
        _launch(qkv, scale, shift, rows.contiguous(), result, heads, {**_CONFIG, "short_tail": short_tail}, tma)
        error = float((result.double() - expected).norm() / expected.norm())
        errors[f"{batch}x{tokens}x{heads}x{head_dim} tma={tma} short_tail={short_tail}"] = error
print(json.dumps(errors))
"""


def test_kernel_matches_ssf_then_attention_in_the_interpreter():
    errors = run_in_triton_interpreter(CHECK)
    assert len(errors) == 30
    assert all(error < 2e-3 for error in errors.values()), errors  # fp16 inputs against an fp64 reference


@pytest.mark.parametrize(
    ("tokens", "short_tail", "keys"),
    [(197, True, 16), (64, True, 0), (50, True, 32), (13, True, 16), (197, False, 32), (64, False, 0)],
)
def test_last_key_block_is_as_short_as_the_kernel_allows(tokens, short_tail, keys):
    from ssf_tasks.kernels.mixed_attention import _CONFIG, _tail_keys

    assert _CONFIG["BLOCK_N"] == 32 and _CONFIG["short_tail"]
    assert _tail_keys(tokens, {**_CONFIG, "short_tail": short_tail}) == keys
