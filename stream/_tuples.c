/*
 * stream._tuples: the Insert fast path of the pgoutput decoder, compiled.
 *
 * `plain_insert(unchanged, buf, pos)` reads the Insert message from buf[pos] to the end of
 * buf exactly as `_plain_insert_py` in stream/pgoutput.py does (the definition, which a
 * unit test holds this to): the relation OID and the new tuple's values, or None for
 * anything that is not one exact, well-formed Insert with a new tuple, so that the general
 * decoder takes the message and reports what is wrong with it. It never raises for bad
 * input. `insert_frame` does the same for the Insert of an XLogData frame and hands the row
 * to the open transaction, as the reader's fused path does (stream/reader.py), and
 * `insert_frames` does that for each frame it reads with psycopg's `get_copy_data`, until one
 * it does not take (`FrameReader.pump`, the consumer's frame loop).
 *
 * Message layout (PostgreSQL "Logical Replication Message Formats"): Byte1('I'),
 * Int32 relation OID, Byte1('N'), Int16 column count, then per column a kind byte: 'n'
 * (NULL), 'u' (unchanged TOAST), 't' or 'b' followed by an Int32 length and the bytes.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "_slots.h"

#define MAX_COLUMNS 1664 /* MaxTupleAttributeNumber */
#define XLOG_PAYLOAD_AT 25 /* 'w', WAL start, WAL end, send time */
#define WAL_END_AT 9

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* The Insert at buf[pos:n]: sets *oid and returns its values (a new tuple); NULL without an
   exception when it is not exactly one well-formed Insert with a new tuple. */
