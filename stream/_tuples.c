/*
 * stream._tuples: the consumer's frame loop for plain Inserts, compiled.
 *
 * One entry point, `pump(get_copy_data, limit, unchanged, relations, inserts)`, which
 * `TransactionAssembler.add_insert_frames` (and through it `FrameReader.pump`) calls: it
 * reads frames with psycopg's `get_copy_data` and, for each XLogData frame that carries one
 * exact, well-formed Insert of a described relation, appends the row `(relation, values)` to
 * the open transaction's `inserts`, with no Python step per frame. At the first frame it does
 * not take it stops and hands that frame back, and the caller's general path (frame codec,
 * pgoutput decoder, assembler) reads it again and reports what is wrong with it, if anything.
 * It never raises for bad input. The Python fused path (`PgOutputDecoder.plain_insert` with
 * `TransactionAssembler.add_insert`) is the definition it is held to, by unit tests that feed
 * and pump the same captured, generated and damaged frames.
 *
 * Message layout (PostgreSQL "Logical Replication Message Formats"): Byte1('I'),
 * Int32 relation OID, Byte1('N'), Int16 column count, then per column a kind byte: 'n'
 * (NULL), 'u' (unchanged TOAST), 't' or 'b' followed by an Int32 length and the bytes.
 * The frame around it: Byte1('w'), Int64 WAL start, Int64 WAL end, Int64 send time.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

/* The frame p[0:n] if it is an XLogData frame carrying one plain Insert of a described
   relation: appends the row to `inserts` and returns 1 with its WAL end in *end. 0 when it
   is not (nothing done), -1 with an exception set. The row is the 2-tuple
   (relation, values), the shape of stream.transactions.RowInsert. */
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
    PyObject *row = PyTuple_Pack(2, relation, values);
    Py_DECREF(values);
    if (row == NULL) {
        return -1;
    }
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

PyDoc_STRVAR(pump_doc,
"pump(get_copy_data, limit, unchanged, relations, inserts)\n"
"    -> (taken, taken_bytes, wal_end, rest)\n"
"\n"
"Reads frames with get_copy_data(True) (psycopg's PGconn.get_copy_data: (size, buffer),\n"
"size 0 when none is buffered, -1 at the end of the copy, -2 on error) and takes, up to\n"
"`limit` of them, each XLogData frame that carries exactly one well-formed Insert (values:\n"
"bytes for 't' and 'b', None for 'n', `unchanged` for 'u') of a relation in the dict\n"
"`relations` (OID -> relation): it appends (relation, values) to the list `inserts`.\n"
"`inserts` None takes no frame (a stream block is open: its Inserts carry an xid).\n"
"The caller makes sure a plain transaction is open whenever `inserts` is a list.\n"
"Returns how many frames it took, their bytes, the highest WAL end among them (0 if\n"
"none), and `rest`: the first frame it did not take, as bytes; get_copy_data's size when\n"
"that was <= 0; or None after `limit` frames. An error of get_copy_data after frames were\n"
"taken is left for the next call, which raises it. Bad input never raises: such a frame\n"
"is handed back as `rest`.");

static PyObject *
pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "pump() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *get_copy_data = args[0], *unchanged = args[2], *relations = args[3];
    PyObject *inserts = args[4] == Py_None ? NULL : args[4];
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyDict_Check(relations) || (inserts != NULL && !PyList_Check(inserts))) {
        PyErr_SetString(PyExc_TypeError, "pump() takes a dict and a list or None");
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
    {"pump", (PyCFunction)(void (*)(void))pump, METH_FASTCALL, pump_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "stream._tuples",
    "The consumer's frame loop for plain Inserts, compiled: one entry point, pump()\n"
    "(see stream/reader.py).",
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
