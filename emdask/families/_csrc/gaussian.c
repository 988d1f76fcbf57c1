/* The compiled Gaussian E-step (to be written). */
#include "common.h"

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cgaussian", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__cgaussian(void) { return PyModule_Create(&module); }