static PyObject *
read_insert(const unsigned char *p, Py_ssize_t n, Py_ssize_t pos, PyObject *unchanged,
            uint32_t *oid)
{
    if (pos < 0 || pos > n || n - pos < 8 || p[pos] != 'I' || p[pos + 5] != 'N') {
        return NULL;
    }
    *oid = be32(p + pos + 1);
    Py_ssize_t count = ((Py_ssize_t)p[pos + 6] << 8) | p[pos + 7];
    Py_ssize_t off = pos + 8;
    if (count > MAX_COLUMNS || count > n - off) { /* a column takes at least one byte */
        return NULL;
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
    if (off == n) {
        return values;
    }
decline:
    Py_DECREF(values); /* unset items are NULL, which tuple deallocation skips */
    return NULL;
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
    if (!PyBytes_Check(args[1])) {
        Py_RETURN_NONE;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint32_t oid;
    PyObject *values = read_insert((const unsigned char *)PyBytes_AS_STRING(args[1]),
                                   PyBytes_GET_SIZE(args[1]), pos, args[0], &oid);
    if (values == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
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
}

/* RowInsert's slot offsets, looked up once per class. */
static PyTypeObject *row_insert_type = NULL;
static Py_ssize_t row_relation_at = -1, row_values_at = -1;

PyDoc_STRVAR(insert_frame_doc,
"insert_frame(unchanged, buf, relations, inserts, row_insert) -> wal_end | None\n"
"\n"
"An XLogData frame carrying one plain Insert (outside a stream block: the caller checks),\n"
"read in place: appends row_insert(relation, values) to `inserts`, the relation being\n"
"relations[oid], and returns the frame's WAL end. None, having done nothing, when the frame\n"
"is not exactly that or the relation was never described.");

/* Check (and remember the slot offsets of) the row_insert class. */
static int
set_row_insert_type(PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "row_insert must be a class");
        return -1;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    if (type != row_insert_type) {
        Py_ssize_t rel_at = member_offset(type, "relation");
        Py_ssize_t val_at = member_offset(type, "values");
        if (rel_at < 0 || val_at < 0 || type->tp_itemsize != 0) {
            PyErr_SetString(PyExc_TypeError, "row_insert must be a slotted class");
            return -1;
        }
        Py_INCREF(type);
        Py_XSETREF(row_insert_type, type);
        row_relation_at = rel_at;
        row_values_at = val_at;
    }
    return 0;
}

/* The frame p[0:n] if it is an XLogData frame carrying one plain Insert of a described
   relation: appends the row to `inserts` and returns 1 with its WAL end in *end. 0 when it
   is not (nothing done), -1 with an exception set. set_row_insert_type() ran. */
static int
take_insert_frame(const unsigned char *p, Py_ssize_t n, PyObject *unchanged,
                  PyObject *relations, PyObject *inserts, uint64_t *end)
{
    if (n < XLOG_PAYLOAD_AT + 8 || p[0] != 'w') {
        return 0;
    }
    uint32_t oid;
    PyObject *values = read_insert(p, n, XLOG_PAYLOAD_AT, unchanged, &oid);
    if (values == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *key = PyLong_FromUnsignedLong(oid);
    if (key == NULL) {
        Py_DECREF(values);
        return -1;
    }
    PyObject *relation = PyDict_GetItemWithError(relations, key); /* borrowed */
    Py_DECREF(key);
    if (relation == NULL) {
        Py_DECREF(values);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyTypeObject *type = row_insert_type;
    PyObject *row = type->tp_alloc(type, 0); /* what object.__new__(RowInsert) does */
    if (row == NULL) {
        Py_DECREF(values);
        return -1;
    }
    *(PyObject **)((char *)row + row_relation_at) = Py_NewRef(relation);
    *(PyObject **)((char *)row + row_values_at) = values; /* the reference moves */
    int err = PyList_Append(inserts, row);
    Py_DECREF(row);
    if (err < 0) {
        return -1;
    }
    uint64_t wal_end = 0;
    for (int i = 0; i < 8; i++) {
        wal_end = (wal_end << 8) | p[WAL_END_AT + i];
    }
    *end = wal_end;
    return 1;
}

static PyObject *
insert_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "insert_frame() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *buf = args[1], *relations = args[2], *inserts = args[3];
    if (!PyDict_Check(relations) || !PyList_Check(inserts)) {
        PyErr_SetString(PyExc_TypeError, "insert_frame() takes a dict, a list and a class");
        return NULL;
    }
    if (set_row_insert_type(args[4]) < 0) {
        return NULL;
    }
    if (!PyBytes_Check(buf)) {
        Py_RETURN_NONE;
    }
    uint64_t end;
    int taken = take_insert_frame((const unsigned char *)PyBytes_AS_STRING(buf),
                                  PyBytes_GET_SIZE(buf), args[0], relations, inserts, &end);
    if (taken < 0) {
        return NULL;
    }
    if (taken == 0) {
        Py_RETURN_NONE;
    }
    return PyLong_FromUnsignedLongLong(end);
}

PyDoc_STRVAR(insert_frames_doc,
"insert_frames(get_copy_data, limit, unchanged, relations, inserts, row_insert)\n"
"    -> (taken, taken_bytes, wal_end, rest)\n"
"\n"
"Reads frames with get_copy_data(True) (psycopg's PGconn.get_copy_data: (size, buffer),\n"
"size 0 when none is buffered, -1 at the end of the copy, -2 on error) and takes each one\n"
"`insert_frame` would take, up to `limit` of them; `inserts` None takes none. Returns how\n"
"many frames it took, their bytes, the highest WAL end among them (0 if none), and `rest`:\n"
"the first frame it did not take, as bytes; get_copy_data's size when that was <= 0; or\n"
"None after `limit` frames. An error of get_copy_data after frames were taken is left for\n"
"the next call, which raises it.");

static PyObject *
insert_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "insert_frames() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *get_copy_data = args[0], *unchanged = args[2], *relations = args[3];
    PyObject *inserts = args[4] == Py_None ? NULL : args[4];
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyDict_Check(relations) || (inserts != NULL && !PyList_Check(inserts))) {
        PyErr_SetString(PyExc_TypeError, "insert_frames() takes a dict and a list or None");
        return NULL;
    }
    if (set_row_insert_type(args[5]) < 0) {
        return NULL;
    }
    Py_ssize_t taken = 0;
    unsigned long long taken_bytes = 0;
    uint64_t max_end = 0;
    PyObject *rest = NULL;
    while (taken < limit) {
        PyObject *got = PyObject_CallOneArg(get_copy_data, Py_True);
        if (got == NULL) {
            if (taken == 0 || !PyErr_ExceptionMatches(PyExc_Exception)) {
                return NULL;
            }
            PyErr_Clear(); /* the connection keeps failing: the next call raises it */
            break;
        }
        Py_ssize_t size;
        if (!PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 2
            || ((size = PyLong_AsSsize_t(PyTuple_GET_ITEM(got, 0))) == -1 && PyErr_Occurred())) {
            Py_DECREF(got);
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "get_copy_data() must return (size, buffer)");
            }
            return NULL;
        }
        if (size <= 0) {
            Py_DECREF(got);
            rest = PyLong_FromSsize_t(size);
            if (rest == NULL) {
                return NULL;
            }
            break;
        }
        Py_buffer view;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(got, 1), &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(got);
            return NULL;
        }
        const unsigned char *p = (const unsigned char *)view.buf;
        int took = 0;
        uint64_t end = 0;
        if (inserts != NULL && view.len > XLOG_PAYLOAD_AT && p[XLOG_PAYLOAD_AT] == 'I') {
            took = take_insert_frame(p, view.len, unchanged, relations, inserts, &end);
        }
        if (took == 0) {
            rest = PyBytes_FromStringAndSize((const char *)p, view.len);
        }
        else if (took > 0) {
            taken++;
            taken_bytes += (unsigned long long)view.len;
            if (end > max_end) {
                max_end = end;
            }
        }
        PyBuffer_Release(&view);
        Py_DECREF(got);
        if (took < 0 || (took == 0 && rest == NULL)) {
            return NULL;
        }
        if (rest != NULL) {
            break;
        }
    }
    if (rest == NULL) {
        rest = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(nKKN)", taken, taken_bytes, (unsigned long long)max_end, rest);
}

static PyMethodDef methods[] = {
    {"plain_insert", (PyCFunction)(void (*)(void))plain_insert, METH_FASTCALL, plain_insert_doc},
    {"insert_frame", (PyCFunction)(void (*)(void))insert_frame, METH_FASTCALL, insert_frame_doc},
    {"insert_frames", (PyCFunction)(void (*)(void))insert_frames, METH_FASTCALL,
     insert_frames_doc},
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
