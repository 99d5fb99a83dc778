/*
 * projections._speedups: the projector's fold of the common row, compiled (optional).
 *
 * One entry point, the type `Fold`. `Fold(loads, created_at_us, parse_stamp, unstamped,
 * max_stamp_len, record_state)` takes the functions and constants it shares with the Python
 * path (projections/fastpath.py hands them over); calling the object folds rows:
 *
 *     fold(rows, start, stop, indexes_of, missions, agents, changed_missions, changed_agents,
 *          lsn, applied_us)
 *
 * folds `rows[start:stop]` ((relation, values) pairs, as stream.transactions.RowInsert)
 * into the two state tables (projections.stores.StateTable) exactly as `decode_columns` +
 * `SnapshotStore.apply` + `apply_row` do (projections/decode.py, stores.py, merge.py), in
 * order, until the first row it declines, and returns where it stopped (see fold_doc). It
 * takes the rows that make up nearly all of a stream: an `insert` or `update` of an `ai`
 * mission or agent that is new or exists and is not deleted, with every column present,
 * well-formed ids, JSON objects in `data` and `field_meta`, and a parseable `created_at`.
 * At any other row it stops before changing anything for it, and the caller takes the
 * Python path for that row, which decides everything else (deletes, tombstones, dead
 * letters, an agent's `deletedAt`). The Python code is the definition; unit tests hold this
 * file to it on generated rows and states.
 *
 * What it relies on and keeps: the StateTable contract (states, dirty, live; see
 * projections/stores.py); RecordState objects are made with its constructor and read and
 * written through its attributes (their descriptors, found once by the constructor).
 *
 * `field_meta` is read in place when it can be (see `scan_meta`): only each field's stamp
 * text matters to the merge, and building the entries' objects would cost more than the
 * rest of the row's merge. Where the scanner is not sure, `loads` parses it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static PyObject *s_exists, *s_deleted, *s_values, *s_keys, *s_last_lsn, *s_last_applied_us;
static PyObject *s_at, *s_deleted_at, *s_states, *s_dirty, *s_live;

#define MEMO_TEXT 64

/* RecordState attributes the fold reads and writes. */
enum { A_EXISTS, A_DELETED, A_VALUES, A_KEYS, A_LAST_LSN, A_LAST_APPLIED, N_ATTRS };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *loads;         /* orjson.loads: bytes -> object */
    PyObject *created_at_us; /* decode._created_at_us: bytes -> int | None */
    PyObject *parse_stamp;   /* instants.parse_stamp_text: str -> int | None */
    PyObject *meta_loads;    /* NULL: field_meta is scanned in place (see scan_meta) */
    long long unstamped;     /* merge.UNSTAMPED */
    Py_ssize_t max_stamp_len;
    PyTypeObject *state_type; /* merge.RecordState */
    /* Its data descriptors, or NULL where the attribute machinery must be asked instead. */
    PyObject *attr[N_ATTRS];
    /* The last stamp text parsed and its result: the fields of a row, and the rows of a
       transaction, nearly always share one stamp. */
    struct {
        Py_ssize_t len;  /* -1: empty */
        int ok;
        long long value;
        char text[MEMO_TEXT];
    } stamp_memo;
    /* The last `created_at` text parsed and its instant, in µs. */
    struct {
        Py_ssize_t len;  /* -1: empty */
        long long value;
        char text[MEMO_TEXT];
    } created_memo;
} FoldObject;

static PyObject *const *attr_names[N_ATTRS] = {&s_exists, &s_deleted, &s_values, &s_keys,
                                               &s_last_lsn, &s_last_applied_us};

/* `obj.<attr>` (new reference): through the descriptor found at construction when `obj` is
   exactly a RecordState, else the attribute machinery. */
static PyObject *
get_attr(FoldObject *f, PyObject *obj, int a)
{
    PyObject *d = f->attr[a];
    if (d != NULL && Py_TYPE(obj) == f->state_type) {
        return Py_TYPE(d)->tp_descr_get(d, obj, (PyObject *)f->state_type);
    }
    return PyObject_GetAttr(obj, *attr_names[a]);
}

static int
set_attr(FoldObject *f, PyObject *obj, int a, PyObject *v)
{
    PyObject *d = f->attr[a];
    if (d != NULL && Py_TYPE(obj) == f->state_type) {
        return Py_TYPE(d)->tp_descr_set(d, obj, v);
    }
    return PyObject_SetAttr(obj, *attr_names[a], v);
}

enum { COL_ID, COL_APP, COL_TABLE, COL_RECORD, COL_USER, COL_OP, COL_DATA, COL_META,
       COL_CREATED, N_COLUMNS };

/* The result code of one row (apply_columns): R_CHANGED when the record changed (it is then
   in the dirty dict and its key appended to the changed list, with last_lsn/last_applied_us
   set), R_AGENT for an agent row, R_CREATED when the row created the record (a new, live
   RecordState in the states dict), and the number of invalid stamps shifted left by
   R_INVALID_SHIFT. */
#define R_CHANGED 1
#define R_AGENT 2
#define R_CREATED 4
#define R_INVALID_SHIFT 3

