/* The steps of a chunk and of a block of the compiled Gaussian E-step, for one CPU
 * version: included by gaussian.c once per version, with LANES (rows per vector: one
 * register of the version's widest kind) and VERSION(name) (the version's names) defined,
 * under the version's target options. */

/* LANES rows at once, as one value: in products each lane a row; in sums along the rows,
 * partial sums kept per lane and added up at the end (a reassociated sum). */
typedef double VERSION(lanes) __attribute__((vector_size(8 * LANES), aligned(8), may_alias));
#define lanes_t VERSION(lanes)

typedef int64_t VERSION(mask) __attribute__((vector_size(8 * LANES), aligned(8), may_alias));
#define mask_t VERSION(mask)

/* A LANES x LANES tile transposed in registers: t[c][r] = t[r][c] on return, by log2(LANES)
 * stages that interleave pairs of vectors h = 1, 2, 4 apart. */
STEP void VERSION(transpose_tile)(lanes_t *t)
{
#if LANES == 8
    static const mask_t lo[3] = {{0, 8, 2, 10, 4, 12, 6, 14}, {0, 1, 8, 9, 4, 5, 12, 13},
                                 {0, 1, 2, 3, 8, 9, 10, 11}};
    static const mask_t hi[3] = {{1, 9, 3, 11, 5, 13, 7, 15}, {2, 3, 10, 11, 6, 7, 14, 15},
                                 {4, 5, 6, 7, 12, 13, 14, 15}};
#elif LANES == 4
    static const mask_t lo[2] = {{0, 4, 2, 6}, {0, 1, 4, 5}};
    static const mask_t hi[2] = {{1, 5, 3, 7}, {2, 3, 6, 7}};
#else
    static const mask_t lo[1] = {{0, 2}};
    static const mask_t hi[1] = {{1, 3}};
#endif
    for (int stage = 0, h = 1; h < LANES; stage++, h *= 2)
        for (int r = 0; r < LANES; r++)
            if (!(r & h)) {
                const lanes_t a = t[r], b = t[r + h];
                t[r] = __builtin_shuffle(a, b, lo[stage]);
                t[r + h] = __builtin_shuffle(a, b, hi[stage]);
            }
}

/* Rows of a row-major block (d columns) as columns: xt[l * ld + i] = data[row_i * d + l],
 * row_i = first + i, or sel[i] when sel is given, by tiles of LANES rows and LANES columns
 * transposed in registers. */
STEP void VERSION(transpose_rows)(const double *restrict data, Py_ssize_t d, const i64 *sel,
                                  i64 first, Py_ssize_t nb, Py_ssize_t ld,
                                  double *restrict xt)
{
    const Py_ssize_t tiled = d - d % LANES;
    Py_ssize_t i = 0;
    for (; i + LANES <= nb; i += LANES) {
        const double *row[LANES];
        for (int r = 0; r < LANES; r++)
            row[r] = data + (sel ? sel[i + r] : first + i + r) * d;
        Py_ssize_t l = 0;
        for (; l < tiled; l += LANES) {
            lanes_t t[LANES];
            for (int r = 0; r < LANES; r++)
                t[r] = *(const lanes_t *)(row[r] + l);
            VERSION(transpose_tile)(t);
            for (int r = 0; r < LANES; r++)
                *(lanes_t *)(xt + (l + r) * ld + i) = t[r];
        }
        for (; l < d; l++)
            for (int r = 0; r < LANES; r++)
                xt[l * ld + i + r] = row[r][l];
    }
    for (; i < nb; i++) {
        const double *row = data + (sel ? sel[i] : first + i) * d;
        for (Py_ssize_t l = 0; l < d; l++)
            xt[l * ld + i] = row[l];
    }
}

/* The chunk's rows as columns: x[l * stride + i] = X[sel[i], l]. Rows that follow each other
 * in X (the usual case: every row of the block carries information) are read without the
 * index: a column-major X in place; a row-major X goes through its transpose xt (by tiles,
 * the rows picked by the index or not). */
STEP const double *VERSION(chunk_rows)(const Args *A, const i64 *sel, Py_ssize_t nb,
                                       Py_ssize_t ld, double *restrict xt, Py_ssize_t *stride)
{
    const Py_ssize_t d = A->d, n = A->n;
    const double *data = A->data;
    const i64 s0 = sel[0];
    *stride = ld;
    if (sel[nb - 1] - s0 == nb - 1) {
        if (A->column_major) {
            *stride = n;
            return data + s0;
        }
        VERSION(transpose_rows)(data, d, NULL, s0, nb, ld, xt);
    } else if (A->column_major) {
        for (Py_ssize_t l = 0; l < d; l++)
            for (Py_ssize_t i = 0; i < nb; i++)
                xt[l * ld + i] = data[l * n + sel[i]];
    } else {
        VERSION(transpose_rows)(data, d, sel, 0, nb, ld, xt);
    }
    return xt;
}

/* Register budget: AVX-512 has 32 vector registers, AVX2 and the baseline 16. With 32,
 * products8 holds its eight outputs for two groups of LANES rows (16 sums, each weight
 * loaded once for both) and a moments block is 4 x 4; with 16, products8 goes by halves of
 * four outputs for two groups (8 sums: enough in flight to hide the multiply-add latency)
 * and a moments block is 4 x 2, so that nothing spills to memory in the inner loops. */
