/* The compiled categorical E-step (to be written). */
#include "common.h"

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cdiscrete", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__cdiscrete(void) { return PyModule_Create(&module); }