static int
bytes_is(PyObject *b, const char *text, Py_ssize_t n)
{
    return PyBytes_GET_SIZE(b) == n && memcmp(PyBytes_AS_STRING(b), text, (size_t)n) == 0;
}

static int
is_ascii(PyObject *b)
{
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(b);
    Py_ssize_t n = PyBytes_GET_SIZE(b);
    unsigned char any = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        any |= p[i];
    }
    return any < 0x80;
}

/* `name in RESERVED_FIELDS` ("id", "__fieldMeta"). */
static int
is_reserved(PyObject *name)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    return (n == 2 && PyUnicode_CompareWithASCIIString(name, "id") == 0)
           || (n == 11 && PyUnicode_CompareWithASCIIString(name, "__fieldMeta") == 0);
}

static void
put_biased(unsigned char *out, long long v)
{
    /* v + 2**63 as an unsigned big-endian 64-bit integer: the order of `struct.pack(">Q")`
       of the biased value, as merge.make_key builds it. */
    uint64_t u = ((uint64_t)v) ^ ((uint64_t)1 << 63);
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(u & 0xff);
        u >>= 8;
    }
}

/* merge.make_key(stamp, created_at, event_id) for an event id whose UTF-8 bytes are `event`. */
static PyObject *
make_key(long long stamp, long long created, PyObject *event)
{
    Py_ssize_t n = PyBytes_GET_SIZE(event);
    PyObject *key = PyBytes_FromStringAndSize(NULL, 16 + n);
    if (key == NULL) {
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(key);
    put_biased(p, stamp);
    put_biased(p + 8, created);
    memcpy(p + 16, PyBytes_AS_STRING(event), (size_t)n);
    return key;
}

/* Call `fn(arg)`; on a ValueError (which covers orjson's JSONDecodeError and
   UnicodeDecodeError) clear it and set *declined: the Python path decides about the row. */
static PyObject *
call_or_decline(PyObject *fn, PyObject *arg, int *declined)
{
    PyObject *r = PyObject_CallOneArg(fn, arg);
    if (r == NULL && PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        *declined = 1;
    }
    return r;
}

static PyObject *
decode_utf8(PyObject *b, int *declined)
{
    PyObject *s = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), NULL);
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        *declined = 1;
    }
    return s;
}

/* --- field_meta read in place ------------------------------------------------------------
 *
 * `scan_meta` reads a `field_meta` text that is a JSON object and records, per member, its
 * name and its stamp text: the member's value when that is a string, the `at` of an object
 * value when that is a string (the last `at` of the object, as orjson keeps the last of
 * duplicate keys), none otherwise. It accepts a subset of JSON on which orjson.loads returns
 * a dict whose entries give the same texts: strings without escapes, control characters or
 * non-ASCII bytes (so every name and text is its own UTF-8 and its own str), numbers without
 * exponent and of bounded length (never infinite), literals, containers nested at most
 * MAX_JSON_DEPTH deep, JSON whitespace, at most MAX_META_ENTRIES members. Anything else, valid
 * or not, is declined and goes to orjson. A unit test checks accepted texts against orjson. */

#define MAX_META_ENTRIES 64
#define MAX_JSON_DEPTH 64
#define MAX_NUMBER_LEN 64

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    const char *text;     /* NULL: the entry has no stamp text */
    Py_ssize_t text_len;
} meta_entry;

typedef struct {
    int n;
    meta_entry e[MAX_META_ENTRIES];
} meta_index;

typedef struct {
    const unsigned char *p, *end;
} cursor;

static void
skip_ws(cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) {
        c->p++;
    }
}

static int
expect(cursor *c, unsigned char ch)
{
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        skip_ws(c);
        return 1;
    }
    return 0;
}

static int
scan_string(cursor *c, const char **s, Py_ssize_t *n)
{
    if (c->p >= c->end || *c->p != '"') {
        return 0;
    }
    const unsigned char *start = ++c->p;
    for (; c->p < c->end; c->p++) {
        unsigned char ch = *c->p;
        if (ch == '"') {
            *s = (const char *)start;
            *n = c->p - start;
            c->p++;
            return 1;
        }
        if (ch == '\\' || ch < 0x20 || ch >= 0x80) {
            return 0;
        }
    }
    return 0;
}

static int
scan_literal(cursor *c, const char *lit, Py_ssize_t n)
{
    if (c->end - c->p < n || memcmp(c->p, lit, (size_t)n) != 0) {
        return 0;
    }
    c->p += n;
    return 1;
}

static int
is_digit(cursor *c)
{
    return c->p < c->end && *c->p >= '0' && *c->p <= '9';
}

/* A number without exponent: what follows it must be a separator, so the caller declines
   `1e999` (which orjson rejects as infinite) at its `e`. Bounded in length, so never
   infinite itself. */
static int
scan_number(cursor *c)
{
    const unsigned char *start = c->p;
    if (c->p < c->end && *c->p == '-') {
        c->p++;
    }
    if (!is_digit(c)) {
        return 0;
    }
    if (*c->p++ != '0') {
        while (is_digit(c)) {
            c->p++;
        }
    }
    if (c->p < c->end && *c->p == '.') {
        c->p++;
        if (!is_digit(c)) {
            return 0;
        }
        while (is_digit(c)) {
            c->p++;
        }
    }
    return c->p - start <= MAX_NUMBER_LEN;
}