#define WIDE_REGISTERS (LANES == 8)
#define GROUPS 2
#define MOMENT_COLUMNS (WIDE_REGISTERS ? 4 : 2)
/* A value loaded once into a register, where the compiler would rather read it from
 * memory at each use (which, in the moments, makes the loop wait on loads). */
#if !WIDE_REGISTERS && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* Zeroes the sums of outputs h0 .. h0 + H - 1 (acc[g][o]: output o of group g). */
STEP void VERSION(products_zero)(const int G, const int H, const int h0,
                                 lanes_t acc[GROUPS][8])
{
    for (int g = 0; g < G; g++)
        for (int o = h0; o < h0 + H; o++)
            acc[g][o] = (lanes_t){0.0};
}

/* Adds inputs s0 <= s < s1 to the sums of outputs h0 .. h0 + H - 1 for G groups of LANES
 * rows from i: acc[g][o] += sum_s w[8 s + o] src[s]. */
STEP void VERSION(products_part)(const int G, const int H, const int h0,
                                 const double *restrict src, Py_ssize_t s0, Py_ssize_t s1,
                                 const double *restrict w, Py_ssize_t ld, Py_ssize_t i,
                                 lanes_t acc[GROUPS][8])
{
    for (Py_ssize_t s = s0; s < s1; s++) {
        lanes_t x[GROUPS];
        for (int g = 0; g < G; g++)
            x[g] = *(const lanes_t *)(src + s * ld + i + g * LANES);
        for (int o = h0; o < h0 + H; o++) {
            const double wo = w[8 * s + o];
            for (int g = 0; g < G; g++)
                acc[g][o] += wo * x[g];
        }
    }
}

/* Adds inputs s0 .. s0 + H - 1 to outputs h0 .. h0 + H - 1, input s0 + s only to outputs
 * h0 + s and above (a triangle of U: w is zero below it), unrolled so that no zero weight is
 * multiplied. */
STEP void VERSION(products_triangle)(const int G, const int H, const int h0,
                                     const double *restrict src, Py_ssize_t s0,
                                     const double *restrict w, Py_ssize_t ld, Py_ssize_t i,
                                     lanes_t acc[GROUPS][8])
{
#pragma GCC unroll 8
    for (int s = 0; s < H; s++) {
        lanes_t x[GROUPS];
        for (int g = 0; g < G; g++)
            x[g] = *(const lanes_t *)(src + (s0 + s) * ld + i + g * LANES);
#pragma GCC unroll 8
        for (int o = h0 + s; o < h0 + H; o++) {
            const double wo = w[8 * (s0 + s) + o];
            for (int g = 0; g < G; g++)
                acc[g][o] += wo * x[g];
        }
    }
}

/* Stores outputs h0 .. h0 + H - 1 (those below n_out) and adds their squares to q. */
STEP void VERSION(products_store)(const int G, const int H, const int h0,
                                  lanes_t acc[GROUPS][8], double *restrict dst,
                                  Py_ssize_t n_out, Py_ssize_t ld, Py_ssize_t i,
                                  double *restrict q)
{
    for (int g = 0; g < G; g++) {
        if (dst)
            for (int o = h0; o < h0 + H; o++)
                if (o < n_out)
                    *(lanes_t *)(dst + o * ld + i + g * LANES) = acc[g][o];
        if (q) {
            lanes_t sq = *(lanes_t *)(q + i + g * LANES);
            for (int o = h0; o < h0 + H; o++)
                sq += acc[g][o] * acc[g][o];
            *(lanes_t *)(q + i + g * LANES) = sq;
        }
    }
}

/* Up to eight outputs at a time: dst[o] = sum_s w[8 s + o] src[s] for s < n_in and
 * o < n_out, G groups of LANES rows (from i); inputs from n_all on only reach outputs 4..
 * (w is zero for the others: the lower half of U's diagonal block); with q,
 * q += sum_o dst[o]^2 on the way. Each row's sums are the same whatever G. With 32
 * registers the eight outputs at once; with 16 by halves, the second with sums of its own
 * (with the first half's reused, the compiler moves registers around at every step). */
STEP void VERSION(products8)(const int G, const double *restrict src, Py_ssize_t n_in,
                             Py_ssize_t n_all, const double *restrict w,
                             double *restrict dst, Py_ssize_t n_out, Py_ssize_t ld,
                             Py_ssize_t i, double *restrict q)
{
    lanes_t acc[GROUPS][8];
#if WIDE_REGISTERS
    VERSION(products_zero)(G, 8, 0, acc);
    VERSION(products_part)(G, 8, 0, src, 0, n_all, w, ld, i, acc);
    VERSION(products_part)(G, 4, 4, src, n_all, n_in, w, ld, i, acc);
    VERSION(products_store)(G, 8, 0, acc, dst, n_out, ld, i, q);
#else
    VERSION(products_zero)(G, 4, 0, acc);
    VERSION(products_part)(G, 4, 0, src, 0, n_all, w, ld, i, acc);
    VERSION(products_store)(G, 4, 0, acc, dst, n_out, ld, i, q);
    if (n_out > 4) {
        lanes_t acc2[GROUPS][8];
        VERSION(products_zero)(G, 4, 4, acc2);
        VERSION(products_part)(G, 4, 4, src, 0, n_in, w, ld, i, acc2);
        VERSION(products_store)(G, 4, 4, acc2, dst, n_out, ld, i, q);
    }
#endif
}

/* products8 for a full block of eight of U's columns o0 .. o0 + 7 (dst[o] = sum_s
 * w[8 s + o] src[s], s < o0 + 8): inputs below o0 reach every output, the last eight form
 * the triangle of U's diagonal block, where input o0 + s reaches outputs s and above only
 * (no zero weight multiplied). Each row's sums are added in products8's order. */
STEP void VERSION(upper_products8)(const int G, const double *restrict src, Py_ssize_t o0,
                                   const double *restrict w, double *restrict dst,
                                   Py_ssize_t ld, Py_ssize_t i, double *restrict q)
{
    lanes_t acc[GROUPS][8];
#if WIDE_REGISTERS
    VERSION(products_zero)(G, 8, 0, acc);
    VERSION(products_part)(G, 8, 0, src, 0, o0, w, ld, i, acc);
    VERSION(products_triangle)(G, 8, 0, src, o0, w, ld, i, acc);
    VERSION(products_store)(G, 8, 0, acc, dst, 8, ld, i, q);
#else
    VERSION(products_zero)(G, 4, 0, acc);
    VERSION(products_part)(G, 4, 0, src, 0, o0, w, ld, i, acc);
    VERSION(products_triangle)(G, 4, 0, src, o0, w, ld, i, acc);
    VERSION(products_store)(G, 4, 0, acc, dst, 8, ld, i, q);
    lanes_t acc2[GROUPS][8];
    VERSION(products_zero)(G, 4, 4, acc2);
    VERSION(products_part)(G, 4, 4, src, 0, o0 + 4, w, ld, i, acc2);
    VERSION(products_triangle)(G, 4, 4, src, o0 + 4, w, ld, i, acc2);
    VERSION(products_store)(G, 4, 4, acc2, dst, 8, ld, i, q);
#endif
}

/* products8 for one row i (the rows past the last LANES). */
STEP void VERSION(products1)(const double *restrict src, Py_ssize_t n_in,
                             const double *restrict w, double *restrict dst, Py_ssize_t n_out,
                             Py_ssize_t ld, Py_ssize_t i, double *restrict q)
{
    double acc[8] = {0.0};
    for (Py_ssize_t s = 0; s < n_in; s++)
        for (int o = 0; o < 8; o++)
            acc[o] += w[8 * s + o] * src[s * ld + i];
    if (dst)
        for (int o = 0; o < 8; o++)
            if (o < n_out)
                dst[o * ld + i] = acc[o];
    if (q)
        for (int o = 0; o < 8; o++)
            q[i] += acc[o] * acc[o];
}

/* U's columns ob .. ob + 7 as the weights of products8 for c U: w[8 m + o] = U[m, ob + o]
 * for m <= ob + o < d, else 0 (m < ob + 8). */
STEP void VERSION(upper_columns8)(const double *U, Py_ssize_t d, Py_ssize_t ob,
                                  double *restrict w)
{
    const Py_ssize_t n_out = d - ob < 8 ? d - ob : 8;
    for (Py_ssize_t m = 0; m < ob + n_out; m++)
        for (int o = 0; o < 8; o++)
            w[8 * m + o] = o < n_out && m <= ob + o ? U[m * d + ob + o] : 0.0;
}

/* chunk_products for G groups of LANES rows from i (G fixed at compile time). */
STEP void VERSION(group_products)(const int G, const double *restrict x, Py_ssize_t stride,
                                  const double *restrict mu, Py_ssize_t d, Py_ssize_t blocks,
                                  const double *restrict w, double *restrict cj,
                                  double *restrict yj, double *restrict qj, Py_ssize_t ld,
                                  Py_ssize_t i)
{
    for (Py_ssize_t l = 0; l < d; l++)
        for (int g = 0; g < G; g++) {
            const Py_ssize_t r = i + g * LANES;
            const lanes_t xl = *(const lanes_t *)(x + l * stride + r);
            const mask_t seen = xl == xl;
            *(lanes_t *)(cj + l * ld + r) = (lanes_t)((mask_t)(xl - mu[l]) & seen);
        }
    for (Py_ssize_t ob = 0; ob < blocks; ob++) {
        const Py_ssize_t o0 = 8 * ob, n_out = d - o0 < 8 ? d - o0 : 8;
        if (n_out == 8)
            VERSION(upper_products8)(G, cj, o0, w + 8 * d * ob, yj ? yj + o0 * ld : NULL, ld,
                                     i, qj);
        else /* the last, partial block */
            VERSION(products8)(G, cj, o0 + n_out, o0 + (n_out < 4 ? n_out : 4),
                               w + 8 * d * ob, yj ? yj + o0 * ld : NULL, n_out, ld, i, qj);
    }
}

/* c[j] = x - mu_j with zeros in the missing cells, y[j] = c_j U_j (unless y is NULL) and
 * q[j] = const_j - |c_j U_j|^2 / 2 (U_j upper triangular: only its upper triangle is read),
 * LANES rows at a time, each step on rows still in the core's first cache. x: the chunk's
 * rows as columns (row stride `stride`); w: scratch of 8 d (d + 7) / 8. */
STEP void VERSION(chunk_products)(const Args *A, const double *restrict x, Py_ssize_t stride,
                                  Py_ssize_t nb, Py_ssize_t ld, double *restrict c,
                                  double *restrict y, double *restrict q, double *restrict w)
{
    const Py_ssize_t k = A->k, d = A->d, blocks = (d + 7) / 8;
    for (Py_ssize_t j = 0; j < k; j++) {
        const double *U = A->chol + j * d * d, *mu = A->means + j * d;
        double *restrict cj = c + j * d * ld, *restrict yj = y ? y + j * d * ld : NULL,
                        *restrict qj = q + j * nb;
        for (Py_ssize_t ob = 0; ob < blocks; ob++)
            VERSION(upper_columns8)(U, d, 8 * ob, w + 8 * d * ob);
        for (Py_ssize_t i = 0; i < nb; i++)
            qj[i] = 0.0;
        Py_ssize_t i = 0;
        for (; i + GROUPS * LANES <= nb; i += GROUPS * LANES)
            VERSION(group_products)(GROUPS, x, stride, mu, d, blocks, w, cj, yj, qj, ld, i);
        for (; i + LANES <= nb; i += LANES)
            VERSION(group_products)(1, x, stride, mu, d, blocks, w, cj, yj, qj, ld, i);
        for (; i < nb; i++) { /* rows past the last LANES */
            for (Py_ssize_t l = 0; l < d; l++) {
                const double xl = x[l * stride + i];
                cj[l * ld + i] = xl == xl ? xl - mu[l] : 0.0;
            }
            for (Py_ssize_t ob = 0; ob < blocks; ob++) {
                const Py_ssize_t o0 = 8 * ob, n_out = d - o0 < 8 ? d - o0 : 8;
                VERSION(products1)(cj, o0 + n_out, w + 8 * d * ob, yj ? yj + o0 * ld : NULL,
                                   n_out, ld, i, qj);
            }
        }
        const double cn = A->cnst[j];
#pragma omp simd
        for (Py_ssize_t i = 0; i < nb; i++)
            qj[i] = cn - 0.5 * qj[i];
    }
}

/* g[j] = U_j y[j] (U_j upper triangular). w: scratch of 8 d. */
STEP void VERSION(upper_times)(const Args *A, const double *restrict y, Py_ssize_t nb,
                               Py_ssize_t ld, double *restrict g, double *restrict w)
{
    const Py_ssize_t k = A->k, d = A->d;
    for (Py_ssize_t j = 0; j < k; j++) {
        const double *U = A->chol + j * d * d;
        for (Py_ssize_t ab = 0; ab < d; ab += 8) {
            /* outputs ab.. from inputs ab .. d - 1: g[a] = sum_{l >= a} U[a, l] y[l] */
            const Py_ssize_t n_out = d - ab < 8 ? d - ab : 8, n_in = d - ab;
            for (Py_ssize_t s = 0; s < n_in; s++)
                for (int o = 0; o < 8; o++)
                    w[8 * s + o] = o < n_out && s >= o ? U[(ab + o) * d + ab + s] : 0.0;
            const double *yb = y + (j * d + ab) * ld;
            double *gb = g + (j * d + ab) * ld;
            Py_ssize_t i = 0;
            for (; i + GROUPS * LANES <= nb; i += GROUPS * LANES)
                VERSION(products8)(GROUPS, yb, n_in, n_in, w, gb, n_out, ld, i, NULL);
            for (; i + LANES <= nb; i += LANES)
                VERSION(products8)(1, yb, n_in, n_in, w, gb, n_out, ld, i, NULL);
            for (; i < nb; i++)
                VERSION(products1)(yb, n_in, w, gb, n_out, ld, i, NULL);
        }
    }
}

/* The conditional terms of row i missing m cells (M: m fixed at compile time, or 0 for a
 * count read at run time), from v (k, m) flat, the values (x0 P_j)_m. For component j: the
 * missing cells' conditional mean, centred on mu_j, -P_mm^-1 v_j into c, and
 * v_j^T P_mm^-1 v_j / 2 plus the pattern's correction added to q. z: scratch of m. */
STEP void VERSION(conditional_terms)(const int M, Py_ssize_t m, const Args *A, Py_ssize_t i,
                                     Py_ssize_t nb, Py_ssize_t ld, const i64 *cols,
                                     const double *tab, double *restrict c, double *restrict q,
                                     const double *v, double *restrict z)
{
    const Py_ssize_t k = A->k, d = A->d, n = M ? M : m;
    for (Py_ssize_t j = 0; j < k; j++) {
        const double *inv = tab + k + j * n * n;
        const double *vj = v + j * n;
        double vz = 0.0;
        for (Py_ssize_t a = 0; a < n; a++) {
            double za = 0.0;
            for (Py_ssize_t b = 0; b < n; b++)
                za += inv[a * n + b] * vj[b];
            z[a] = za;
            vz += vj[a] * za;
        }
        for (Py_ssize_t a = 0; a < n; a++)
            c[(j * d + cols[a]) * ld + i] = -z[a];
        q[j * nb + i] += 0.5 * vz + tab[j];
    }
}

/* Rows missing more cells than this take their conditional terms one at a time (the
 * vectors of a run stay on the stack). */
#define RUN_MAX_MISSING 32

/* conditional_terms for LANES rows i .. i + LANES - 1 of one pattern at once (rows in pattern
 * order lie in runs of the same pattern), v read from g = U_j y (the whole chunk's): each
 * row's sums are conditional_terms' own, in the same order. */
STEP void VERSION(conditional_terms_lanes)(const int M, Py_ssize_t m, const Args *A,
                                           Py_ssize_t i, Py_ssize_t nb, Py_ssize_t ld,
                                           const i64 *cols, const double *tab,
                                           const double *restrict g, double *restrict c,
                                           double *restrict q)
{
    const Py_ssize_t k = A->k, d = A->d, n = M ? M : m;
    lanes_t v[M ? M : RUN_MAX_MISSING], z[M ? M : RUN_MAX_MISSING];
    for (Py_ssize_t j = 0; j < k; j++) {
        const double *inv = tab + k + j * n * n;
        for (Py_ssize_t a = 0; a < n; a++)
            v[a] = *(const lanes_t *)(g + (j * d + cols[a]) * ld + i);
        lanes_t vz = (lanes_t){0.0};
        for (Py_ssize_t a = 0; a < n; a++) {
            lanes_t za = (lanes_t){0.0};
            for (Py_ssize_t b = 0; b < n; b++)
                za += inv[a * n + b] * v[b];
            z[a] = za;
            vz += v[a] * za;
        }
        for (Py_ssize_t a = 0; a < n; a++)
            *(lanes_t *)(c + (j * d + cols[a]) * ld + i) = -z[a];
        lanes_t *qj = (lanes_t *)(q + j * nb + i);
        *qj += 0.5 * vz + tab[j];
    }
}

/* conditional_terms_lanes for the row incomplete[t] and the LANES - 1 after it, if they
 * follow each other in the chunk, share its pattern and miss at most RUN_MAX_MISSING
 * cells; whether they did. */
STEP int VERSION(run_terms)(const Args *A, const i64 *incomplete, Py_ssize_t n_inc,
                            Py_ssize_t t, const i64 *pc, Py_ssize_t nb, Py_ssize_t ld,
                            const double *restrict g, double *restrict c, double *restrict q)
{
    const Py_ssize_t i = incomplete[t];
    if (t + LANES > n_inc || incomplete[t + LANES - 1] != i + LANES - 1)
        return 0;
    const i64 p = pc[i];
    for (int r = 1; r < LANES; r++)
        if (pc[i + r] != p)
            return 0;
    const Py_ssize_t m = A->pat_m[p];
    if (m > RUN_MAX_MISSING)
        return 0;
    const i64 *cols = A->cols + A->col_off[p];
    const double *tab = A->table + A->off[p];
    switch (m) { /* the same loop, compiled for each small count */
    case 1: VERSION(conditional_terms_lanes)(1, m, A, i, nb, ld, cols, tab, g, c, q); break;
    case 2: VERSION(conditional_terms_lanes)(2, m, A, i, nb, ld, cols, tab, g, c, q); break;
    case 3: VERSION(conditional_terms_lanes)(3, m, A, i, nb, ld, cols, tab, g, c, q); break;
    case 4: VERSION(conditional_terms_lanes)(4, m, A, i, nb, ld, cols, tab, g, c, q); break;
    default: VERSION(conditional_terms_lanes)(0, m, A, i, nb, ld, cols, tab, g, c, q); break;
    }
    return 1;
}

/* Observed-part log-probabilities of a chunk, less each row's maximum (top, 0 where it is
 * not finite), and for rows missing cells the conditional means of those cells.
 *
 * On entry y and q are as chunk_products leaves them: y the row centred on mu_j with zeros
 * in its missing cells (x0) times U_j. For a row missing cells m, with v = (x0 P_j)_m (from
 * y and the rows m of U_j), the conditional mean of the missing cells, centred on mu_j, is
 * -P_mm^-1 v (into c) and the Mahalanobis term of the observed cells |y|^2 - v^T P_mm^-1 v.
 * incomplete: positions in the chunk of rows missing cells; pc: each row's pattern rank. */
STEP void VERSION(chunk_log_prob)(const Args *A, const double *restrict y,
                                  const i64 *incomplete, Py_ssize_t n_inc, const i64 *pc,
                                  Py_ssize_t nb, Py_ssize_t ld, double *restrict c,
                                  double *restrict q, double *restrict v, double *restrict z,
                                  double *restrict g, double *restrict w, double *restrict top)
{
    const Py_ssize_t k = A->k, d = A->d;
    /* v row by row costs the sum of (d - column) per missing cell; for many such cells the
     * whole chunk's y U_j^T at once (vectorised along the rows) is cheaper */
    Py_ssize_t work = 0;
    for (Py_ssize_t t = 0; t < n_inc; t++) {
        const i64 p = pc[incomplete[t]];
        const i64 *cols = A->cols + A->col_off[p];
        for (Py_ssize_t a = 0; a < A->pat_m[p]; a++)
            work += d - cols[a];
    }
    const int whole = 8 * work > nb * d * (d + 1) / 2;
    if (whole)
        VERSION(upper_times)(A, y, nb, ld, g, w);
    for (Py_ssize_t t = 0; t < n_inc; t++) {
        const Py_ssize_t i = incomplete[t];
        const i64 p = pc[i];
        const Py_ssize_t m = A->pat_m[p];
        const i64 *cols = A->cols + A->col_off[p];
        if (whole && VERSION(run_terms)(A, incomplete, n_inc, t, pc, nb, ld, g, c, q)) {
            t += LANES - 1;
            continue;
        }
        for (Py_ssize_t j = 0; j < k; j++)
            for (Py_ssize_t a = 0; a < m; a++) {
                const i64 ca = cols[a];
                if (whole) {
                    v[j * m + a] = g[(j * d + ca) * ld + i];
                } else {
                    const double *U = A->chol + (j * d + ca) * d;
                    double va = 0.0;
                    for (Py_ssize_t l = ca; l < d; l++)
                        va += U[l] * y[(j * d + l) * ld + i];
                    v[j * m + a] = va;
                }
            }
        const double *tab = A->table + A->off[p];
        switch (m) { /* the same loop, compiled for each small count */
        case 1: VERSION(conditional_terms)(1, m, A, i, nb, ld, cols, tab, c, q, v, z); break;
        case 2: VERSION(conditional_terms)(2, m, A, i, nb, ld, cols, tab, c, q, v, z); break;
        case 3: VERSION(conditional_terms)(3, m, A, i, nb, ld, cols, tab, c, q, v, z); break;
        case 4: VERSION(conditional_terms)(4, m, A, i, nb, ld, cols, tab, c, q, v, z); break;
        default: VERSION(conditional_terms)(0, m, A, i, nb, ld, cols, tab, c, q, v, z); break;
        }
    }
    for (Py_ssize_t i = 0; i < nb; i++)
        top[i] = -INFINITY;
    for (Py_ssize_t j = 0; j < k; j++) {
        const double *restrict qj = q + j * nb;
#pragma omp simd
        for (Py_ssize_t i = 0; i < nb; i++)
            top[i] = qj[i] > top[i] ? qj[i] : top[i];
    }
    for (Py_ssize_t i = 0; i < nb; i++)
        if (top[i] == -INFINITY)
            top[i] = 0.0;
    for (Py_ssize_t j = 0; j < k; j++) {
        double *restrict qj = q + j * nb;
#pragma omp simd
        for (Py_ssize_t i = 0; i < nb; i++)
            qj[i] -= top[i];
    }
}

/* Responsibilities of a chunk (e: exp of the log-probabilities less the row maximum top,
 * overwritten), their sums, and their sums per pattern for the rows missing cells; adds
 * the chunk's weighted log-likelihood and row count. Each row's total lies in [1, k] (its
 * largest term is exp(0) = 1), so without weights one log of a product of 32 totals
 * replaces 32 logs. */
STEP void VERSION(chunk_weigh)(const Args *A, double *restrict e, const double *restrict top,
                               const i64 *sel, const i64 *incomplete, Py_ssize_t n_inc,
                               const i64 *pc, Py_ssize_t nb, double *restrict total,
                               double *restrict scale, double *resp_by_pattern, double *loglik,
                               double *n_rows)
{
    const Py_ssize_t k = A->k;
    for (Py_ssize_t i = 0; i < nb; i++)
        total[i] = 0.0;
    for (Py_ssize_t j = 0; j < k; j++) {
        const double *restrict ej = e + j * nb;
#pragma omp simd
        for (Py_ssize_t i = 0; i < nb; i++)
            total[i] += ej[i];
    }
    double ll = 0.0, nr = 0.0;
    if (A->weighted) {
        for (Py_ssize_t i = 0; i < nb; i++) {
            const double wi = A->weights[sel[i]];
            scale[i] = wi / total[i];
            ll += wi * (log(total[i]) + top[i]);
            nr += wi;
        }
    } else {
#pragma omp simd reduction(+ : ll)
        for (Py_ssize_t i = 0; i < nb; i++) {
            scale[i] = 1.0 / total[i];
            ll += top[i];
        }
        for (Py_ssize_t a = 0; a < nb; a += 32) {
            double prod = 1.0;
            for (Py_ssize_t i = a; i < (a + 32 < nb ? a + 32 : nb); i++)
                prod *= total[i];
            ll += log(prod);
        }
        nr = (double)nb;
    }
    *loglik += ll;
    *n_rows += nr;
    for (Py_ssize_t j = 0; j < k; j++) {
        double *restrict ej = e + j * nb;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (Py_ssize_t i = 0; i < nb; i++) {
            const double r = ej[i] * scale[i];
            ej[i] = r;
            s += r;
        }
        A->nk[j] += s;
    }
    for (Py_ssize_t t = 0; t < n_inc; t++) {
        const Py_ssize_t i = incomplete[t];
        double *rp = resp_by_pattern + pc[i] * k;
        for (Py_ssize_t j = 0; j < k; j++)
            rp[j] += e[j * nb + i];
    }
}

