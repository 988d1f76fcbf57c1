/* The compiled Gaussian E-step under full (or tied) covariances: one call per block.
 *
 * find_patterns: a block's informative rows (some cell observed, weight above zero) and
 * their missingness patterns. dense_block_stats: per pattern and component the tables of
 * P_mm^-1 and the log-density correction, then per chunk of rows, rows along the last axis
 * so that every step runs along the rows (vectorised): rows centred on each component's
 * mean (missing cells zero), times U_j; the conditional terms of the rows missing cells
 * (one loop, specialised by the compiler for each small missing count); exp;
 * responsibilities; the second moments. The numpy steps of emdask.families._kernels are the
 * reference the tests compare these with; emdask.families._compiled is the Python side
 * (the named groups of arrays these functions read by attribute, and the errors).
 *
 * Sums along the rows may be reassociated (`omp simd reduction`): results agree with the
 * numpy steps to rounding. The GIL is released while a block is computed. */
#include "common.h"

/* Everything a top-level compute function calls is inlined into each CPU version. */
#define STEP static inline __attribute__((always_inline))

#define MAX_KEY_FEATURES 62
#define TABLE_FEATURES 16
#define SORT_TABLE_BYTES (1 << 20)

#define ERR_MEMORY (-1)
#define ERR_ILL_DEFINED (-2)
#define ERR_INDEX (-3)

typedef int64_t i64;

static void *alloc_doubles(Py_ssize_t n)
{
    size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(double) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes);
}

/* ---------------------------------------------------------------------------------------
 * Arrays from the named groups
 * ------------------------------------------------------------------------------------- */

#define MAX_VIEWS 24

typedef struct {
    Py_buffer views[MAX_VIEWS];
    int count;
} Views;

static void release_views(Views *v)
{
    for (int i = 0; i < v->count; i++)
        PyBuffer_Release(&v->views[i]);
    v->count = 0;
}

/* Attribute `name` of `group` as a C-contiguous array of at least `need` items; its view
 * (shape included) kept in `v` until release_views. NULL with an exception set on failure. */
static Py_buffer *field(PyObject *group, const char *name, Py_ssize_t itemsize,
                        Py_ssize_t need, int writable, Views *v)
{
    PyObject *obj = PyObject_GetAttrString(group, name);
    if (obj == NULL)
        return NULL;
    Py_buffer *view = &v->views[v->count];
    int failed = get_array(obj, name, itemsize, need, writable, view);
    Py_DECREF(obj);
    if (failed)
        return NULL;
    v->count++;
    return view;
}

static int flag(PyObject *group, const char *name)
{
    PyObject *obj = PyObject_GetAttrString(group, name);
    if (obj == NULL)
        return -1;
    int truth = PyObject_IsTrue(obj);
    Py_DECREF(obj);
    return truth;
}

static Py_ssize_t items(const Py_buffer *view) { return view->len / view->itemsize; }

/* ---------------------------------------------------------------------------------------
 * Missingness patterns
 * ------------------------------------------------------------------------------------- */

/* idx[0..n) = 0..n-1 ordered by (key[i], then tie[i] when tie, then i): a merge sort,
 * stable; tmp: scratch of n. */
static void sort_indices(i64 *restrict idx, Py_ssize_t n, const i64 *key, const i64 *tie,
                         i64 *restrict tmp)
{
    for (Py_ssize_t i = 0; i < n; i++)
        idx[i] = i;
    i64 *src = idx, *dst = tmp;
    for (Py_ssize_t width = 1; width < n; width *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * width) {
            Py_ssize_t mid = lo + width < n ? lo + width : n;
            Py_ssize_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            Py_ssize_t a = lo, b = mid, at = lo;
            while (a < mid && b < hi) {
                i64 x = src[a], y = src[b];
                int take_b = key[y] < key[x] || (tie && key[y] == key[x] && tie[y] < tie[x]);
                dst[at++] = take_b ? src[b++] : src[a++];
            }
            while (a < mid)
                dst[at++] = src[a++];
            while (b < hi)
                dst[at++] = src[b++];
        }
        i64 *swap = src;
        src = dst;
        dst = swap;
    }
    if (src != idx)
        memcpy(idx, src, (size_t)n * sizeof(i64));
}

/* Rows carrying information, in order, into rows; their missing cells as bits into keys
 * (bit l: column l). Returns their number. */
