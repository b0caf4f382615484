"""The butterflies of an in-place radix-2 FFT (numba, nogil, no allocation), shared by the
kernels that need a small FFT inside the audio path (chroma, pitch)."""

from __future__ import annotations

import numba


@numba.njit(nogil=True, cache=True, fastmath=True, inline="always")
def butterflies(re, im, cos_t, sin_t, sign: float) -> None:
    """Radix-2 stages over bit-reversed re/im (length n, a power of two) in place.

    cos_t/sin_t hold cos and sin of 2*pi*k/n for k < n/2; sign -1.0 gives the forward
    transform with sin tables (exp(-i...)), +1.0 uses the twiddles as given.
    """
    n = re.shape[0]
    size = 2
    while size <= n:
        half = size // 2
        step = n // size
        for start in range(0, n, size):
            for k in range(half):
                wr = cos_t[k * step]
                wi = sign * sin_t[k * step]
                a = start + k
                b = a + half
                tr = wr * re[b] - wi * im[b]
                ti = wr * im[b] + wi * re[b]
                re[b] = re[a] - tr
                im[b] = im[a] - ti
                re[a] += tr
                im[a] += ti
        size *= 2