/* The cursor on a container's opening bracket: steps in; 1 when the container closes at
   once (consumed too), 0 when members follow. */
static int
open_container(cursor *c, unsigned char close)
{
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 1;
    }
    return 0;
}

/* After a member: 1 when the container closes here (consumed), 0 when a comma and another
   member follow, -1 for anything else. */
static int
after_member(cursor *c, unsigned char close)
{
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 1;
    }
    if (c->p < c->end && *c->p == ',') {
        c->p++;
        skip_ws(c);
        return 0;
    }
    return -1;
}

static int skip_value(cursor *c, int depth);

/* An object or array at `depth`; the cursor is on its opening bracket. */
static int
skip_container(cursor *c, int depth)
{
    unsigned char close = *c->p == '{' ? '}' : ']';
    if (open_container(c, close)) {
        return 1;
    }
    for (;;) {
        if (close == '}') {
            const char *s;
            Py_ssize_t n;
            if (!scan_string(c, &s, &n) || !expect(c, ':')) {
                return 0;
            }
        }
        if (!skip_value(c, depth)) {
            return 0;
        }
        int end = after_member(c, close);
        if (end != 0) {
            return end > 0;
        }
    }
}

/* A value inside a container at `depth`. */
static int
skip_value(cursor *c, int depth)
{
    if (c->p >= c->end) {
        return 0;
    }
    const char *s;
    Py_ssize_t n;
    switch (*c->p) {
    case '"':
        return scan_string(c, &s, &n);
    case '{':
    case '[':
        return depth < MAX_JSON_DEPTH && skip_container(c, depth + 1);
    case 't':
        return scan_literal(c, "true", 4);
    case 'f':
        return scan_literal(c, "false", 5);
    case 'n':
        return scan_literal(c, "null", 4);
    default:
        return scan_number(c);
    }
}

/* The object value of a field_meta member (depth 2): its last `at` if a string, into `e`. */
static int
scan_stamp_object(cursor *c, meta_entry *e)
{
    if (open_container(c, '}')) {
        return 1;
    }
    for (;;) {
        const char *key;
        Py_ssize_t key_len;
        if (!scan_string(c, &key, &key_len) || !expect(c, ':')) {
            return 0;
        }
        int ok;
        if (key_len == 2 && key[0] == 'a' && key[1] == 't') {
            e->text = NULL;
            ok = c->p < c->end && *c->p == '"' ? scan_string(c, &e->text, &e->text_len)
                                               : skip_value(c, 2);
        }
        else {
            ok = skip_value(c, 2);
        }
        int end = ok ? after_member(c, '}') : -1;
        if (end != 0) {
            return end > 0;
        }
    }
}

/* 1: `buf` is a JSON object of the subset above, its members in `mi`; 0: declined. */
static int
scan_meta(const char *buf, Py_ssize_t len, meta_index *mi)
{
    cursor c = {(const unsigned char *)buf, (const unsigned char *)buf + len};
    mi->n = 0;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') {
        return 0;
    }
    int end = open_container(&c, '}');
    while (end == 0) {
        if (mi->n == MAX_META_ENTRIES) {
            return 0;
        }
        meta_entry *e = &mi->e[mi->n++];
        e->text = NULL;
        e->text_len = 0;
        if (!scan_string(&c, &e->name, &e->name_len) || !expect(&c, ':')) {
            return 0;
        }
        int ok;
        if (c.p < c.end && *c.p == '"') {
            ok = scan_string(&c, &e->text, &e->text_len);
        }
        else if (c.p < c.end && *c.p == '{') {
            ok = scan_stamp_object(&c, e);
        }
        else {
            ok = skip_value(&c, 1);
        }
        end = ok ? after_member(&c, '}') : -1;
    }
    if (end < 0) {
        return 0;
    }
    skip_ws(&c);
    return c.p == c.end;
}

/* What field_meta says about field `name`: STAMP_ABSENT (no entry), STAMP_TEXT (a string
   entry, or an object entry whose `at` is a string; its text in *text and *len when ASCII) or
   STAMP_NONE (any other entry); -1 with an exception set. From the parsed dict `meta`, or
   when that is NULL from `mi`.
   A text that is not ASCII counts as STAMP_NONE: the stamp grammar is ASCII, so the Python
   path's parser rejects it (merge._parse_text) just the same. */
enum { STAMP_ABSENT, STAMP_TEXT, STAMP_NONE };

