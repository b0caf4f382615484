"""A memory fence usable inside numba kernels (LLVM `fence seq_cst`).

Shared-memory rings publish an index only after the data it covers; on arm64 (the boards)
stores may become visible out of order without a fence, and the compiler may reorder them on
any CPU. Aligned 8-byte loads and stores are single-copy atomic on x86-64 and arm64.
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic


@intrinsic
def fence(typingctx):
    """Full memory barrier (compiler and CPU)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen
