"""The Triton kernels of edgeav.kernels, imported only through ``_backend.triton_kernels()`` (never at
package import: this module needs triton). Under ``TRITON_INTERPRET=1``, set before triton is imported,
they run in Triton's CPU interpreter.

Launch wrappers (shapes, tiles, dtypes) live next to their torch paths in ``ilora.py`` and ``wquant.py``.
"""

import triton
import triton.language as tl


@triton.jit
def ilora_kernel(x_ptr, a_ptr, route_ptr, b_ptr, out_ptr, M, N, K, scale,
                 RANK: tl.constexpr, HEADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ADD_TO_OUT: tl.constexpr):
    # One program: one token, BLOCK_N output features. Every program of a token recomputes A x and
    # R x (RANK + HEADS rows of K, read from L2) so that no second launch is needed.
    token = tl.program_id(0)
    block = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    low_rank = tl.zeros((BLOCK_R,), dtype=tl.float32)
    logits = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        xk = tl.load(x_ptr + token * K + k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_r[:, None] * K + k[None, :],
                    mask=(offs_r[:, None] < RANK) & k_ok[None, :], other=0.0).to(tl.float32)
        low_rank += tl.sum(a * xk[None, :], axis=1)
        r = tl.load(route_ptr + offs_h[:, None] * K + k[None, :],
                    mask=(offs_h[:, None] < HEADS) & k_ok[None, :], other=0.0).to(tl.float32)
        logits += tl.sum(r * xk[None, :], axis=1)
    # Round where the reference materialises a compute-dtype tensor, so bf16/fp16 agree closely.
    low_rank = low_rank.to(dtype).to(tl.float32)
    logits = tl.where(offs_h < HEADS, logits.to(dtype).to(tl.float32), float("-inf"))
    weights = tl.exp(logits - tl.max(logits, axis=0))
    route = (weights / tl.sum(weights, axis=0)).to(dtype).to(tl.float32)
    routed = (route[:, None] * low_rank[None, :]).to(dtype).to(tl.float32)  # [BLOCK_H, BLOCK_R], head-major
    routed = (routed * scale).to(dtype).to(tl.float32)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    b_offsets = offs_n[:, None, None] * (HEADS * RANK) + offs_h[None, :, None] * RANK + offs_r[None, None, :]
    b_ok = n_ok[:, None, None] & (offs_h[None, :, None] < HEADS) & (offs_r[None, None, :] < RANK)
    b = tl.load(b_ptr + b_offsets, mask=b_ok, other=0.0).to(tl.float32)
    delta = tl.sum(tl.sum(b * routed[None, :, :], axis=2), axis=1).to(dtype)
    out_ptrs = out_ptr + token * N + offs_n
    if ADD_TO_OUT:
        base = tl.load(out_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (base + delta.to(tl.float32)).to(dtype), mask=n_ok)
    else:
        tl.store(out_ptrs, delta, mask=n_ok)



@triton.jit
def int8_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_qn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q_ptr + offs_n[:, None] * stride_qn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        # |q| <= 127 is exact in fp16 and bf16; the per-channel scale is applied once, after the sum.
        w = tl.trans(q.to(dtype))
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])

@triton.jit
def int4_kernel(x_ptr, q_ptr, scale_ptr, offset_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn,
                GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    # One K step is one group: sum_k x_k (q_k s + o) = s * (x . q) + o * sum_k x_k, so the dot runs
    # on the raw nibbles (exact in fp16/bf16) and the group's scale and offset are applied per column.
    HALF: tl.constexpr = GROUP_SIZE // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    m_ok, n_ok = offs_m < M, offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for group in range(0, tl.cdiv(K, GROUP_SIZE)):
        k_even = group * GROUP_SIZE + 2 * offs_j
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        # Inputs past K (the zero padding of the last group) load as 0, so the padding never counts.
        x_even = tl.load(x_rows + k_even[None, :], mask=m_ok[:, None] & (k_even[None, :] < K), other=0.0)
        x_odd = tl.load(x_rows + k_even[None, :] + 1, mask=m_ok[:, None] & (k_even[None, :] + 1 < K), other=0.0)
        packed = tl.load(q_ptr + offs_n[:, None] * stride_qn + (group * HALF + offs_j)[None, :],
                         mask=n_ok[:, None], other=0)
        low = tl.trans((packed & 0xF).to(dtype))
        high = tl.trans((packed >> 4).to(dtype))
        if IEEE:
            dots = tl.dot(x_even, low, input_precision="ieee") + tl.dot(x_odd, high, input_precision="ieee")
        else:
            dots = tl.dot(x_even, low) + tl.dot(x_odd, high)
        x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
        scale = tl.load(scale_ptr + offs_n * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + offs_n * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)
        acc += dots * scale[None, :] + x_sum[:, None] * offset[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])

