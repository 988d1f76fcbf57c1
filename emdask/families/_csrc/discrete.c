/* The compiled E-step of categorical columns.
 *
 * One call per block does what CategoricalPart (emdask/families/discrete.py) does with a
 * one-hot indicator matrix and two matrix products per chunk: each cell's code picks its row
 * of the log-probability table, and the row's responsibilities are added to the same rows of
 * the counts. No indicator matrix is built, so each cell is read once instead of an
 * (rows x slots) matrix streamed through memory twice. The numpy steps are the reference the
 * tests compare this with. */
#include "common.h"

#define CHUNK 256

/* What one call reads and adds to (see categorical_block_stats below). */
typedef struct {
    const double *X;        /* the block: X[i * row + c * col] is row i, column c */
    Py_ssize_t n, row, col; /* rows; strides in items */
    const int64_t *cols, *offsets, *n_levels; /* per categorical column (d of them) */
    Py_ssize_t d;
    const double *table;    /* (n_slots, k) log-probabilities */
    const double *log_w;    /* (k,) */
    Py_ssize_t k;
    const double *weights;  /* (n,) or NULL */
    int expected;           /* rows with no observed cell still add their responsibilities */
    double *counts, *nk;    /* (n_slots, k), (k,): added to */
} Categorical;

/* The block's log-likelihood and weighted row count (rows with an observed cell) into
 * out[0], out[1]; returns -1, or the first row holding a cell that is not one of its
 * column's codes (the statistics are then incomplete and must be discarded). */
static CPU_VERSIONS Py_ssize_t categorical_stats(const Categorical *a, double *out,
                                                 int64_t *slots, double *lp, double *top,
                                                 char *informative, double *r)
{
    const Py_ssize_t d = a->d, k = a->k;
    double loglik = 0.0, n_rows = 0.0;
    for (Py_ssize_t start = 0; start < a->n; start += CHUNK) {
        Py_ssize_t nb = a->n - start < CHUNK ? a->n - start : CHUNK;
        for (Py_ssize_t i = 0; i < nb; i++) {
            const double *row = a->X + (start + i) * a->row;
            int seen = 0;
            for (Py_ssize_t c = 0; c < d; c++) {
                double x = row[a->cols[c] * a->col];
                if (x == x) {
                    int64_t code = fabs(x) < 4611686018427387904.0 ? (int64_t)x : -1;
                    if (code < 0 || code >= a->n_levels[c] || (double)code != x) {
                        out[0] = loglik;
                        out[1] = n_rows;
                        return start + i;
                    }
                    slots[i * d + c] = a->offsets[c] + code;
                    seen = 1;
                } else {
                    slots[i * d + c] = a->offsets[c] + a->n_levels[c];
                }
            }
            informative[i] = (char)seen;
            double t = -INFINITY;
            for (Py_ssize_t j = 0; j < k; j++) {
                double acc = a->log_w[j];
                for (Py_ssize_t c = 0; c < d; c++)
                    acc += a->table[slots[i * d + c] * k + j];
                lp[i * k + j] = acc;
                t = acc > t ? acc : t;
            }
            t = t > -INFINITY ? t : 0.0;
            top[i] = t;
            for (Py_ssize_t j = 0; j < k; j++)
                lp[i * k + j] -= t;
        }
        exp_nonpositive(lp, nb * k);
        for (Py_ssize_t i = 0; i < nb; i++) {
            double total = 0.0;
            for (Py_ssize_t j = 0; j < k; j++)
                total += lp[i * k + j];
            double w = a->weights ? a->weights[start + i] : 1.0;
            double rw = informative[i] ? w : 0.0;
            if (rw > 0.0) {
                loglik += rw * (log(total) + top[i]);
                n_rows += rw;
            }
            double scale = (a->expected ? w : rw) / total;
            if (scale == 0.0)
                continue;
            for (Py_ssize_t j = 0; j < k; j++) {
                r[j] = lp[i * k + j] * scale;
                a->nk[j] += r[j];
            }
            for (Py_ssize_t c = 0; c < d; c++) {
                double *to = a->counts + slots[i * d + c] * k;
                for (Py_ssize_t j = 0; j < k; j++)
                    to[j] += r[j];
            }
        }
    }
    out[0] = loglik;
    out[1] = n_rows;
    return -1;
}