/* One 4 x C block of sum_i r_i c_i c_i^T: rows lb.. (cl) against columns mb.. (cm), into
 * the lane sums la (row stride d), the rows past the last LANES into lower (row stride d).
 * A block on the diagonal (DIAG, mb = lb + OFF) takes only its entries on and below the
 * diagonal, and sums the weighted rows of its columns into ls1 and s1. */
STEP void VERSION(moments_block)(const int C, const int DIAG, const int OFF,
                                 const double *restrict r, const double *restrict cl,
                                 const double *restrict cm, Py_ssize_t nb, Py_ssize_t ld,
                                 lanes_t *restrict la, lanes_t *restrict ls1,
                                 double *restrict lower, double *restrict s1, Py_ssize_t d)
{
#define TAKEN(s, o) (!DIAG || (o) + OFF <= (s))
    lanes_t a[4][4], b[4];
    for (int s = 0; s < 4; s++)
        for (int o = 0; o < C; o++)
            a[s][o] = TAKEN(s, o) ? la[s * d + o] : (lanes_t){0.0};
    for (int o = 0; o < C; o++)
        b[o] = DIAG ? ls1[o] : (lanes_t){0.0};
    Py_ssize_t i = 0;
    for (; i + LANES <= nb; i += LANES) {
        lanes_t x[4], w[4];
        const lanes_t ri = *(const lanes_t *)(r + i);
        for (int o = 0; o < C; o++)
            w[o] = ri * *(const lanes_t *)(cm + o * ld + i);
        for (int s = 0; s < 4; s++) {
            x[s] = *(const lanes_t *)(cl + s * ld + i);
            IN_REGISTER(x[s]);
        }
        for (int s = 0; s < 4; s++)
            for (int o = 0; o < C; o++)
                if (TAKEN(s, o))
                    a[s][o] += x[s] * w[o];
        if (DIAG)
            for (int o = 0; o < C; o++)
                b[o] += w[o];
    }
    for (int s = 0; s < 4; s++)
        for (int o = 0; o < C; o++)
            if (TAKEN(s, o))
                la[s * d + o] = a[s][o];
    if (DIAG)
        for (int o = 0; o < C; o++)
            ls1[o] = b[o];
    for (; i < nb; i++) { /* rows past the last LANES */
        double x[4], w[4];
        for (int o = 0; o < C; o++)
            w[o] = r[i] * cm[o * ld + i];
        for (int s = 0; s < 4; s++)
            x[s] = cl[s * ld + i];
        for (int s = 0; s < 4; s++)
            for (int o = 0; o < C; o++)
                if (TAKEN(s, o))
                    lower[s * d + o] += x[s] * w[o];
        if (DIAG)
            for (int o = 0; o < C; o++)
                s1[o] += w[o];
    }
#undef TAKEN
}

/* lower[j] += sum_i r_ji c_j[:, i] c_j[:, i]^T on and below the diagonal, by 4 x C blocks
 * held in registers, and s1[j] += sum_i r_ji c_j[:, i] on the way. Up to the last full
 * block of four rows, LANES rows at a time into the lane sums `lanes` ((k, d + 1, d): per
 * component the lower triangle, then s1), added up by lane_totals at the end of the block:
 * once per block, not per chunk. */
STEP void VERSION(lower_moments)(const Args *A, const double *restrict c,
                                 const double *restrict r, Py_ssize_t nb, Py_ssize_t ld,
                                 lanes_t *restrict lanes)
{
    const Py_ssize_t k = A->k, d = A->d, full = d - d % 4;
    const int C = MOMENT_COLUMNS;
    for (Py_ssize_t j = 0; j < k; j++) {
        const double *cj = c + j * d * ld, *rj = r + j * nb;
        double *lower = A->lower + j * d * d, *s1 = A->s1 + j * d;
        lanes_t *la = lanes + j * (d + 1) * d, *ls1 = la + d * d;
        for (Py_ssize_t lb = 0; lb < full; lb += 4) {
            for (Py_ssize_t mb = 0; mb < lb; mb += C)
                VERSION(moments_block)(C, 0, 0, rj, cj + lb * ld, cj + mb * ld, nb, ld,
                                       la + lb * d + mb, NULL, lower + lb * d + mb, NULL, d);
            /* the blocks on the diagonal, whose passes also sum the weighted rows */
            VERSION(moments_block)(C, 1, 0, rj, cj + lb * ld, cj + lb * ld, nb, ld,
                                   la + lb * d + lb, ls1 + lb, lower + lb * d + lb, s1 + lb,
                                   d);
            if (C == 2)
                VERSION(moments_block)(C, 1, 2, rj, cj + lb * ld, cj + (lb + 2) * ld, nb,
                                       ld, la + lb * d + lb + 2, ls1 + lb + 2,
                                       lower + lb * d + lb + 2, s1 + lb + 2, d);
        }
        /* rows past the last full block of four */
        for (Py_ssize_t l = full; l < d; l++) {
            const double *restrict cl = cj + l * ld;
            for (Py_ssize_t m = 0; m <= l; m++) {
                const double *restrict cm = cj + m * ld;
                double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                for (Py_ssize_t i = 0; i < nb; i++)
                    acc += rj[i] * cl[i] * cm[i];
                lower[l * d + m] += acc;
            }
            double acc = 0.0;
#pragma omp simd reduction(+ : acc)
            for (Py_ssize_t i = 0; i < nb; i++)
                acc += rj[i] * cl[i];
            s1[l] += acc;
        }
    }
}