STEP Py_ssize_t informative_rows(const double *restrict data, int column_major, Py_ssize_t n,
                                 Py_ssize_t d, const double *weights, int weighted,
                                 i64 *restrict rows, i64 *restrict keys)
{
    Py_ssize_t at = 0;
    if (column_major) {
        /* the bits a column at a time, contiguous and branch-free */
        for (Py_ssize_t i = 0; i < n; i++)
            keys[i] = 0;
        for (Py_ssize_t l = 0; l < d; l++) {
            const double *col = data + l * n;
            i64 bit = (i64)1 << l;
            for (Py_ssize_t i = 0; i < n; i++)
                keys[i] |= col[i] != col[i] ? bit : 0;
        }
        const i64 every = ((i64)1 << d) - 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            i64 key = keys[i];
            if (key == every || (weighted && !(weights[i] > 0.0)))
                continue;
            rows[at] = i;
            keys[at] = key;
            at++;
        }
        return at;
    }
    const i64 every = ((i64)1 << d) - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (weighted && !(weights[i] > 0.0))
            continue;
        const double *row = data + i * d;
        i64 key = 0;
        for (Py_ssize_t l = 0; l < d; l++) /* branch-free */
            key |= (i64)(row[l] != row[l]) << l;
        if (key != every) {
            rows[at] = i;
            keys[at] = key;
            at++;
        }
    }
    return at;
}

/* The patterns found: per pattern (by rank: missing count, then key) its missing count,
 * the offset of its missing columns in cols, its key; then the columns, ascending. */
typedef struct {
    Py_ssize_t n_in, n_pat, n_cols, rows_at, pats_at;
    i64 *small; /* pat_m | col_off | keys | cols */
} Found;

/* The informative rows of a block and their patterns (see find_patterns below). iwork:
 * 5 n + 2^d values (5 n + 1 above TABLE_FEATURES columns). */
CPU_VERSIONS
static int block_patterns(const double *data, int column_major, Py_ssize_t n, Py_ssize_t d,
                          const double *weights, int weighted, Py_ssize_t k, i64 *iwork,
                          Found *out)
{
    i64 *rows = iwork, *keys = iwork + n, *local = iwork + 2 * n, *found = iwork + 3 * n,
        *pats = iwork + 4 * n, *table = iwork + 5 * n;
    Py_ssize_t n_in = informative_rows(data, column_major, n, d, weights, weighted, rows, keys);
    Py_ssize_t n_pat = 0;
    /* pattern ids by first appearance (table), or in key order (sort) */
    if (d <= TABLE_FEATURES) {
        Py_ssize_t size = (Py_ssize_t)1 << d;
        for (Py_ssize_t t = 0; t < size; t++)
            table[t] = -1;
        for (Py_ssize_t a = 0; a < n_in; a++) {
            i64 key = keys[a], p = table[key];
            if (p < 0) {
                p = n_pat++;
                table[key] = p;
                found[p] = key;
            }
            local[a] = p;
        }
    } else {
        i64 *order = malloc((size_t)(2 * n_in + 1) * sizeof(i64));
        if (order == NULL)
            return ERR_MEMORY;
        sort_indices(order, n_in, keys, NULL, order + n_in);
        i64 last = 0;
        for (Py_ssize_t b = 0; b < n_in; b++) {
            Py_ssize_t a = order[b];
            if (b == 0 || keys[a] != last) {
                found[n_pat++] = keys[a];
                last = keys[a];
            }
            local[a] = n_pat - 1;
        }
        free(order);
    }
    /* ranks: by missing count, then by key */
    i64 *scratch = malloc((size_t)(4 * n_pat + 1) * sizeof(i64));
    if (scratch == NULL)
        return ERR_MEMORY;
    i64 *count = scratch, *order = scratch + n_pat, *rank = scratch + 2 * n_pat,
        *tmp = scratch + 3 * n_pat;
    Py_ssize_t n_cols = 0;
    for (Py_ssize_t p = 0; p < n_pat; p++) {
        count[p] = __builtin_popcountll((unsigned long long)found[p]);
        n_cols += count[p];
    }
    sort_indices(order, n_pat, count, found, tmp);
    for (Py_ssize_t r = 0; r < n_pat; r++)
        rank[order[r]] = r;
    i64 *small = malloc((size_t)(3 * n_pat + n_cols + 1) * sizeof(i64));
    if (small == NULL) {
        free(scratch);
        return ERR_MEMORY;
    }
    i64 *pat_m = small, *col_off = small + n_pat, *pat_keys = small + 2 * n_pat,
        *cols = small + 3 * n_pat;
    for (Py_ssize_t p = 0; p < n_pat; p++) {
        pat_m[rank[p]] = count[p];
        pat_keys[rank[p]] = found[p];
    }
    Py_ssize_t at = 0;
    for (Py_ssize_t r = 0; r < n_pat; r++) {
        col_off[r] = at;
        at += pat_m[r];
    }
    for (Py_ssize_t p = 0; p < n_pat; p++) {
        Py_ssize_t c = col_off[rank[p]];
        for (Py_ssize_t l = 0; l < d; l++)
            if ((found[p] >> l) & 1)
                cols[c++] = l;
    }
    for (Py_ssize_t a = 0; a < n_in; a++)
        pats[a] = rank[local[a]];
    free(scratch);
    out->rows_at = 0;
    out->pats_at = 4 * n;
    /* Rows look their pattern's tables up one at a time; when those tables outgrow the
     * core's cache, rows taken in pattern order (a counting sort, stable) read each table
     * once per run of rows instead of once per row, from memory. */
    Py_ssize_t table_bytes = 0;
    for (Py_ssize_t p = 0; p < n_pat; p++)
        table_bytes += 8 * k * (pat_m[p] * pat_m[p] + 1);
    if (table_bytes > SORT_TABLE_BYTES) {
        i64 *start = calloc((size_t)n_pat + 1, sizeof(i64));
        if (start == NULL) {
            free(small);
            return ERR_MEMORY;
        }
        i64 *rows_out = iwork + n, *pats_out = iwork + 2 * n;
        for (Py_ssize_t a = 0; a < n_in; a++)
            start[pats[a] + 1]++;
        for (Py_ssize_t p = 0; p < n_pat; p++)
            start[p + 1] += start[p];
        for (Py_ssize_t a = 0; a < n_in; a++) {
            i64 p = pats[a], to = start[p]++;
            rows_out[to] = rows[a];
            pats_out[to] = p;
        }
        free(start);
        out->rows_at = n;
        out->pats_at = 2 * n;
    }
    out->n_in = n_in;
    out->n_pat = n_pat;
    out->n_cols = n_cols;
    out->small = small;
    return 0;
}