static int
stamp_of(PyObject *meta, int attr_stamps, const meta_index *mi, PyObject *name,
         const char **text, Py_ssize_t *len)
{
    if (meta != NULL) {
        PyObject *raw = PyDict_GetItemWithError(meta, name);
        if (raw == NULL) {
            return PyErr_Occurred() ? -1 : STAMP_ABSENT;
        }
        PyObject *t = raw;
        if (PyDict_Check(raw)) {
            t = PyDict_GetItemWithError(raw, s_at);
            if (t == NULL) {
                return PyErr_Occurred() ? -1 : STAMP_NONE;
            }
        }
        else if (attr_stamps && !PyUnicode_Check(raw)) {
            /* A stamp object of `meta_loads`, which holds its `at` (so the text outlives
               the reference dropped here). */
            t = PyObject_GetAttr(raw, s_at);
            if (t == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                    return -1;
                }
                PyErr_Clear();
                return STAMP_NONE;
            }
            Py_DECREF(t);
        }
        if (!PyUnicode_Check(t) || !PyUnicode_IS_ASCII(t)) {
            return STAMP_NONE;
        }
        *text = (const char *)PyUnicode_DATA(t);
        *len = PyUnicode_GET_LENGTH(t);
        return STAMP_TEXT;
    }
    /* Every name in `mi` is ASCII, so a name that is not cannot be among them. */
    if (!PyUnicode_IS_ASCII(name)) {
        return STAMP_ABSENT;
    }
    const char *s = (const char *)PyUnicode_DATA(name);
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    for (int i = mi->n - 1; i >= 0; i--) {  /* the last of duplicate names, as orjson */
        const meta_entry *e = &mi->e[i];
        if (e->name_len == n && memcmp(e->name, s, (size_t)n) == 0) {
            if (e->text == NULL) {
                return STAMP_NONE;
            }
            *text = e->text;
            *len = e->text_len;
            return STAMP_TEXT;
        }
    }
    return STAMP_ABSENT;
}

/* merge._parse_text on an ASCII text: 1 with the instant in *out, 0 if it has none, -1 with
   an exception set. */
static int
parse_text(FoldObject *f, const char *text, Py_ssize_t len, long long *out)
{
    if (len > f->max_stamp_len) {
        return 0;
    }
    if (f->stamp_memo.len != len || memcmp(f->stamp_memo.text, text, (size_t)len) != 0) {
        PyObject *s = PyUnicode_FromStringAndSize(text, len);
        if (s == NULL) {
            return -1;
        }
        PyObject *parsed = PyObject_CallOneArg(f->parse_stamp, s);
        Py_DECREF(s);
        if (parsed == NULL) {
            return -1;
        }
        int ok = parsed != Py_None;
        long long value = 0;
        if (ok) {
            value = PyLong_AsLongLong(parsed);
            if (value == -1 && PyErr_Occurred()) {
                Py_DECREF(parsed);
                return -1;
            }
        }
        Py_DECREF(parsed);
        memcpy(f->stamp_memo.text, text, (size_t)len);
        f->stamp_memo.len = len;
        f->stamp_memo.ok = ok;
        f->stamp_memo.value = value;
    }
    *out = f->stamp_memo.value;
    return f->stamp_memo.ok;
}

/* apply_row's loop over the fields of `data` for a state that exists and is not deleted,
   the stamps from the dict `meta` or, when that is NULL, from `mi`. Returns the number of
   invalid stamps, or -1 with an exception set; *changed is set when a field's value or key
   changed. */
static long
merge_fields(FoldObject *f, PyObject *values, PyObject *keys, PyObject *data, PyObject *meta,
             int attr_stamps, const meta_index *mi, long long created, PyObject *event, int may_be_unstamped,
             int *changed)
{
    long invalid = 0;
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    int have_last_stamp = 0;
    long long last_stamp = 0;
    PyObject *last_key = NULL;    /* strong */

    while (PyDict_Next(data, &pos, &name, &value)) {
        if (!PyUnicode_Check(name)) {
            goto fail_type;  /* orjson only makes str keys; never reached */
        }
        if (is_reserved(name)) {
            continue;
        }
        const char *text = NULL;
        Py_ssize_t text_len = 0;
        int found = stamp_of(meta, attr_stamps, mi, name, &text, &text_len);
        if (found < 0) {
            goto fail;
        }
        long long stamp;
        if (found == STAMP_ABSENT && may_be_unstamped) {
            stamp = f->unstamped;
        }
        else {
            int ok = found == STAMP_TEXT ? parse_text(f, text, text_len, &stamp) : 0;
            if (ok < 0) {
                goto fail;
            }
            if (!ok) {
                stamp = created;
                invalid++;
            }
        }
        if (!have_last_stamp || stamp != last_stamp) {
            have_last_stamp = 1;
            last_stamp = stamp;
            Py_XSETREF(last_key, make_key(stamp, created, event));
            if (last_key == NULL) {
                goto fail;
            }
        }
        PyObject *current = PyDict_GetItemWithError(keys, name);
        if (current == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            Py_INCREF(name);
            PyUnicode_InternInPlace(&name);  /* one field-name string for all records */
            int err = PyDict_SetItem(keys, name, last_key) < 0
                      || PyDict_SetItem(values, name, value) < 0;
            Py_DECREF(name);
            if (err) {
                goto fail;
            }
            *changed = 1;
        }
        else {
            int greater = PyObject_RichCompareBool(last_key, current, Py_GT);
            if (greater < 0) {
                goto fail;
            }
            if (greater) {
                if (PyDict_SetItem(keys, name, last_key) < 0
                    || PyDict_SetItem(values, name, value) < 0) {
                    goto fail;
                }
                *changed = 1;
            }
        }
    }
    Py_XDECREF(last_key);
    return invalid;

fail_type:
    PyErr_SetString(PyExc_TypeError, "a field name of data is not a str");
fail:
    Py_XDECREF(last_key);
    return -1;
}

/* One row, its COLUMNS values in `col` (borrowed), into the stores: `stores` holds the
   mission states, dirty dict and changed list, then the agents'. Returns the result code (see
   below) as a C long >= 0; -1 with an exception set; -2 when declined (nothing changed). */
static long
apply_columns(FoldObject *f, PyObject **col, PyObject *const *stores, PyObject *lsn,
              PyObject *applied_us)
{
    for (int i = 0; i < N_COLUMNS; i++) {
        if (!PyBytes_CheckExact(col[i])) {
            return -2;
        }
    }
    if (!bytes_is(col[COL_APP], "ai", 2)) {
        return -2;
    }
    int agent;
    if (bytes_is(col[COL_TABLE], "aiMissions", 10)) {
        agent = 0;
    }
    else if (bytes_is(col[COL_TABLE], "agents", 6)) {
        agent = 1;
    }
    else {
        return -2;
    }
    int is_insert;
    if (bytes_is(col[COL_OP], "insert", 6)) {
        is_insert = 1;
    }
    else if (bytes_is(col[COL_OP], "update", 6)) {
        is_insert = 0;
    }
    else {
        return -2;  /* deletes (and unknown ops) take the Python path */
    }
    if (PyBytes_GET_SIZE(col[COL_ID]) == 0 || PyBytes_GET_SIZE(col[COL_RECORD]) == 0
        || PyBytes_GET_SIZE(col[COL_USER]) == 0) {
        return -2;
    }
    PyObject *states = stores[agent ? 3 : 0];
    PyObject *dirty = stores[agent ? 4 : 1];
    PyObject *changed_list = stores[agent ? 5 : 2];

    int declined = 0;
    long long created = 0;
    PyObject *user = NULL, *record = NULL, *key = NULL, *state = NULL;
    PyObject *data = NULL, *meta = NULL, *exists = NULL, *deleted = NULL;
    PyObject *values = NULL, *keys = NULL;
    meta_index mi;
    long result = -1;

    const char *created_text = PyBytes_AS_STRING(col[COL_CREATED]);
    Py_ssize_t created_len = PyBytes_GET_SIZE(col[COL_CREATED]);
    if (created_len == f->created_memo.len
        && memcmp(created_text, f->created_memo.text, (size_t)created_len) == 0) {
        created = f->created_memo.value;  /* the rows of a transaction share its start time */
    }
    else {
        PyObject *created_obj = PyObject_CallOneArg(f->created_at_us, col[COL_CREATED]);
        if (created_obj == NULL) {
            return -1;
        }
        if (created_obj == Py_None) {
            Py_DECREF(created_obj);
            return -2;
        }
        created = PyLong_AsLongLong(created_obj);
        Py_DECREF(created_obj);
        if (created == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                return -1;
            }
            PyErr_Clear();
            return -2;
        }
        if (created_len <= MEMO_TEXT) {
            memcpy(f->created_memo.text, created_text, (size_t)created_len);
            f->created_memo.len = created_len;
            f->created_memo.value = created;
        }
    }
    /* The event id must be UTF-8 (the Python path decodes it); its bytes are then the key's
       event part, as `event_id.encode("utf-8", "surrogatepass")` gives them back. */
    if (!is_ascii(col[COL_ID])) {
        PyObject *event_text = decode_utf8(col[COL_ID], &declined);
        if (event_text == NULL) {
            return declined ? -2 : -1;
        }
        Py_DECREF(event_text); /* decoded only to validate */
    }
    record = decode_utf8(col[COL_RECORD], &declined);
    if (record == NULL) {
        goto done;
    }
    user = decode_utf8(col[COL_USER], &declined);
    if (user == NULL) {
        goto done;
    }
    data = call_or_decline(f->loads, col[COL_DATA], &declined);
    if (data == NULL) {
        goto done;
    }
    int attr_stamps = 0;
    if (f->meta_loads != NULL) {
        meta = PyObject_CallOneArg(f->meta_loads, col[COL_META]);
        if (meta == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                goto done;
            }
            PyErr_Clear();  /* not of its shape: `loads` parses it */
        }
        else if (!PyDict_CheckExact(meta)) {
            Py_CLEAR(meta);
        }
        else {
            attr_stamps = 1;
        }
    }
    if (meta == NULL
        && (f->meta_loads != NULL
            || !scan_meta(PyBytes_AS_STRING(col[COL_META]), PyBytes_GET_SIZE(col[COL_META]),
                          &mi))) {
        meta = call_or_decline(f->loads, col[COL_META], &declined);
        if (meta == NULL) {
            goto done;
        }
        if (!PyDict_CheckExact(meta)) {
            declined = 1;
            goto done;
        }
    }
    if (!PyDict_CheckExact(data)) {
        declined = 1;
        goto done;
    }
    if (agent) {
        /* An agent's liveness reads its merged deletedAt: the Python path keeps the count. */
        int has = PyDict_Contains(data, s_deleted_at);
        if (has != 0) {
            declined = has > 0;
            goto done;
        }
    }
    key = PyTuple_Pack(2, user, record);
    if (key == NULL) {
        goto done;
    }
    state = PyDict_GetItemWithError(states, key);
    int is_new = 0;
    if (state == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        /* A new record, as SnapshotStore.apply makes it: RecordState(user_id, record_id),
           stored under its key; apply_row then sets `exists` (below). Every decline is
           behind us: from here on the row is taken. */
        state = PyObject_CallFunctionObjArgs((PyObject *)f->state_type, user, record, NULL);
        if (state == NULL) {
            goto done;
        }
        if (PyDict_SetItem(states, key, state) < 0
            || set_attr(f, state, A_EXISTS, Py_True) < 0) {
            goto done;
        }
        is_new = 1;
    }
    else {
        Py_INCREF(state);
        exists = get_attr(f, state, A_EXISTS);
        if (exists == NULL) {
            goto done;
        }
        deleted = get_attr(f, state, A_DELETED);
        if (deleted == NULL) {
            goto done;
        }
        if (exists != Py_True || deleted != Py_False) {
            declined = 1;
            goto done;
        }
    }
    long invalid = 0;
    int changed = is_new;
    if (PyDict_GET_SIZE(data) > 0) {
        values = get_attr(f, state, A_VALUES);
        if (values == NULL) {
            goto done;
        }
        keys = get_attr(f, state, A_KEYS);
        if (keys == NULL) {
            goto done;
        }
        if (!PyDict_CheckExact(values) || !PyDict_CheckExact(keys)) {
            declined = !is_new;  /* RecordState() makes exact dicts: never for a new one */
            if (is_new) {
                PyErr_SetString(PyExc_TypeError, "a new RecordState without dicts");
            }
            goto done;
        }
        invalid = merge_fields(f, values, keys, data, meta, attr_stamps, &mi, created, col[COL_ID], is_insert,
                               &changed);
        if (invalid < 0) {
            goto done;
        }
    }
    if (changed) {
        if (PyDict_SetItem(dirty, key, state) < 0
            || set_attr(f, state, A_LAST_LSN, lsn) < 0
            || set_attr(f, state, A_LAST_APPLIED, applied_us) < 0
            || PyList_Append(changed_list, key) < 0) {
            goto done;
        }
    }
    result = (changed ? R_CHANGED : 0) | (agent ? R_AGENT : 0) | (is_new ? R_CREATED : 0)
             | (invalid << R_INVALID_SHIFT);

done:
    Py_XDECREF(user);
    Py_XDECREF(record);
    Py_XDECREF(key);
    Py_XDECREF(state);
    Py_XDECREF(data);
    Py_XDECREF(meta);
    Py_XDECREF(exists);
    Py_XDECREF(deleted);
    Py_XDECREF(values);
    Py_XDECREF(keys);
    if (result < 0 && declined && !PyErr_Occurred()) {
        return -2;
    }
    return result;
}

/* A table's `states` and `dirty` dicts (new references), checked to be exact dicts. */
static int
table_dicts(PyObject *table, PyObject **states, PyObject **dirty)
{
    *states = PyObject_GetAttr(table, s_states);
    *dirty = *states == NULL ? NULL : PyObject_GetAttr(table, s_dirty);
    if (*dirty == NULL) {
        Py_CLEAR(*states);
        return -1;
    }
    if (!PyDict_CheckExact(*states) || !PyDict_CheckExact(*dirty)) {
        Py_CLEAR(*states);
        Py_CLEAR(*dirty);
        PyErr_SetString(PyExc_TypeError, "a state table's states and dirty must be dicts");
        return -1;
    }
    return 0;
}

/* table.live += n, keeping an exception that is already set. */
static int
count_live(PyObject *table, long n)
{
    if (n == 0) {
        return 0;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int err = -1;
    PyObject *live = PyObject_GetAttr(table, s_live);
    if (live != NULL) {
        PyObject *add = PyLong_FromLong(n);
        PyObject *sum = add == NULL ? NULL : PyNumber_Add(live, add);
        err = sum == NULL ? -1 : PyObject_SetAttr(table, s_live, sum);
        Py_XDECREF(add);
        Py_XDECREF(sum);
        Py_DECREF(live);
    }
    if (type != NULL) {
        PyErr_Restore(type, value, tb);  /* the first error is the one to report */
    }
    return err;
}

PyDoc_STRVAR(fold_doc,
"Fold(loads, created_at_us, parse_stamp, unstamped, max_stamp_len, record_state, *,\n"
"     meta_loads=None)\n"
"\n"
"The compiled fold of the common row, over the Python path's own collaborators: `loads`\n"
"(orjson.loads), `created_at_us` (bytes -> int | None), `parse_stamp` (str -> int | None),\n"
"`unstamped` (merge.UNSTAMPED), `max_stamp_len` (0..64) and `record_state` (the class of\n"
"the states it creates, called as record_state(user_id, record_id)). `meta_loads`, when\n"
"given, parses every field_meta text in place of the in-place scanner: a dict whose values\n"
"are stamp texts or objects holding theirs in `at` (where it raises, `loads` parses the\n"
"text); bench/stages.py --field-meta measures one against the other. Calling it:\n"
"\n"
"fold(rows, start, stop, indexes_of, missions, agents, changed_missions, changed_agents,\n"
"     lsn, applied_us)\n"
"    -> (next, mission_rows, agent_rows, invalid_stamps, foreign_rows, new_records)\n"
"\n"
"Folds rows[start:stop] (a list or tuple of (relation, values) pairs) in order into the\n"
"state tables `missions` and `agents` (their `states`, `dirty` and `live`, as\n"
"projections.stores.StateTable documents them), as decode_columns + SnapshotStore.apply\n"
"would, until the first row it declines: `next` is that row's position (nothing was\n"
"changed for it; the caller applies it the Python way and calls again from the one\n"
"after), or `stop` when every row was taken. `indexes_of(relation)` gives the positions\n"
"of the nine COLUMNS in that relation's values, or None for a relation that is not\n"
"sync_changes (its rows are counted as foreign). The key of each record a row changed is\n"
"appended to `changed_missions` or `changed_agents`, and a changed state's last_lsn and\n"
"last_applied_us become `lsn` and `applied_us`. new_records counts the records the rows\n"
"created (live ones, added to their table's `live`).");

static PyObject *
fold_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FoldObject *f = (FoldObject *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 10 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)) {
        PyErr_Format(PyExc_TypeError, "fold() takes 10 positional arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t stop = PyLong_AsSsize_t(args[2]);
    if (stop == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *rows = args[0], *indexes_of = args[3], *tables[2] = {args[4], args[5]};
    PyObject *changed[2] = {args[6], args[7]}, *lsn = args[8], *applied_us = args[9];
    if (!(PyList_CheckExact(rows) || PyTuple_CheckExact(rows)) || !PyList_Check(changed[0])
        || !PyList_Check(changed[1])) {
        PyErr_SetString(PyExc_TypeError, "fold() takes a list or tuple of rows and two lists");
        return NULL;
    }
    /* mission states, dirty, changed list, then the agents'; as apply_columns reads them */
    PyObject *stores[6] = {NULL, NULL, changed[0], NULL, NULL, changed[1]};
    if (table_dicts(tables[0], &stores[0], &stores[1]) < 0) {
        return NULL;
    }
    if (table_dicts(tables[1], &stores[3], &stores[4]) < 0) {
        Py_DECREF(stores[0]);
        Py_DECREF(stores[1]);
        return NULL;
    }
    /* mission rows, agent rows, invalid stamps, foreign rows, new missions, new agents */
    long counts[6] = {0, 0, 0, 0, 0, 0};
    PyObject *relation = NULL;     /* strong: the relation `idx` belongs to */
    int have_idx = 0;              /* 0: foreign relation */
    Py_ssize_t idx[N_COLUMNS];
    Py_ssize_t i = start < 0 ? 0 : start;
    int failed = 0;
    for (;; i++) {
        /* The length is read again each time: the calls out (indexes_of, loads) run Python. */
        Py_ssize_t n = PyList_CheckExact(rows) ? PyList_GET_SIZE(rows) : PyTuple_GET_SIZE(rows);
        if (i >= stop || i >= n) {
            break;
        }
        PyObject *row = PyList_CheckExact(rows) ? PyList_GET_ITEM(rows, i)
                                                : PyTuple_GET_ITEM(rows, i);
        if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 2) {
            PyErr_SetString(PyExc_TypeError, "a row must be a (relation, values) tuple");
            failed = 1;
            break;
        }
        Py_INCREF(row);  /* kept while its items are used */
        PyObject *rel = PyTuple_GET_ITEM(row, 0);
        if (rel != relation) {
            PyObject *positions = PyObject_CallOneArg(indexes_of, rel);
            Py_XSETREF(relation, Py_NewRef(rel));
            have_idx = 0;
            if (positions == NULL) {
                Py_DECREF(row);
                failed = 1;
                break;
            }
            if (positions != Py_None) {
                int bad = !PyTuple_Check(positions) || PyTuple_GET_SIZE(positions) != N_COLUMNS;
                for (int k = 0; !bad && k < N_COLUMNS; k++) {
                    idx[k] = PyLong_AsSsize_t(PyTuple_GET_ITEM(positions, k));
                    bad = idx[k] == -1 && PyErr_Occurred();
                }
                have_idx = !bad;
                if (bad && !PyErr_Occurred()) {
                    PyErr_SetString(PyExc_TypeError, "indexes_of() must return 9 positions");
                }
            }
            Py_DECREF(positions);
            if (PyErr_Occurred()) {
                Py_DECREF(row);
                Py_CLEAR(relation);
                failed = 1;
                break;
            }
        }
        if (!have_idx) {
            Py_DECREF(row);
            counts[3]++;
            continue;
        }
        PyObject *values = PyTuple_GET_ITEM(row, 1);
        PyObject *col[N_COLUMNS];
        int picked = PyTuple_CheckExact(values);
        for (int k = 0; picked && k < N_COLUMNS; k++) {
            if (idx[k] < 0 || idx[k] >= PyTuple_GET_SIZE(values)) {
                picked = 0;
            }
            else {
                col[k] = PyTuple_GET_ITEM(values, idx[k]);
            }
        }
        long code = picked ? apply_columns(f, col, stores, lsn, applied_us) : -2;
        Py_DECREF(row);
        if (code == -1) {
            failed = 1;
            break;
        }
        if (code == -2) {
            break;
        }
        int agent = (code & R_AGENT) != 0;
        counts[agent]++;
        counts[2] += code >> R_INVALID_SHIFT;
        if (code & R_CREATED) {
            counts[4 + agent]++;
        }
    }
    Py_XDECREF(relation);
    for (int k = 0; k < 6; k++) {
        if (k != 2 && k != 5) {
            Py_DECREF(stores[k]);
        }
    }
    /* Created records are live (see apply_columns): the tables' counts follow, also when a
       later row failed. */
    if (count_live(tables[0], counts[4]) < 0 || count_live(tables[1], counts[5]) < 0) {
        failed = 1;
    }
    if (failed) {
        return NULL;
    }
    return Py_BuildValue("(nlllll)", i, counts[0], counts[1], counts[2], counts[3],
                         counts[4] + counts[5]);
}

static PyObject *
fold_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"loads", "created_at_us", "parse_stamp", "unstamped",
                             "max_stamp_len", "record_state", "meta_loads", NULL};
    PyObject *loads, *created, *parse, *meta_loads = Py_None;
    PyTypeObject *state_cls;
    long long unst;
    Py_ssize_t max_len;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOLnO!|$O:Fold", kwlist, &loads,
                                     &created, &parse, &unst, &max_len, &PyType_Type,
                                     &state_cls, &meta_loads)) {
        return NULL;
    }
    if (meta_loads != Py_None && !PyCallable_Check(meta_loads)) {
        PyErr_SetString(PyExc_TypeError, "meta_loads must be None or callable");
        return NULL;
    }
    if (!PyCallable_Check(loads) || !PyCallable_Check(created) || !PyCallable_Check(parse)) {
        PyErr_SetString(PyExc_TypeError, "Fold() takes three callables");
        return NULL;
    }
    if (max_len < 0 || max_len > MEMO_TEXT) {
        PyErr_Format(PyExc_ValueError, "max_stamp_len must be within 0..%d", MEMO_TEXT);
        return NULL;
    }
    FoldObject *f = (FoldObject *)type->tp_alloc(type, 0);
    if (f == NULL) {
        return NULL;
    }
    f->vectorcall = fold_call;
    f->loads = Py_NewRef(loads);
    f->created_at_us = Py_NewRef(created);
    f->parse_stamp = Py_NewRef(parse);
    f->meta_loads = meta_loads == Py_None ? NULL : Py_NewRef(meta_loads);
    f->unstamped = unst;
    f->max_stamp_len = max_len;
    f->state_type = (PyTypeObject *)Py_NewRef(state_cls);
    f->stamp_memo.len = -1;
    f->created_memo.len = -1;
    /* The descriptors stand in for the attribute machinery only where that would find them
       itself: generic attribute access, and a data descriptor on the class. */
    int generic = state_cls->tp_getattro == PyObject_GenericGetAttr
                  && state_cls->tp_setattro == PyObject_GenericSetAttr;
    for (int a = 0; a < N_ATTRS; a++) {
        PyObject *d = generic ? PyObject_GetAttr((PyObject *)state_cls, *attr_names[a]) : NULL;
        if (d == NULL) {
            PyErr_Clear();
        }
        else if (Py_TYPE(d)->tp_descr_get == NULL || Py_TYPE(d)->tp_descr_set == NULL) {
            Py_CLEAR(d);
        }
        f->attr[a] = d;
    }
    return (PyObject *)f;
}