/* The lane sums of lower_moments added to the moments. */
STEP void VERSION(lane_totals)(const Args *A, const lanes_t *lanes)
{
    const Py_ssize_t k = A->k, d = A->d, full = d - d % 4;
    for (Py_ssize_t j = 0; j < k; j++) {
        const lanes_t *la = lanes + j * (d + 1) * d, *ls1 = la + d * d;
        for (Py_ssize_t l = 0; l < full; l++) {
            for (Py_ssize_t m = 0; m <= l; m++) {
                double t = 0.0;
                for (int e = 0; e < LANES; e++)
                    t += la[l * d + m][e];
                A->lower[(j * d + l) * d + m] += t;
            }
            double t = 0.0;
            for (int e = 0; e < LANES; e++)
                t += ls1[l][e];
            A->s1[j * d + l] += t;
        }
    }
}

static int VERSION(block_stats)(const Args *A, double *loglik_out, double *n_rows_out)
{
    const Py_ssize_t k = A->k, d = A->d, n_in = A->n_in, n_pat = A->n_pat;
    int status = pattern_tables(A);
    if (status)
        return status;
    Py_ssize_t max_m = 1;
    for (Py_ssize_t p = 0; p < n_pat; p++)
        max_m = A->pat_m[p] > max_m ? A->pat_m[p] : max_m;
    const Py_ssize_t b = A->chunk < n_in ? A->chunk : n_in;
    const Py_ssize_t ld = row_stride(b);
    double *resp_by_pattern = A->work;
    memset(resp_by_pattern, 0, (size_t)(n_pat * k) * sizeof(double));
    /* the chunks' scratch: the caller's, kept between blocks (fresh allocations cost page
     * faults at every block in Dask workers, whose allocator hands large blocks back to
     * the system), from a 64-byte boundary */
    double *mem = A->work + n_pat * k;
    mem += (64 - (uintptr_t)mem % 64) % 64 / sizeof(double);
    lanes_t *lanes = (lanes_t *)take_lines(&mem, k * (d + 1) * d * LANES, 0);
    memset(lanes, 0, (size_t)(k * (d + 1) * d) * sizeof(lanes_t));
    /* each array from a cache line (whole vectors never straddle two), the large ones a
     * line apart besides, so that the same row of two of them is not 4 KiB apart (loads
     * would wait on stores to the other) */
    double *c = take_lines(&mem, k * d * ld, 1), *y = take_lines(&mem, k * d * ld, 1),
           *g = take_lines(&mem, k * d * ld, 1), *xt = take_lines(&mem, d * ld, 1),
           *q = take_lines(&mem, k * b, 0), *top = take_lines(&mem, b, 0),
           *tot = take_lines(&mem, b, 0), *scale = take_lines(&mem, b, 0),
           *v = take_lines(&mem, k * max_m, 0), *z = take_lines(&mem, max_m, 0),
           *w = take_lines(&mem, d * (d + 8), 0);
    i64 *inc = (i64 *)mem;
    double loglik = 0.0, n_rows = 0.0;
    for (Py_ssize_t start = 0; start < n_in; start += b) {
        const Py_ssize_t nb = b < n_in - start ? b : n_in - start;
        const i64 *sel = A->rows + start, *pc = A->pats + start;
        Py_ssize_t n_inc = 0;
        for (Py_ssize_t i = 0; i < nb; i++)
            if (A->pat_m[pc[i]] > 0)
                inc[n_inc++] = i;
        Py_ssize_t stride;
        const double *x = VERSION(chunk_rows)(A, sel, nb, ld, xt, &stride);
        /* y only where rows miss cells (their conditional terms read it) */
        VERSION(chunk_products)(A, x, stride, nb, ld, c, n_inc ? y : NULL, q, w);
        VERSION(chunk_log_prob)(A, y, inc, n_inc, pc, nb, ld, c, q, v, z, g, w, top);
        exp_nonpositive(q, k * nb);
        VERSION(chunk_weigh)(A, q, top, sel, inc, n_inc, pc, nb, tot, scale, resp_by_pattern,
                             &loglik, &n_rows);
        VERSION(lower_moments)(A, c, q, nb, ld, lanes);
    }
    VERSION(lane_totals)(A, lanes);
    add_conditional_covariance(A, resp_by_pattern);
    *loglik_out = loglik;
    *n_rows_out = n_rows;
    return 0;
}

#undef lanes_t
#undef mask_t
#undef GROUPS
#undef WIDE_REGISTERS
#undef MOMENT_COLUMNS
#undef IN_REGISTER
#undef RUN_MAX_MISSING
