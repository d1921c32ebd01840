// The Python module fastbnf._C. It holds no functions: importing it runs the static
// TORCH_LIBRARY_IMPL registrations of the kernels (the schemas come from fastbnf/_schemas.py).
#include <Python.h>

static struct PyModuleDef fastbnf_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastbnf_module); }
