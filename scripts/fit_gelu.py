"""Fits the polynomial behind the host GELU kernel (`src/gelu.rs`) and reports its error.

    venv/bin/python scripts/fit_gelu.py

Needs numpy and mpmath (the venv of scripts/side_by_side.py has both: `pip install torch`
brings mpmath through sympy). With `z = |x|/√2` and `t = 1/(1 + z/2)`, the kernel computes
`erfc(z) = t·Q(t)·exp(−z²)`; `Q` is fitted here, by least squares on Chebyshev nodes of
`t ∈ [1/4, 1]` (`z ∈ [0, 6]`), to values of `erfc(z)·exp(z²)/t` computed with 40 digits, as a
polynomial in `u = (8t − 5)/3 ∈ [−1, 1]`. It prints the worst relative error of `erfc` so
computed in `f64` over `z ∈ [0, 6]` for degrees 8 to 12, then the chosen degree's coefficients
(lowest first), as they appear in `src/gelu.rs`.
"""

import mpmath as mp
import numpy as np

DEGREE = 11
mp.mp.dps = 40


def target(t):
    z = 2 * (1 / mp.mpf(t) - 1)
    return float(mp.erfc(z) * mp.exp(z * z) / mp.mpf(t))


def fit(degree, tt, yy):
    c = np.polynomial.chebyshev.chebfit((tt - 0.625) / 0.375, yy, degree)
    return np.polynomial.chebyshev.cheb2poly(c)


def worst_relative_error(p):
    worst = 0.0
    for z in np.linspace(0, 6, 6001):
        t = 1 / (1 + z / 2)
        u = (t - 0.625) / 0.375
        e = t * np.polyval(p[::-1], u) * np.exp(-z * z)
        ref = float(mp.erfc(z))
        worst = max(worst, abs(e - ref) / ref)
    return worst


def main():
    m = 3000
    tt = 0.625 + 0.375 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
    yy = np.array([target(t) for t in tt])
    for degree in range(8, 13):
        print(f"degree {degree}: worst relative error of erfc {worst_relative_error(fit(degree, tt, yy)):.2e}")
    print(f"\nQ, degree {DEGREE}, lowest first:")
    for v in fit(DEGREE, tt, yy):
        print(f"    {float(v)!r},")


if __name__ == "__main__":
    main()