/* find_patterns(block, k, iwork) -> (n_in, rows_at, pats_at, n_pat, small) */
static PyObject *py_find_patterns(PyObject *self, PyObject *args)
{
    PyObject *block, *iwork_obj;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OnO", &block, &k, &iwork_obj))
        return NULL;
    Views v = {.count = 0};
    Py_ssize_t n, d;
    int column_major = flag(block, "column_major"), weighted = flag(block, "weighted");
    if (column_major < 0 || weighted < 0)
        return NULL;
    Py_buffer *data = field(block, "data", 8, 0, 0, &v);
    if (data == NULL || shape2(data, "data", &n, &d) < 0)
        goto fail;
    if (column_major) {
        Py_ssize_t t = n;
        n = d;
        d = t;
    }
    if (d < 1 || d > MAX_KEY_FEATURES) {
        PyErr_Format(PyExc_ValueError, "data must have 1 to %d columns (got %zd)",
                     MAX_KEY_FEATURES, d);
        goto fail;
    }
    Py_buffer *weights = field(block, "weights", 8, weighted ? n : 0, 0, &v);
    if (weights == NULL)
        goto fail;
    Py_ssize_t need = 5 * n + (d <= TABLE_FEATURES ? (Py_ssize_t)1 << d : 1);
    Py_buffer iwork;
    if (get_array(iwork_obj, "iwork", 8, need, 1, &iwork) < 0)
        goto fail;
    v.views[v.count++] = iwork;
    Found found;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = block_patterns(data->buf, column_major, n, d, weights->buf, weighted, k,
                            iwork.buf, &found);
    Py_END_ALLOW_THREADS
    release_views(&v);
    if (status < 0)
        return PyErr_NoMemory();
    PyObject *small = PyByteArray_FromStringAndSize(
        (const char *)found.small, (Py_ssize_t)((3 * found.n_pat + found.n_cols) * 8));
    free(found.small);
    if (small == NULL)
        return NULL;
    return Py_BuildValue("nnnnN", found.n_in, found.rows_at, found.pats_at, found.n_pat, small);
fail:
    release_views(&v);
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Pattern tables
 * ------------------------------------------------------------------------------------- */

typedef struct {
    const double *data;
    int column_major;
    Py_ssize_t n;
    const double *weights;
    int weighted;
    const double *means, *chol, *precision, *cnst;
    Py_ssize_t k, d;
    const i64 *rows, *pats, *pat_m, *col_off, *cols;
    Py_ssize_t n_in, n_pat;
    double *table;
    const i64 *off;
    const uint8_t *compute;
    double *nk, *s1, *lower;
    Py_ssize_t chunk;
    double *work;
} Args;

/* P_mm^-1 and 0.5 m log 2pi - 0.5 log det P_mm of every pattern p with compute[p] and every
 * component: per pattern p and component j the correction at table[off[p] + j], the k
 * inverses (row-major, columns ascending) from table[off[p] + k]. ERR_ILL_DEFINED when some
 * P_mm is not positive definite. */
STEP int pattern_tables(const Args *A)
{
    const Py_ssize_t k = A->k, d = A->d;
    const double log_2pi = log(2.0 * M_PI);
    Py_ssize_t size = 1;
    for (Py_ssize_t p = 0; p < A->n_pat; p++)
        size = A->pat_m[p] > size ? A->pat_m[p] : size;
    /* Every step is the same for all k components: components along the last axis, so
     * that each step runs on all of them at once (each component's arithmetic, and so its
     * result, is the same as one at a time). */
    Py_ssize_t total = d * d * k + 2 * size * size * k + size * k + (size + 1) * k + k;
    double *mem = alloc_doubles(total);
    i64 *cidx = malloc((size_t)(2 * size) * sizeof(i64));
    if (mem == NULL || cidx == NULL) {
        free(mem);
        free(cidx);
        return ERR_MEMORY;
    }
    memset(mem, 0, (size_t)total * sizeof(double));
    double *Pt = mem, *L = Pt + d * d * k, *Li = L + size * size * k,
           *rdiag = Li + size * size * k, *log_det_upto = rdiag + size * k,
           *acc = log_det_upto + (size + 1) * k;
    i64 *c = cidx, *prev = cidx + size;
    for (Py_ssize_t j = 0; j < k; j++)
        for (Py_ssize_t a = 0; a < d; a++)
            for (Py_ssize_t b = 0; b < d; b++)
                Pt[(a * d + b) * k + j] = A->precision[(j * d + a) * d + b];
    for (Py_ssize_t a = 0; a < size; a++)
        prev[a] = -1;
#define AT(M, a, b) ((M) + ((a) * size + (b)) * k)
    /* Factors of P_mm with the missing columns taken in descending order. Patterns come
     * ranked by count, then by their highest columns first, so a pattern's descending
     * column list usually starts like the previous one's: the leading rows of the Cholesky
     * factor, of its inverse and the partial log-determinants are kept and only the rows
     * after the shared prefix are computed. */
    Py_ssize_t prev_m = 0;
    int status = 0;
    for (Py_ssize_t p = 0; p < A->n_pat && status == 0; p++) {
        if (!A->compute[p])
            continue;
        const Py_ssize_t m = A->pat_m[p];
        for (Py_ssize_t a = 0; a < m; a++)
            c[a] = A->cols[A->col_off[p] + m - 1 - a];
        Py_ssize_t shared = 0;
        if (m == prev_m)
            while (shared < m && c[shared] == prev[shared])
                shared++;
        for (Py_ssize_t a = 0; a < m; a++)
            prev[a] = c[a];
        prev_m = m;
        for (Py_ssize_t a = shared; a < m; a++) {
            const i64 ca = c[a];
            for (Py_ssize_t b = 0; b < a; b++) {
                const double *pab = Pt + (ca * d + c[b]) * k;
                for (Py_ssize_t j = 0; j < k; j++)
                    acc[j] = pab[j];
                for (Py_ssize_t t = 0; t < b; t++) {
                    const double *lat = AT(L, a, t), *lbt = AT(L, b, t);
                    for (Py_ssize_t j = 0; j < k; j++)
                        acc[j] -= lat[j] * lbt[j];
                }
                double *lab = AT(L, a, b);
                const double *rb = rdiag + b * k;
                for (Py_ssize_t j = 0; j < k; j++)
                    lab[j] = acc[j] * rb[j];
            }
            const double *paa = Pt + (ca * d + ca) * k;
            for (Py_ssize_t j = 0; j < k; j++)
                acc[j] = paa[j];
            for (Py_ssize_t t = 0; t < a; t++) {
                const double *lat = AT(L, a, t);
                for (Py_ssize_t j = 0; j < k; j++)
                    acc[j] -= lat[j] * lat[j];
            }
            for (Py_ssize_t j = 0; j < k; j++)
                if (!(acc[j] > 0.0))
                    status = ERR_ILL_DEFINED;
            if (status)
                break;
            double *laa = AT(L, a, a), *ra = rdiag + a * k;
            for (Py_ssize_t j = 0; j < k; j++) {
                double lsq = sqrt(acc[j]);
                laa[j] = lsq;
                ra[j] = 1.0 / lsq;
                log_det_upto[(a + 1) * k + j] = log_det_upto[a * k + j] + log(acc[j]);
            }
            /* row a of L^-1 (forward substitution) */
            double *liaa = AT(Li, a, a);
            for (Py_ssize_t j = 0; j < k; j++)
                liaa[j] = ra[j];
            for (Py_ssize_t b = 0; b < a; b++) {
                for (Py_ssize_t j = 0; j < k; j++)
                    acc[j] = 0.0;
                for (Py_ssize_t t = b; t < a; t++) {
                    const double *lat = AT(L, a, t), *litb = AT(Li, t, b);
                    for (Py_ssize_t j = 0; j < k; j++)
                        acc[j] += lat[j] * litb[j];
                }
                double *liab = AT(Li, a, b);
                for (Py_ssize_t j = 0; j < k; j++)
                    liab[j] = -acc[j] * ra[j];
            }
        }
        if (status)
            break;
        /* P_mm^-1 = Li^T Li in descending order; stored in ascending column order */
        const Py_ssize_t mm = m * m;
        double *base = A->table + A->off[p] + k;
        for (Py_ssize_t a = 0; a < m; a++) {
            for (Py_ssize_t b = a; b < m; b++) {
                for (Py_ssize_t j = 0; j < k; j++)
                    acc[j] = 0.0;
                for (Py_ssize_t t = b; t < m; t++) {
                    const double *lta = AT(Li, t, a), *ltb = AT(Li, t, b);
                    for (Py_ssize_t j = 0; j < k; j++)
                        acc[j] += lta[j] * ltb[j];
                }
                Py_ssize_t ra = m - 1 - a, rb = m - 1 - b;
                for (Py_ssize_t j = 0; j < k; j++) {
                    base[j * mm + ra * m + rb] = acc[j];
                    base[j * mm + rb * m + ra] = acc[j];
                }
            }
        }
        for (Py_ssize_t j = 0; j < k; j++)
            A->table[A->off[p] + j] = 0.5 * (double)m * log_2pi - 0.5 * log_det_upto[m * k + j];
    }
#undef AT
    free(mem);
    free(cidx);
    return status;
}

/* lower_j[m, m] += sum over patterns of R_pj P_mm^-1 on and below the diagonal (R: the
 * pattern's summed responsibilities; columns ascending, so entry (a, b <= a) of P_mm^-1
 * falls on or below the diagonal). */
STEP void add_conditional_covariance(const Args *A, const double *resp_by_pattern)
{
    const Py_ssize_t k = A->k, d = A->d;
    for (Py_ssize_t p = 0; p < A->n_pat; p++) {
        const Py_ssize_t m = A->pat_m[p];
        const i64 *cols = A->cols + A->col_off[p];
        for (Py_ssize_t j = 0; j < k; j++) {
            const double r = resp_by_pattern[p * k + j];
            const double *inv = A->table + A->off[p] + k + j * m * m;
            double *lower = A->lower + j * d * d;
            for (Py_ssize_t a = 0; a < m; a++)
                for (Py_ssize_t b = 0; b <= a; b++)
                    lower[cols[a] * d + cols[b]] += r * inv[a * m + b];
        }
    }
}

/* ---------------------------------------------------------------------------------------
 * Steps of a chunk: arrays (k, d, ld) or (k, nb), rows along the last axis (nb of them; ld
 * the row stride of the larger arrays, so that their rows fall on different cache sets)
 * ------------------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------------------
 * A block
 * ------------------------------------------------------------------------------------- */

/* Row positions and pattern ranks within bounds, pattern tables within the table. */
static int check_indices(const Args *A, Py_ssize_t table_size)
{
    for (Py_ssize_t a = 0; a < A->n_in; a++)
        if (A->rows[a] < 0 || A->rows[a] >= A->n || A->pats[a] < 0 || A->pats[a] >= A->n_pat)
            return ERR_INDEX;
    for (Py_ssize_t p = 0; p < A->n_pat; p++) {
        const i64 m = A->pat_m[p];
        if (m < 0 || m >= A->d || A->col_off[p] < 0 || A->off[p] < 0 ||
            A->off[p] + A->k + A->k * m * m > table_size)
            return ERR_INDEX;
        for (Py_ssize_t a = 0; a < m; a++)
            if (A->cols[A->col_off[p] + a] < 0 || A->cols[A->col_off[p] + a] >= A->d)
                return ERR_INDEX;
    }
    return 0;
}

/* The row stride of the (k, d, ld) arrays of chunks of b rows: a whole number of eight-row
 * groups, and an odd number of cache lines, so that the d rows read together do not compete
 * for a few sets of the first-level cache (as they would with a power-of-two stride). */
static Py_ssize_t row_stride(Py_ssize_t b)
{
    Py_ssize_t ld = (b + 7) / 8 * 8;
    return ld % 16 == 0 ? ld + 8 : ld;
}

/* The next n values of the scratch at *mem, whole cache lines of it (eight values), and
 * `gap` lines more left unused after them; *mem moves past them. */
static inline double *take_lines(double **mem, Py_ssize_t n, Py_ssize_t gap)
{
    double *start = *mem;
    *mem += (n + 7) / 8 * 8 + 8 * gap;
    return start;
}

/* Scratch values of a block (chunks of b rows, missing counts up to max_m): the lane sums of
 * the moments, c, y, g, xt, q, top, total, scale, v, z, w (each rounded up to whole cache
 * lines, the SCRATCH_GAPS large ones a line apart), the positions of the rows missing cells, and an
 * alignment. */
#define MAX_LANES 8
#define SCRATCH_ARRAYS 12 /* lanes, c, y, g, xt, q, top, total, scale, v, z, w */
#define SCRATCH_GAPS 4

static Py_ssize_t scratch_size(Py_ssize_t k, Py_ssize_t d, Py_ssize_t b, Py_ssize_t max_m)
{
    const Py_ssize_t ld = row_stride(b);
    return k * (d + 1) * d * MAX_LANES + k * max_m + max_m + k * b + 3 * k * d * ld + d * ld +
           3 * b + d * (d + 8) + b + 8 + 8 * (SCRATCH_ARRAYS + SCRATCH_GAPS);
}

/* The kernel of a block in three CPU versions, picked when the module loads: AVX-512 (eight
 * rows per 512-bit register), AVX2 with FMA (four rows per 256-bit register) and the
 * baseline (two rows per 128-bit register): each with vectors of the width its registers
 * hold, so that the rows' partial sums and the eight outputs of the products stay in
 * registers (wider ones split in halves would spill). */
typedef int (*block_stats_fn)(const Args *A, double *loglik_out, double *n_rows_out);

#define VERSION(name) name##_baseline
#define LANES 2
#include "gaussian_chunks.h"
#undef VERSION
#undef LANES

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define X86_VERSIONS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#define VERSION(name) name##_avx2
#define LANES 4
#include "gaussian_chunks.h"
#undef VERSION
#undef LANES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi,bmi2,popcnt")
#pragma GCC target("prefer-vector-width=512")
#define VERSION(name) name##_avx512
#define LANES 8
#include "gaussian_chunks.h"
#undef VERSION
#undef LANES
#pragma GCC pop_options
#endif

static const struct {
    const char *name;
    block_stats_fn fn;
} VERSIONS[] = {
#ifdef X86_VERSIONS
    {"avx512", block_stats_avx512},
    {"avx2", block_stats_avx2},
#endif
    {"baseline", block_stats_baseline},
};
#define N_VERSIONS ((int)(sizeof VERSIONS / sizeof VERSIONS[0]))

/* The version in use, and the first this CPU runs (the widest). */
static int version, first_version;

static int cpu_runs(const char *name)
{
#ifdef X86_VERSIONS
    __builtin_cpu_init();
    if (strcmp(name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    if (strcmp(name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("bmi2");
#endif
    return 1;
}

static void pick_version(void)
{
    version = N_VERSIONS - 1;
    for (int v = N_VERSIONS - 1; v >= 0; v--)
        if (cpu_runs(VERSIONS[v].name))
            version = v;
    first_version = version;
}

/* versions() -> the names of the versions this CPU runs, widest first */
static PyObject *py_versions(PyObject *self, PyObject *unused)
{
    PyObject *names = PyList_New(0);
    for (int v = first_version; names && v < N_VERSIONS; v++) {
        PyObject *name = PyUnicode_FromString(VERSIONS[v].name);
        if (name == NULL || PyList_Append(names, name) < 0)
            Py_CLEAR(names);
        Py_XDECREF(name);
    }
    return names;
}

/* use_version(name): the version dense_block_stats runs from now on (for the tests) */
static PyObject *py_use_version(PyObject *self, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    for (int v = first_version; v < N_VERSIONS; v++)
        if (strcmp(name, VERSIONS[v].name) == 0) {
            version = v;
            Py_RETURN_NONE;
        }
    return PyErr_Format(PyExc_ValueError, "version must be one of versions() (got %R)", arg);
}

/* dense_block_stats(block, model, patterns, tables, moments, chunk, work) -> (loglik,
 * n_rows), or None when P_mm of some pattern is not positive definite (nothing added). */
static PyObject *py_dense_block_stats(PyObject *self, PyObject *args)
{
    PyObject *block, *model, *patterns, *tables, *moments, *work_obj;
    Py_ssize_t chunk;
    if (!PyArg_ParseTuple(args, "OOOOOnO", &block, &model, &patterns, &tables, &moments,
                          &chunk, &work_obj))
        return NULL;
    if (chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk must be at least 1");
        return NULL;
    }
    Views v = {.count = 0};
    Args A = {.chunk = chunk};
    Py_buffer *b;
    Py_ssize_t rows, cols;
    if ((A.column_major = flag(block, "column_major")) < 0 ||
        (A.weighted = flag(block, "weighted")) < 0)
        return NULL;
    if (!(b = field(model, "means", 8, 0, 0, &v)) || shape2(b, "means", &A.k, &A.d) < 0)
        goto fail;
    A.means = b->buf;
    const Py_ssize_t k = A.k, d = A.d;
    if (!(b = field(block, "data", 8, 0, 0, &v)) || shape2(b, "data", &rows, &cols) < 0)
        goto fail;
    A.data = b->buf;
    A.n = A.column_major ? cols : rows;
    if ((A.column_major ? rows : cols) != d) {
        PyErr_Format(PyExc_ValueError, "data must have %zd features, as the means", d);
        goto fail;
    }
    if (!(b = field(block, "weights", 8, A.weighted ? A.n : 0, 0, &v)))
        goto fail;
    A.weights = b->buf;
    if (!(b = field(model, "chol", 8, k * d * d, 0, &v)))
        goto fail;
    A.chol = b->buf;
    if (!(b = field(model, "precision", 8, k * d * d, 0, &v)))
        goto fail;
    A.precision = b->buf;
    if (!(b = field(model, "const", 8, k, 0, &v)))
        goto fail;
    A.cnst = b->buf;
    if (!(b = field(patterns, "rows", 8, 0, 0, &v)))
        goto fail;
    A.rows = b->buf;
    A.n_in = items(b);
    if (!(b = field(patterns, "pats", 8, A.n_in, 0, &v)))
        goto fail;
    A.pats = b->buf;
    if (!(b = field(patterns, "pat_m", 8, 0, 0, &v)))
        goto fail;
    A.pat_m = b->buf;
    A.n_pat = items(b);
    if (!(b = field(patterns, "col_off", 8, A.n_pat, 0, &v)))
        goto fail;
    A.col_off = b->buf;
    Py_ssize_t n_cols = 0;
    for (Py_ssize_t p = 0; p < A.n_pat; p++)
        n_cols = A.col_off[p] + A.pat_m[p] > n_cols ? A.col_off[p] + A.pat_m[p] : n_cols;
    if (!(b = field(patterns, "cols", 8, n_cols, 0, &v)))
        goto fail;
    A.cols = b->buf;
    if (!(b = field(tables, "table", 8, 0, 1, &v)))
        goto fail;
    A.table = b->buf;
    const Py_ssize_t table_size = items(b);
    if (!(b = field(tables, "off", 8, A.n_pat, 0, &v)))
        goto fail;
    A.off = b->buf;
    if (!(b = field(tables, "compute", 1, A.n_pat, 0, &v)))
        goto fail;
    A.compute = b->buf;
    if (!(b = field(moments, "nk", 8, k, 1, &v)))
        goto fail;
    A.nk = b->buf;
    if (!(b = field(moments, "s1", 8, k * d, 1, &v)))
        goto fail;
    A.s1 = b->buf;
    if (!(b = field(moments, "lower", 8, k * d * d, 1, &v)))
        goto fail;
    A.lower = b->buf;
    if (A.n_in == 0) {
        release_views(&v);
        return Py_BuildValue("dd", 0.0, 0.0);
    }
    Py_ssize_t max_m = 1;
    for (Py_ssize_t p = 0; p < A.n_pat; p++)
        max_m = A.pat_m[p] > max_m ? A.pat_m[p] : max_m;
    const Py_ssize_t need =
        A.n_pat * k + scratch_size(k, d, chunk < A.n_in ? chunk : A.n_in, max_m);
    Py_buffer work;
    if (get_array(work_obj, "work", 8, need, 1, &work) < 0)
        goto fail;
    v.views[v.count++] = work;
    A.work = work.buf;
    double loglik = 0.0, n_rows = 0.0;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = check_indices(&A, table_size);
    if (status == 0)
        status = VERSIONS[version].fn(&A, &loglik, &n_rows);
    Py_END_ALLOW_THREADS
    release_views(&v);
    if (status == ERR_ILL_DEFINED)
        Py_RETURN_NONE;
    if (status == ERR_INDEX) {
        PyErr_SetString(PyExc_IndexError,
                        "patterns or tables point outside the block or the table");
        return NULL;
    }
    if (status == ERR_MEMORY)
        return PyErr_NoMemory();
    return Py_BuildValue("dd", loglik, n_rows);
fail:
    release_views(&v);
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * exp
 * ------------------------------------------------------------------------------------- */

CPU_VERSIONS
static void exp_in_place(double *q, Py_ssize_t size) { exp_nonpositive(q, size); }

static PyObject *py_exp_nonpositive(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (get_array(arg, "q", 8, 0, 1, &view) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    exp_in_place(view.buf, view.len / 8);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* work_size(k, d, n_pat, max_m, rows) -> the values dense_block_stats needs in `work` */
static PyObject *py_work_size(PyObject *self, PyObject *args)
{
    Py_ssize_t k, d, n_pat, max_m, rows;
    if (!PyArg_ParseTuple(args, "nnnnn", &k, &d, &n_pat, &max_m, &rows))
        return NULL;
    return PyLong_FromSsize_t(n_pat * k + scratch_size(k, d, rows, max_m > 1 ? max_m : 1));
}

static PyMethodDef methods[] = {
    {"find_patterns", py_find_patterns, METH_VARARGS,
     "find_patterns(block, k, iwork) -> (n_in, rows_at, pats_at, n_pat, small)\n\n"
     "The informative rows of a block and their missingness patterns (see "
     "emdask.families._compiled.find_patterns)."},
    {"dense_block_stats", py_dense_block_stats, METH_VARARGS,
     "dense_block_stats(block, model, patterns, tables, moments, chunk, work) -> "
     "(loglik, n_rows) or None\n\n"
     "E-step statistics of a block under full (or tied) covariances (see "
     "emdask.families._compiled.dense_block_stats); None when the precision of the missing "
     "cells of some pattern is not positive definite."},
    {"work_size", py_work_size, METH_VARARGS,
     "work_size(k, d, n_pat, max_m, rows) -> int\n\n"
     "The float64 scratch values dense_block_stats needs for k components, d features, "
     "n_pat patterns missing up to max_m cells and chunks of `rows` rows."},
    {"versions", py_versions, METH_NOARGS,
     "versions() -> the names of the CPU versions of the block kernel this CPU runs, the "
     "one in use by default first."},
    {"use_version", py_use_version, METH_O,
     "use_version(name): run that version of the block kernel from now on (one of "
     "versions())."},
    {"exp_nonpositive", py_exp_nonpositive, METH_O,
     "exp_nonpositive(q): q = exp(q) in place, for a float64 array of values <= 0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cgaussian",
    "The compiled Gaussian E-step under full or tied covariances.", -1, methods,
};

PyMODINIT_FUNC PyInit__cgaussian(void)
{
    pick_version();
    return PyModule_Create(&module);
}
