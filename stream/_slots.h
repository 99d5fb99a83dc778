/*
 * Shared by the compiled helpers (stream/_tuples.c, projections/_speedups.c): where a
 * Python class keeps an attribute declared in __slots__, to read and write it without the
 * attribute machinery.
 */

#ifndef MISSION_RUNNER_SLOTS_H
#define MISSION_RUNNER_SLOTS_H

#include <Python.h>

#ifndef Py_T_OBJECT_EX /* before Python 3.12 */
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

/* The offset of the writable object slot `name` of `type`, from its member descriptor;
   -1 when `name` is not one. */
static inline Py_ssize_t
member_offset(PyTypeObject *type, const char *name)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    Py_ssize_t off = -1;
    if (d == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == Py_T_OBJECT_EX && !(m->flags & Py_READONLY)) {
            off = m->offset;
        }
    }
    Py_DECREF(d);
    return off;
}

#endif
