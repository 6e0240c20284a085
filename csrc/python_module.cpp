// Makes the shared library importable as daad_ext._C; importing it runs the op registrations.
// The module also says what the library was built with, so that Python asks it rather than the
// dispatcher's private API or the library's bytes:
//   KERNEL_DEVICES    the device types with a kernel: ("cpu",) or ("cpu", "cuda");
//   SIMILARITY_CODES  {name: code} of the C++ enums (csrc/op_checks.h's tables), which a test
//   SHRINK_CODES      compares with daad_ext/spec.py's.
#include <Python.h>

#include "op_checks.h"

namespace {

template <typename Code, size_t K>
PyObject* code_table(const daad_ext::NamedCode<Code> (&table)[K]) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const auto& entry : table) {
    PyObject* code = PyLong_FromLong(static_cast<long>(entry.code));
    const std::string name(entry.name);
    if (code == nullptr || PyDict_SetItemString(dict, name.c_str(), code) < 0) {
      Py_XDECREF(code);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(code);
  }
  return dict;
}

PyObject* kernel_devices() {
#if defined(DAAD_EXT_WITH_CUDA)
  return Py_BuildValue("(ss)", "cpu", "cuda");
#else
  return Py_BuildValue("(s)", "cpu");
#endif
}

// Adds ``value`` (a new reference, or nullptr after an error) to ``module`` as ``name``.
bool add(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  if (PyModule_AddObject(module, name, value) < 0) {
    Py_DECREF(value);
    return false;
  }
  return true;
}

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (!add(module, "KERNEL_DEVICES", kernel_devices()) ||
      !add(module, "SIMILARITY_CODES", code_table(daad_ext::kSimilarityNames)) ||
      !add(module, "SHRINK_CODES", code_table(daad_ext::kShrinkNames))) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