static void
fold_dealloc(FoldObject *f)
{
    Py_XDECREF(f->loads);
    Py_XDECREF(f->created_at_us);
    Py_XDECREF(f->parse_stamp);
    Py_XDECREF(f->meta_loads);
    Py_XDECREF(f->state_type);
    for (int a = 0; a < N_ATTRS; a++) {
        Py_XDECREF(f->attr[a]);
    }
    PyTypeObject *type = Py_TYPE(f);
    type->tp_free((PyObject *)f);
}

static PyTypeObject FoldType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "projections._speedups.Fold",
    .tp_basicsize = sizeof(FoldObject),
    .tp_dealloc = (destructor)fold_dealloc,
    .tp_vectorcall_offset = offsetof(FoldObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = fold_doc,
    .tp_new = fold_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "projections._speedups",
    "The projector's fold of the common row, compiled: one entry point, the type Fold\n"
    "(see projections/fastpath.py).",
    -1,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_exists, "exists"}, {&s_deleted, "deleted"}, {&s_values, "values"},
        {&s_keys, "keys"}, {&s_last_lsn, "last_lsn"}, {&s_last_applied_us, "last_applied_us"},
        {&s_at, "at"}, {&s_deleted_at, "deletedAt"}, {&s_states, "states"},
        {&s_dirty, "dirty"}, {&s_live, "live"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].slot == NULL) {
            *names[i].slot = PyUnicode_InternFromString(names[i].text);
            if (*names[i].slot == NULL) {
                return NULL;
            }
        }
    }
    if (PyType_Ready(&FoldType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Fold", (PyObject *)&FoldType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