PyDoc_STRVAR(categorical_doc,
"categorical_block_stats(X, column_major, cols, offsets, n_levels, table, log_w, weights,\n"
"                        expected, counts, nk)\n"
"--\n\n"
"E-step statistics of a block of categorical columns.\n\n"
"X: the block (n, n_features), or its transpose (n_features, n) when column_major,\n"
"C-ordered float64: level codes 0 .. n_levels - 1 as floats in the columns `cols`, NaN for\n"
"a missing cell. cols, offsets, n_levels (d,) int64: the columns, the first slot of each in\n"
"`table` and its number of levels (slot offsets + n_levels is the column's 'missing' slot,\n"
"log-probability 0). table (n_slots, k) float64: log-probabilities of every level under\n"
"every component. log_w (k,). weights: (n,) float64 or None. expected: rows with no\n"
"observed cell still add their responsibilities. counts (n_slots, k) and nk (k,) float64\n"
"are added to.\n\n"
"Returns (loglik, n_rows, bad_row): over the rows with an observed cell (weighted); bad_row\n"
"is -1, or the first row holding a cell that is not one of its column's codes (the\n"
"statistics are then incomplete and must be discarded).");

static PyObject *categorical_block_stats(PyObject *self, PyObject *args)
{
    PyObject *o[11];
    if (!PyArg_UnpackTuple(args, "categorical_block_stats", 11, 11, &o[0], &o[1], &o[2],
                           &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10]))
        return NULL;
    int column_major = PyObject_IsTrue(o[1]), expected = PyObject_IsTrue(o[8]);
    if (column_major < 0 || expected < 0)
        return NULL;
    Py_buffer b[9];
    int got = 0;
    PyObject *result = NULL;
    Py_ssize_t d, k, n_slots, n, width;
    /* the block and the table first: their shapes give the other arrays' sizes */
    if (get_array(o[0], "X", 8, 0, 0, &b[got]) < 0)
        goto done;
    got++;
    if (get_array(o[5], "table", 8, 0, 0, &b[got]) < 0)
        goto done;
    got++;
    if (shape2(&b[0], "X", &n, &width) < 0 || shape2(&b[1], "table", &n_slots, &k) < 0)
        goto done;
    if (column_major) {
        Py_ssize_t t = n;
        n = width;
        width = t;
    }
    d = PyObject_Length(o[2]);
    if (d < 0)
        goto done;
    /* the other arrays, in the order of b[]: argument, name, items needed, written to */
    const struct { int arg; const char *name; Py_ssize_t need; int writable; } arrays[] = {
        {2, "cols", d, 0},  {3, "offsets", d, 0}, {4, "n_levels", d, 0}, {6, "log_w", k, 0},
        {9, "counts", n_slots * k, 1}, {10, "nk", k, 1}, {7, "weights", n, 0},
    };
    for (int i = 0; i < 7; i++) {
        if (arrays[i].arg == 7 && o[7] == Py_None)
            break;
        if (get_array(o[arrays[i].arg], arrays[i].name, 8, arrays[i].need,
                      arrays[i].writable, &b[got]) < 0)
            goto done;
        got++;
    }
    const double *weights = got == 9 ? b[8].buf : NULL;
    const int64_t *cols = b[2].buf, *offsets = b[3].buf, *n_levels = b[4].buf;
    for (Py_ssize_t c = 0; c < d; c++) {
        if (cols[c] < 0 || cols[c] >= width || offsets[c] < 0 || n_levels[c] < 1 ||
            offsets[c] + n_levels[c] >= n_slots) {
            PyErr_Format(PyExc_ValueError,
                         "categorical column %zd (column %lld of %zd, slots %lld + %lld) does "
                         "not fit the block or the table of %zd slots",
                         c, (long long)cols[c], width, (long long)offsets[c],
                         (long long)n_levels[c], n_slots);
            goto done;
        }
    }
    Categorical a = {b[0].buf, n, column_major ? 1 : width, column_major ? n : 1, cols,
                     offsets, n_levels, d, b[1].buf, b[5].buf, k, weights, expected,
                     b[6].buf, b[7].buf};
    int64_t *slots = PyMem_RawMalloc(sizeof(int64_t) * CHUNK * (d ? d : 1));
    double *lp = PyMem_RawMalloc(sizeof(double) * (CHUNK * k + CHUNK + k));
    char *informative = PyMem_RawMalloc(CHUNK);
    if (!slots || !lp || !informative) {
        PyMem_RawFree(slots);
        PyMem_RawFree(lp);
        PyMem_RawFree(informative);
        PyErr_NoMemory();
        goto done;
    }
    double out[2];
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = categorical_stats(&a, out, slots, lp, lp + CHUNK * k, informative,
                            lp + CHUNK * k + CHUNK);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(slots);
    PyMem_RawFree(lp);
    PyMem_RawFree(informative);
    result = Py_BuildValue("ddn", out[0], out[1], bad);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&b[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"categorical_block_stats", categorical_block_stats, METH_VARARGS, categorical_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cdiscrete",
    "The compiled E-step of categorical columns (see categorical_block_stats).", -1, methods,
};

PyMODINIT_FUNC PyInit__cdiscrete(void) { return PyModule_Create(&module); }
