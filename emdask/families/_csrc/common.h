/* Shared by the compiled kernels: CPU-specific versions, arrays from Python, exp. */
#ifndef EMDASK_COMMON_H
#define EMDASK_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* A function compiled for AVX-512, for AVX2 with FMA and for the baseline, the version
 * picked once when the module loads (x86-64 with GCC; one version elsewhere). Functions it
 * calls are inlined into each version. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define CPU_VERSIONS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_VERSIONS
#endif

/* An argument's array: a C-ordered buffer (shape included) of `need` items of `itemsize`
 * bytes at least, writable when `writable`. On failure a TypeError or ValueError naming the
 * argument is set and -1 returned; the caller releases the buffers it got with
 * PyBuffer_Release. */
static inline int get_array(PyObject *obj, const char *name, Py_ssize_t itemsize, Py_ssize_t need,
                     int writable, Py_buffer *view)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-ordered%s array", name,
                     writable ? " writable" : "");
        return -1;
    }
    if (view->itemsize != itemsize || view->len < need * itemsize) {
        PyErr_Format(PyExc_ValueError,
                     "%s must hold at least %zd items of %zd bytes (got %zd bytes)",
                     name, need, itemsize, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* A 2-d array's shape, or an error naming it. */
static inline int shape2(const Py_buffer *view, const char *name, Py_ssize_t *rows,
                         Py_ssize_t *cols)
{
    if (view->ndim != 2) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-dimensional", name);
        return -1;
    }
    *rows = view->shape[0];
    *cols = view->shape[1];
    return 0;
}

#define LOG2E 1.4426950408889634
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
/* Below this, exp(x) < 1e-307 is taken as 0 (only arguments <= 0 are used: log-densities
 * less the row's maximum, where such terms cannot change a sum that holds a 1). */
#define EXP_FLOOR (-708.0)

/* 1.5 * 2^52: added to a double of magnitude below 2^51, rounds it to an integer held in
 * the low bits of the sum's mantissa. */
#define ROUND_SHIFTER 6755399441055744.0

/* q = exp(q) in place for q <= 0 (NaN-free), in steps the compiler vectorises with any
 * vector instructions (no conversion between doubles and 64-bit integers, which only
 * AVX-512 has): x = n ln 2 + r with |r| <= ln 2 / 2 (n rounded by the shifter), exp(r) by
 * its Taylor polynomial of degree 13 (truncation below 1e-17 relative), 2^n assembled from
 * n's bits in the shifted sum. Agrees with numpy.exp to a few units in the last place;
 * arguments below -708 give 0. */
static inline void exp_nonpositive(double *restrict q, Py_ssize_t size)
{
#pragma omp simd
    for (Py_ssize_t t = 0; t < size; t++) {
        double x = q[t];
        if (x < EXP_FLOOR)
            x = EXP_FLOOR - 1.0;
        const double shifted = x * LOG2E + ROUND_SHIFTER;
        const double n = shifted - ROUND_SHIFTER;
        double r = (x - n * LN2_HI) - n * LN2_LO;
        double p = 1.0 / 6227020800.0;
        p = p * r + 1.0 / 479001600.0;
        p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;
        p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        /* the low bits of the shifted sum are n (two's complement): its biased exponent
         * n + 1023 moved to the exponent field (the shifter's own bits move out) */
        int64_t sb;
        memcpy(&sb, &shifted, sizeof sb);
        const int64_t bits = n >= -1022.0 ? (int64_t)((uint64_t)(sb + 1023) << 52) : 0;
        double scale;
        memcpy(&scale, &bits, sizeof scale);
        q[t] = p * scale;
    }
}

#endif
