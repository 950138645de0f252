"""Attention that applies each sample's qkv SSF while it loads q/k/v (one Triton kernel, CUDA only).

Why: in a compiled mixed-task forward, inductor fuses the per-sample SSF of almost every site into a
neighbouring kernel (a norm, GELU, a residual add). The ``qkv`` projection is the exception: its output goes
straight into the attention kernel, so its SSF would be one extra read and write of a ``[B, N, 3D]`` tensor
in every block, about 8% of ViT-B's forward at batch 256. This kernel reads the raw ``qkv`` output instead
and needs the SSF only on q and on its own output, by two identities of softmax attention (per sample and
head, with ``q = γq⊙q' + βq``, ``k = γk⊙k' + βk``, ``v = γv⊙v' + βv``):

* ``q·k_j = (γk⊙q)·k'_j + q·βk``; the last term is the same for every key ``j``, so it cancels in the softmax:
  the keys are used raw and q is scaled by ``γk`` once more.
* the softmax weights of a query sum to 1, so ``Σ_j p_j v_j = γv ⊙ Σ_j p_j v'_j + βv``: the values are used
  raw and the affine is applied to the output.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "linear_output_dtype",
    "mixed_attention_available",
    "mixed_ssf_attention",
    "mixed_ssf_attention_reference",
    "tma_available",
]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel is simply not available
    triton = None
TensorDescriptor = None


def mixed_attention_available(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """The kernel runs on CUDA tensors of half/bfloat16 (``dtype``, default ``x.dtype``) when Triton is installed."""
    return triton is not None and x.is_cuda and (dtype or x.dtype) in (torch.float16, torch.bfloat16)


def mixed_ssf_attention_reference(
    qkv: torch.Tensor, scale_table: torch.Tensor, shift_table: torch.Tensor, task_rows: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """SSF on the raw ``qkv`` ``[B, N, 3·H·d]`` output, then softmax attention: ``[B, N, H·d]`` (the reference)."""
    batch, tokens, width = qkv.shape
    qkv = qkv * scale_table[task_rows].unsqueeze(1).to(qkv.dtype) + shift_table[task_rows].unsqueeze(1).to(qkv.dtype)
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, tokens, width // 3)


if triton is not None:
    try:  # Hopper's tensor-memory accelerator (TMA): block loads by descriptor; older Triton builds lack it
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        TensorDescriptor = None

    @triton.jit
    def _load_rows(base, desc, sample, start, col, tokens, width, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                   TMA: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
        """``BLOCK`` token rows of one head's slice (columns ``col + [0, HEAD_DIM)``) of one sample's qkv.

        With TMA, the descriptor's bounds zero-fill rows past the sample's last token; with pointers, ``MASKED``
        does (whole blocks skip the mask).
        """
        if TMA:
            return desc.load([sample, start, col]).reshape(BLOCK, HEAD_DIM)
        rows = start + tl.arange(0, BLOCK)
        pointers = base + rows[:, None] * width + col + tl.arange(0, HEAD_DIM)[None, :]
        if MASKED:
            return tl.load(pointers, mask=rows[:, None] < tokens, other=0.0)
        return tl.load(pointers)

    @triton.jit
    def _attend(acc, l_i, m_i, q, base, desc, sample, start_n, k_col, v_col, tokens, width,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
        """One block of keys/values, online softmax in base 2 (the running max, sum and output)."""
        k = _load_rows(base, desc, sample, start_n, k_col, tokens, width, BLOCK_N, HEAD_DIM, TMA, MASKED)
        v = _load_rows(base, desc, sample, start_n, v_col, tokens, width, BLOCK_N, HEAD_DIM, TMA, MASKED)
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            s = tl.where((start_n + tl.arange(0, BLOCK_N) < tokens)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def _mixed_ssf_attention_kernel(
        qkv_ptr,
        q_desc,
        kv_desc,
        kv_tail_desc,
        out_ptr,
        out_desc,
        scale_ptr,
        shift_ptr,
        task_ptr,
        tokens,
        stride_table,
        qk_scale,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TAIL_N: tl.constexpr,
        TMA: tl.constexpr,
    ):
        # One program per (sample, head, block of queries); a head's query blocks run side by side (L2 reuse).
        query_blocks = tl.cdiv(tokens, BLOCK_M)
        start_m = tl.program_id(0) % query_blocks
        sample_head = tl.program_id(0) // query_blocks
        sample = sample_head // HEADS
        head = sample_head % HEADS
        width = 3 * HEADS * HEAD_DIM
        task = tl.load(task_ptr + sample)

        # Per-channel SSF of this sample and head: q gets γq·γk (and the softmax scale, in base 2), plus βq·γk.
        q_col = head * HEAD_DIM
        k_col = q_col + HEADS * HEAD_DIM
        v_col = k_col + HEADS * HEAD_DIM
        dims = tl.arange(0, HEAD_DIM)
        scales, shifts = scale_ptr + task * stride_table + dims, shift_ptr + task * stride_table + dims
        gamma_k = tl.load(scales + k_col).to(tl.float32)
        q_mul = tl.load(scales + q_col).to(tl.float32) * gamma_k * qk_scale
        q_add = tl.load(shifts + q_col).to(tl.float32) * gamma_k * qk_scale
        v_mul = tl.load(scales + v_col).to(tl.float32)
        v_add = tl.load(shifts + v_col).to(tl.float32)

        base = qkv_ptr + sample.to(tl.int64) * tokens * width
        q = _load_rows(base, q_desc, sample, start_m * BLOCK_M, q_col, tokens, width, BLOCK_M, HEAD_DIM, TMA, True)
        q = (q.to(tl.float32) * q_mul[None, :] + q_add[None, :]).to(qkv_ptr.dtype.element_ty)

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        # Whole key blocks first, without masks; then the partial last block, if any, as a block of TAIL_N keys.
        full_end = (tokens // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attend(
                acc, l_i, m_i, q, base, kv_desc, sample, start_n, k_col, v_col, tokens, width,
                BLOCK_N, HEAD_DIM, TMA, False,
            )  # fmt: skip
        if TAIL_N > 0:
            acc, l_i, m_i = _attend(
                acc, l_i, m_i, q, base, kv_tail_desc, sample, full_end, k_col, v_col, tokens, width,
                TAIL_N, HEAD_DIM, TMA, True,
            )  # fmt: skip

        out = ((acc / l_i[:, None]) * v_mul[None, :] + v_add[None, :]).to(out_ptr.dtype.element_ty)
        if TMA:  # the descriptor's bounds drop rows past the last token
            out_desc.store([sample, start_m * BLOCK_M, q_col], out.reshape(1, BLOCK_M, HEAD_DIM))
        else:
            rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
            out_base = out_ptr + sample.to(tl.int64) * tokens * (HEADS * HEAD_DIM)
            out_ptrs = out_base + rows[:, None] * (HEADS * HEAD_DIM) + q_col + dims[None, :]
            tl.store(out_ptrs, out, mask=rows[:, None] < tokens)


# Chosen for ViT-B (197 tokens, 12 heads of 64): the fastest tile with TMA loads, and among the fastest with pointer
# loads (``ssf-tasks bench kernel attention``). ``short_tail``: the partial last block of keys (5 of 197) is a block
# of its own, shorter than a whole ``BLOCK_N``.
_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "short_tail": True}


def _tail_keys(tokens: int, config: dict) -> int:
    """Height of the last key block: 0 when ``BLOCK_N`` divides the tokens; else, with ``short_tail``, the leftover
    keys rounded up to a power of two (``tl.arange``) and to at least 16 (``tl.dot``'s minimum), or a whole block."""
    block, remainder = config["BLOCK_N"], tokens % config["BLOCK_N"]
    if remainder == 0 or not config["short_tail"]:
        return block if remainder else 0
    return min(block, max(16, triton.next_power_of_2(remainder)))


def tma_available(x: torch.Tensor) -> bool:
    """Block loads by TMA descriptor: a Hopper-or-newer GPU, a Triton that has them, and a contiguous ``x`` whose
    start and rows are 16-byte aligned (what a descriptor requires)."""
    return (
        TensorDescriptor is not None
        and x.is_cuda
        and x.is_contiguous()
        and x.data_ptr() % 16 == 0
        and (x.shape[-1] * x.element_size()) % 16 == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def _launch(qkv, scale_table, shift_table, task_rows, out, num_heads, config, tma: bool) -> None:
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    tail_keys = _tail_keys(tokens, config)
    q_desc = kv_desc = kv_tail_desc = out_desc = None
    if tma:  # 3-D descriptors: a block never runs into the next sample's rows

        def descriptor(tensor, rows):
            return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [1, rows, head_dim])

        q_desc, out_desc = descriptor(qkv, config["BLOCK_M"]), descriptor(out, config["BLOCK_M"])
        kv_desc = descriptor(qkv, config["BLOCK_N"])
        kv_tail_desc = descriptor(qkv, tail_keys) if tail_keys not in (0, config["BLOCK_N"]) else kv_desc
    grid = (triton.cdiv(tokens, config["BLOCK_M"]) * batch * num_heads,)  # 1-D: a 2-D grid's y axis caps at 65535
    _mixed_ssf_attention_kernel[grid](
        qkv,
        q_desc,
        kv_desc,
        kv_tail_desc,
        out,
        out_desc,
        scale_table,
        shift_table,
        task_rows,
        tokens,
        scale_table.stride(0),
        head_dim**-0.5 * math.log2(math.e),
        HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"],
        TAIL_N=tail_keys,
        TMA=tma,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )


@torch.library.custom_op("ssf_tasks::mixed_ssf_attention", mutates_args=())
def _mixed_ssf_attention_op(
    qkv: torch.Tensor, scale_table: torch.Tensor, shift_table: torch.Tensor, task_rows: torch.Tensor, num_heads: int
) -> torch.Tensor:
    qkv = qkv.contiguous()
    out = torch.empty(*qkv.shape[:2], qkv.shape[2] // 3, device=qkv.device, dtype=qkv.dtype)
    tables = scale_table.contiguous(), shift_table.contiguous()
    _launch(qkv, *tables, task_rows.contiguous(), out, num_heads, _CONFIG, tma_available(qkv))
    return out


@_mixed_ssf_attention_op.register_fake
def _(qkv, scale_table, shift_table, task_rows, num_heads):
    return qkv.new_empty(*qkv.shape[:2], qkv.shape[2] // 3)


def mixed_ssf_attention(
    qkv: torch.Tensor, scale_table: torch.Tensor, shift_table: torch.Tensor, task_rows: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Softmax attention over the raw ``qkv`` output with each sample's qkv SSF applied (see the module doc).

    Args:
        qkv: ``[B, N, 3·H·d]``, the qkv Linear's output before SSF (bias included).
        scale_table, shift_table: the qkv site's ``[T, 3·H·d]`` tables.
        task_rows: LongTensor ``[B]``: each sample's row in the tables.
        num_heads: ``H``.

    Returns:
        ``[B, N, H·d]``: the heads' outputs side by side, ready for the output projection.
    """
    return _mixed_ssf_attention_op(qkv, scale_table, shift_table, task_rows, num_heads)


def linear_output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear gives for input ``x``: autocast's (bf16/fp16) where it is on, else ``x``'s own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
