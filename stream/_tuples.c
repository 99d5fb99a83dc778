/*
 * stream._tuples: the Insert fast path of the pgoutput decoder, compiled.
 *
 * `plain_insert(unchanged, buf, pos)` reads the Insert message from buf[pos] to the end of
 * buf exactly as `_plain_insert_py` in stream/pgoutput.py does (the definition, which a
 * unit test holds this to): the relation OID and the new tuple's values, or None for
 * anything that is not one exact, well-formed Insert with a new tuple, so that the general
 * decoder takes the message and reports what is wrong with it. It never raises for bad
 * input.
 *
 * Message layout (PostgreSQL "Logical Replication Message Formats"): Byte1('I'),
 * Int32 relation OID, Byte1('N'), Int16 column count, then per column a kind byte: 'n'
 * (NULL), 'u' (unchanged TOAST), 't' or 'b' followed by an Int32 length and the bytes.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_COLUMNS 1664 /* MaxTupleAttributeNumber */

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

PyDoc_STRVAR(plain_insert_doc,
"plain_insert(unchanged, buf, pos) -> (relation_oid, values) | None\n"
"\n"
"The Insert message from buf[pos] to the end of buf: its relation OID and new tuple\n"
"(bytes for 't' and 'b', None for 'n', `unchanged` for 'u'), or None when it is not\n"
"exactly one well-formed Insert with a new tuple.");

static PyObject *
plain_insert(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "plain_insert() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *unchanged = args[0];
    PyObject *buf = args[1];
    if (!PyBytes_Check(buf)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(buf);
    Py_ssize_t n = PyBytes_GET_SIZE(buf);
    if (pos < 0 || pos > n || n - pos < 8 || p[pos] != 'I' || p[pos + 5] != 'N') {
        Py_RETURN_NONE;
    }
    uint32_t oid = be32(p + pos + 1);
    Py_ssize_t count = ((Py_ssize_t)p[pos + 6] << 8) | p[pos + 7];
    Py_ssize_t off = pos + 8;
    if (count > MAX_COLUMNS || count > n - off) { /* a column takes at least one byte */
        Py_RETURN_NONE;
    }
    PyObject *values = PyTuple_New(count);
    if (values == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (off >= n) {
            goto decline;
        }
        unsigned char kind = p[off];
        PyObject *item;
        if (kind == 't' || kind == 'b') {
            if (n - off < 5) {
                goto decline;
            }
            uint32_t size = be32(p + off + 1); /* unsigned: a negative Int32 runs past the end */
            Py_ssize_t start = off + 5;
            if ((uint64_t)size > (uint64_t)(n - start)) {
                goto decline;
            }
            item = PyBytes_FromStringAndSize((const char *)p + start, (Py_ssize_t)size);
            if (item == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            off = start + (Py_ssize_t)size;
        }
        else if (kind == 'n') {
            item = Py_NewRef(Py_None);
            off += 1;
        }
        else if (kind == 'u') {
            item = Py_NewRef(unchanged);
            off += 1;
        }
        else {
            goto decline;
        }
        PyTuple_SET_ITEM(values, i, item);
    }
    if (off != n) {
        goto decline;
    }
    PyObject *relation = PyLong_FromUnsignedLong(oid);
    if (relation == NULL) {
        Py_DECREF(values);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, relation, values);
    Py_DECREF(relation);
    Py_DECREF(values);
    return result;

decline:
    Py_DECREF(values); /* unset items are NULL, which tuple deallocation skips */
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"plain_insert", (PyCFunction)(void (*)(void))plain_insert, METH_FASTCALL, plain_insert_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "stream._tuples",
    "The pgoutput decoder's Insert fast path, compiled (see stream/pgoutput.py).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__tuples(void)
{
    return PyModule_Create(&module);
}
