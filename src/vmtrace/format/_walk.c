/*
 * vmtrace.format._walk: the ring-buffer page walk of ringbuffer.py in C.
 *
 * The numpy walk in ringbuffer.py (_decode_pages_numpy) is the specification and the
 * oracle: for any bytes, this code must give the same events, lost marks and per-page
 * problems.  Pages come from a guest and are untrusted: every read is checked against
 * the page (and so the buffer), every loop advances by at least 4 bytes towards a bound,
 * and every write is checked against the output's size.
 *
 * Two entry points, both releasing the GIL while they walk:
 *
 *   pages(buf, npages, page_size, ts_off, commit_off, commit_size, data_off, big, info)
 *       fills info, an int64 array of npages x INFO_COLS (see below), and returns the
 *       number of events;
 *   events(buf, npages, ..., big, ts, off, len, tid)
 *       walks again and writes the events (uint64, int64, int32, uint16 arrays whose
 *       length is the count pages() returned).
 *
 * and gather(), the fixed-field columns of EventFormat.columns_at (see below).
 *
 * Plain CPython API and the buffer protocol only: no numpy headers at build time.
 *
 * Why one file of this size: a C extension is one compiled unit, and its three walks
 * share the record-header decoding and the bounds checks that make them safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TYPE_PADDING 29
#define TYPE_TIME_EXTEND 30
#define TYPE_TIME_STAMP 31
#define DATA_MAX_TYPE_LEN 28
#define TS_SHIFT 27
#define MISSED_EVENTS 0x80000000u
#define MISSED_STORED 0x40000000u
#define TS_MSB 0xF800000000000000ull
#define MAX_PAGE_SIZE (1 << 24)

/* Columns of the per-page info array. */
enum { I_COUNT, I_CODE, I_OFF, I_VAL, I_LOST, I_MISSED, I_TS, INFO_COLS };

typedef struct {
    Py_ssize_t page_size, ts_off, commit_off, commit_size, data_off;
    int big;
} layout_t;

static inline uint32_t rd32(const unsigned char *p, int big)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if PY_BIG_ENDIAN
    if (!big) v = __builtin_bswap32(v);
#else
    if (big) v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t rd64(const unsigned char *p, int big)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if PY_BIG_ENDIAN
    if (!big) v = __builtin_bswap64(v);
#else
    if (big) v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint16_t rd16(const unsigned char *p, int big)
{
    return big ? (uint16_t)((p[0] << 8) | p[1]) : (uint16_t)(p[0] | (p[1] << 8));
}

typedef struct {
    uint64_t *ts;
    int64_t *off;
    int32_t *len;
    uint16_t *tid;
    Py_ssize_t cap;    /* room left in the outputs */
} out_t;

/*
 * One page at buf + pstart (pstart is the page's offset in buf, so offsets written are
 * offsets in buf).  info gets the page's count, first problem, lost count, flags and
 * time stamp.  With out, events are written there; returns -1 if they do not fit.
 */
static int walk_page(const unsigned char *buf, int64_t pstart, const layout_t *L,
                     int64_t *info, out_t *out)
{
    const unsigned char *page = buf + pstart;
    const int big = L->big;
    const int64_t data_size = L->page_size - L->data_off;
    uint64_t page_ts = rd64(page + L->ts_off, big);
    uint64_t commit = L->commit_size == 8 ? rd64(page + L->commit_off, big)
                                          : (uint64_t)rd32(page + L->commit_off, big);
    commit &= 0xFFFFFFFFull;   /* flags arrive sign-extended on 64-bit guests */
    uint64_t flags = commit & (MISSED_EVENTS | MISSED_STORED);
    int64_t size = (int64_t)(commit & ~(uint64_t)(MISSED_EVENTS | MISSED_STORED));
    int64_t code = 0, poff = 0, pval = 0, lost = 0, count = 0;
    int bad_commit = size > data_size;
    int missed = (flags & MISSED_EVENTS) != 0;

    if (bad_commit) {
        code = 1;
        poff = pstart + L->commit_off;
        pval = size;
        size = 0;
    }
    int64_t data_start = pstart + L->data_off;
    int64_t end = data_start + size;
    int stored = missed && (flags & MISSED_STORED) && !bad_commit;
    if (stored) {
        if (size + L->commit_size <= data_size) {
            uint64_t v = L->commit_size == 8 ? rd64(buf + end, big)
                                             : (uint64_t)rd32(buf + end, big);
            lost = v < (1ull << 62) ? (int64_t)v : (int64_t)(1ull << 62);
        } else {
            code = 5;
            poff = end;
        }
    } else if (missed) {
        lost = -1;
    }

    if (!bad_commit) {
        int64_t p = data_start;
        uint64_t ts = page_ts;
        while (p < end) {
            /* p < end <= page end and p is 4-aligned within a 4-aligned page: 4 bytes. */
            uint32_t h = rd32(buf + p, big);
            uint32_t tl = big ? h >> 27 : h & 31;
            uint32_t td = big ? h & 0x7FFFFFF : h >> 5;
            if (tl >= 1 && tl <= DATA_MAX_TYPE_LEN) {
                int64_t total = 4 * (int64_t)tl + 4;
                if (p + total > end) {
                    code = 3; poff = p; pval = total;
                    break;
                }
                ts += td;
                if (out) {
                    if (out->cap <= 0) return -1;
                    *out->ts++ = ts;
                    *out->off++ = p + 4;
                    *out->len++ = (int32_t)(total - 4);
                    *out->tid++ = rd16(buf + p + 4, big);
                    out->cap--;
                }
                count++;
                p += total;
                continue;
            }
            if (tl == TYPE_PADDING && td == 0)
                break;                  /* the rest of the page is unused */
            if (p + 8 > end) {
                code = 2; poff = p;
                break;
            }
            uint32_t a0 = rd32(buf + p + 4, big);
            int64_t a0r = ((int64_t)a0 + 3) & ~(int64_t)3;
            int64_t total = (tl == 0 || tl == TYPE_PADDING) ? 4 + a0r : 8;
            if (p + total > end) {
                code = 3; poff = p; pval = total;
                break;
            }
            int64_t plen = a0r - 4;
            if (tl == 0 && plen < 2) {
                code = 4; poff = p; pval = plen;
                break;
            }
            uint64_t long_delta = (uint64_t)td | ((uint64_t)a0 << TS_SHIFT);
            if (tl == TYPE_TIME_EXTEND) {
                ts += long_delta;
            } else if (tl == TYPE_TIME_STAMP) {
                uint64_t msb = ts & TS_MSB;
                uint64_t abs_ts = long_delta | msb;
                if (msb != 0 && abs_ts < ts)
                    abs_ts += 1ull << 59;
                ts = abs_ts;
            } else {
                ts += td;
            }
            if (tl == 0) {
                if (out) {
                    if (out->cap <= 0) return -1;
                    *out->ts++ = ts;
                    *out->off++ = p + 8;
                    *out->len++ = (int32_t)plen;
                    *out->tid++ = rd16(buf + p + 8, big);
                    out->cap--;
                }
                count++;
            }
            p += total;
        }
    }
    if (info) {
        info[I_COUNT] = count;
        info[I_CODE] = code;
        info[I_OFF] = poff;
        info[I_VAL] = pval;
        info[I_LOST] = lost;
        info[I_MISSED] = missed;
        info[I_TS] = (int64_t)page_ts;
    }
    return 0;
}

/* Checks shared by both entry points; sets an exception and returns -1 if bad. */
static int check_layout(const Py_buffer *buf, Py_ssize_t npages, const layout_t *L)
{
    if (L->page_size <= 0 || L->page_size > MAX_PAGE_SIZE || L->page_size % 4) {
        PyErr_SetString(PyExc_ValueError, "bad page size");
        return -1;
    }
    if (L->commit_size != 4 && L->commit_size != 8) {
        PyErr_SetString(PyExc_ValueError, "commit size must be 4 or 8");
        return -1;
    }
    if (L->ts_off < 0 || L->commit_off < 0 || L->ts_off + 8 > L->data_off ||
        L->commit_off + L->commit_size > L->data_off || L->data_off % 4 ||
        L->data_off >= L->page_size) {
        PyErr_SetString(PyExc_ValueError, "inconsistent page layout");
        return -1;
    }
    if (npages < 0 || npages > buf->len / L->page_size) {
        PyErr_SetString(PyExc_ValueError, "more pages than the buffer holds");
        return -1;
    }
    return 0;
}

static int need(const Py_buffer *b, Py_ssize_t bytes, const char *what)
{
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s output too small", what);
        return -1;
    }
    return 0;
}

static PyObject *walk_pages(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf, info;
    Py_ssize_t npages;
    layout_t L;
    if (!PyArg_ParseTuple(args, "y*nnnnnnpw*", &buf, &npages, &L.page_size, &L.ts_off,
                          &L.commit_off, &L.commit_size, &L.data_off, &L.big, &info))
        return NULL;
    PyObject *res = NULL;
    if (check_layout(&buf, npages, &L) < 0 ||
        need(&info, npages * INFO_COLS * (Py_ssize_t)sizeof(int64_t), "info") < 0)
        goto done;
    {
        int64_t total = 0;
        int64_t *inf = (int64_t *)info.buf;
        const unsigned char *b = (const unsigned char *)buf.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < npages; i++) {
            int64_t row[INFO_COLS];
            walk_page(b, (int64_t)i * L.page_size, &L, row, NULL);
            memcpy(inf + i * INFO_COLS, row, sizeof row);
            total += row[I_COUNT];
        }
        Py_END_ALLOW_THREADS
        res = PyLong_FromLongLong(total);
    }
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&info);
    return res;
}

static PyObject *walk_events(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf, ts, off, len, tid;
    Py_ssize_t npages, n;
    layout_t L;
    if (!PyArg_ParseTuple(args, "y*nnnnnnpnw*w*w*w*", &buf, &npages, &L.page_size, &L.ts_off,
                          &L.commit_off, &L.commit_size, &L.data_off, &L.big, &n,
                          &ts, &off, &len, &tid))
        return NULL;
    PyObject *res = NULL;
    if (check_layout(&buf, npages, &L) < 0)
        goto done;
    if (n < 0 || need(&ts, n * 8, "ts") < 0 || need(&off, n * 8, "offset") < 0 ||
        need(&len, n * 4, "length") < 0 || need(&tid, n * 2, "type_id") < 0)
        goto done;
    {
        out_t o = {(uint64_t *)ts.buf, (int64_t *)off.buf, (int32_t *)len.buf,
                   (uint16_t *)tid.buf, n};
        const unsigned char *b = (const unsigned char *)buf.buf;
        int overflow = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < npages && !overflow; i++)
            overflow = walk_page(b, (int64_t)i * L.page_size, &L, NULL, &o) < 0;
        Py_END_ALLOW_THREADS
        if (overflow || o.cap != 0) {
            PyErr_SetString(PyExc_ValueError, "event count differs from the counting pass");
            goto done;
        }
        res = PyLong_FromSsize_t(n);
    }
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&ts);
    PyBuffer_Release(&off);
    PyBuffer_Release(&len);
    PyBuffer_Release(&tid);
    return res;
}

/*
 * gather(data, offs, lens, span, specs) -> n
 *
 * Fixed-position payload fields of n events into columns.  offs (int64) and lens
 * (int32) give each payload in data; specs is a sequence of (field offset, size, kind,
 * out) with out a writable buffer of n * size bytes.  kind 0 copies the field's bytes
 * (integers keep the payload's byte order: the caller's dtype says which), kind 1 is a
 * char[N]: bytes from the first NUL on are cleared.  A payload shorter than span (or
 * not inside data) gives a zero row; the caller decides whether that is an error.
 */
#define MAX_SPECS 1024

typedef struct {
    Py_ssize_t foff, size;
    int kind;
    unsigned char *out;
} spec_t;

static inline void copy_field(unsigned char *dst, const unsigned char *src, Py_ssize_t size)
{
    switch (size) {
    case 1: *dst = *src; break;
    case 2: memcpy(dst, src, 2); break;
    case 4: memcpy(dst, src, 4); break;
    case 8: memcpy(dst, src, 8); break;
    case 16: memcpy(dst, src, 16); break;
    default: memcpy(dst, src, (size_t)size);
    }
}

/* char[N]: clear from the first NUL on (short strings: a plain loop beats memchr). */
static inline void cut_at_nul(unsigned char *s, Py_ssize_t size)
{
    for (Py_ssize_t j = 0; j < size; j++) {
        if (s[j] == 0) {
            memset(s + j, 0, (size_t)(size - j));
            return;
        }
    }
}

static PyObject *gather(PyObject *self, PyObject *args)
{
    Py_buffer data, offs, lens;
    Py_ssize_t span;
    PyObject *specs_obj, *seq = NULL, *res = NULL;
    Py_buffer outs[MAX_SPECS];
    spec_t specs[MAX_SPECS];
    Py_ssize_t nspec = 0, got = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*nO", &data, &offs, &lens, &span, &specs_obj))
        return NULL;
    Py_ssize_t n = offs.len / 8;
    if (offs.len % 8 || lens.len != n * 4 || span < 0) {
        PyErr_SetString(PyExc_ValueError, "offsets (int64) and lengths (int32) differ");
        goto done;
    }
    seq = PySequence_Fast(specs_obj, "specs must be a sequence");
    if (!seq)
        goto done;
    nspec = PySequence_Fast_GET_SIZE(seq);
    if (nspec > MAX_SPECS) {
        PyErr_SetString(PyExc_ValueError, "too many fields");
        goto done;
    }
    for (got = 0; got < nspec; got++) {
        spec_t *sp = &specs[got];
        PyObject *item = PySequence_Fast_GET_ITEM(seq, got);
        if (!PyArg_ParseTuple(item, "nniw*", &sp->foff, &sp->size, &sp->kind, &outs[got]))
            goto done;
        sp->out = (unsigned char *)outs[got].buf;
        if (sp->foff < 0 || sp->size <= 0 || sp->foff + sp->size > span ||
            (sp->kind != 0 && sp->kind != 1) || outs[got].len < n * sp->size) {
            got++;
            PyErr_SetString(PyExc_ValueError, "bad field spec or output too small");
            goto done;
        }
    }
    {
        const unsigned char *d = (const unsigned char *)data.buf;
        const int64_t *o = (const int64_t *)offs.buf;
        const int32_t *l = (const int32_t *)lens.buf;
        const int64_t dlen = data.len;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t off = o[i];
            int ok = off >= 0 && l[i] >= span && off <= dlen - span;
            const unsigned char *row = d + (ok ? off : 0);
            for (Py_ssize_t k = 0; k < nspec; k++) {
                const spec_t *sp = &specs[k];
                unsigned char *dst = sp->out + i * sp->size;
                if (!ok) {
                    memset(dst, 0, (size_t)sp->size);
                    continue;
                }
                const unsigned char *src = row + sp->foff;
                copy_field(dst, src, sp->size);
                if (sp->kind == 1)
                    cut_at_nul(dst, sp->size);
            }
        }
        Py_END_ALLOW_THREADS
        res = PyLong_FromSsize_t(n);
    }
done:
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&outs[k]);
    Py_XDECREF(seq);
    PyBuffer_Release(&data);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&lens);
    return res;
}

/*
 * gather_types(data, offs, lens, tids, plans) -> rows written
 *
 * gather() for every event type of a batch in one pass in stream order (sequential
 * reads of the chunk instead of one scattered pass per type).  plans is a sequence of
 * (type id, span, sel, specs): sel (int64, one slot per event of that type) receives
 * the event's index in the batch, specs are as for gather() with one row per event of
 * that type.  Events of types without a plan are skipped.
 */
typedef struct {
    Py_ssize_t span, cap, next, first_spec, nspec;
    int64_t *sel;
} tplan_t;

static PyObject *gather_types(PyObject *self, PyObject *args)
{
    Py_buffer data, offs, lens, tids;
    PyObject *plans_obj, *seq = NULL, *res = NULL;
    Py_buffer *bufs = NULL;      /* sel buffers and spec outputs, in order */
    spec_t *specs = NULL;
    tplan_t *plans = NULL;
    int32_t *table = NULL;
    Py_ssize_t nbufs = 0, nspecs = 0, nplans = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*y*O", &data, &offs, &lens, &tids, &plans_obj))
        return NULL;
    Py_ssize_t n = offs.len / 8;
    if (offs.len % 8 || lens.len != n * 4 || tids.len != n * 2) {
        PyErr_SetString(PyExc_ValueError, "offsets (int64), lengths (int32), types (uint16) differ");
        goto done;
    }
    seq = PySequence_Fast(plans_obj, "plans must be a sequence");
    if (!seq)
        goto done;
    nplans = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t total_specs = 0;
    for (Py_ssize_t k = 0; k < nplans; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
            PyErr_SetString(PyExc_ValueError, "a plan is (type id, span, sel, specs)");
            goto done;
        }
        Py_ssize_t m = PySequence_Size(PyTuple_GET_ITEM(item, 3));
        if (m < 0)
            goto done;
        if (m > MAX_SPECS) {
            PyErr_SetString(PyExc_ValueError, "too many fields");
            goto done;
        }
        total_specs += m;
    }
    plans = PyMem_Calloc((size_t)nplans + 1, sizeof *plans);
    specs = PyMem_Calloc((size_t)total_specs + 1, sizeof *specs);
    bufs = PyMem_Calloc((size_t)(total_specs + nplans) + 1, sizeof *bufs);
    table = PyMem_Malloc(65536 * sizeof *table);
    if (!plans || !specs || !bufs || !table) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t t = 0; t < 65536; t++)
        table[t] = -1;
    for (Py_ssize_t k = 0; k < nplans; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        int tid;
        PyObject *sp_obj;
        tplan_t *pl = &plans[k];
        if (!PyArg_ParseTuple(item, "inw*O", &tid, &pl->span, &bufs[nbufs], &sp_obj))
            goto done;
        Py_buffer *selb = &bufs[nbufs++];
        pl->sel = (int64_t *)selb->buf;
        pl->cap = selb->len / 8;
        pl->first_spec = nspecs;
        if (tid < 0 || tid > 65535 || table[tid] >= 0 || pl->span < 0) {
            PyErr_SetString(PyExc_ValueError, "bad or repeated type id, or bad span");
            goto done;
        }
        table[tid] = (int32_t)k;
        PyObject *sps = PySequence_Fast(sp_obj, "specs must be a sequence");
        if (!sps)
            goto done;
        Py_ssize_t m = PySequence_Fast_GET_SIZE(sps);
        if (nspecs + m > total_specs) {
            Py_DECREF(sps);
            PyErr_SetString(PyExc_ValueError, "specs changed while parsing");
            goto done;
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            spec_t *sp = &specs[nspecs];
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sps, j), "nniw*", &sp->foff,
                                  &sp->size, &sp->kind, &bufs[nbufs])) {
                Py_DECREF(sps);
                goto done;
            }
            Py_buffer *ob = &bufs[nbufs++];
            sp->out = (unsigned char *)ob->buf;
            nspecs++;
            if (sp->foff < 0 || sp->size <= 0 || sp->foff + sp->size > pl->span ||
                (sp->kind != 0 && sp->kind != 1) || ob->len < pl->cap * sp->size) {
                Py_DECREF(sps);
                PyErr_SetString(PyExc_ValueError, "bad field spec or output too small");
                goto done;
            }
        }
        Py_DECREF(sps);
        pl->nspec = m;
    }
    {
        const unsigned char *d = (const unsigned char *)data.buf;
        const int64_t *o = (const int64_t *)offs.buf;
        const int32_t *l = (const int32_t *)lens.buf;
        const uint16_t *ty = (const uint16_t *)tids.buf;
        const int64_t dlen = data.len;
        Py_ssize_t written = 0;
        int overflow = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t k = table[ty[i]];
            if (k < 0)
                continue;
            tplan_t *pl = &plans[k];
            Py_ssize_t r = pl->next;
            if (r >= pl->cap) {
                overflow = 1;
                break;
            }
            pl->next = r + 1;
            pl->sel[r] = i;
            written++;
            int64_t off = o[i];
            Py_ssize_t span = pl->span;
            int ok = off >= 0 && l[i] >= span && off <= dlen - span;
            const unsigned char *row = d + (ok ? off : 0);
            const spec_t *sp = specs + pl->first_spec, *spend = sp + pl->nspec;
            for (; sp < spend; sp++) {
                unsigned char *dst = sp->out + r * sp->size;
                if (!ok) {
                    memset(dst, 0, (size_t)sp->size);
                    continue;
                }
                const unsigned char *src = row + sp->foff;
                copy_field(dst, src, sp->size);
                if (sp->kind == 1)
                    cut_at_nul(dst, sp->size);
            }
        }
        Py_END_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < nplans && !overflow; k++)
            overflow = plans[k].next != plans[k].cap;
        if (overflow) {
            PyErr_SetString(PyExc_ValueError, "event counts per type differ from the plans");
            goto done;
        }
        res = PyLong_FromSsize_t(written);
    }
done:
    for (Py_ssize_t k = 0; k < nbufs; k++)
        PyBuffer_Release(&bufs[k]);
    PyMem_Free(bufs);
    PyMem_Free(specs);
    PyMem_Free(plans);
    PyMem_Free(table);
    Py_XDECREF(seq);
    PyBuffer_Release(&data);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&tids);
    return res;
}

static PyMethodDef methods[] = {
    {"pages", walk_pages, METH_VARARGS,
     "pages(buf, npages, page_size, ts_off, commit_off, commit_size, data_off, big, info)"
     " -> events: per-page count, problem, lost count, flags, time stamp into info"},
    {"events", walk_events, METH_VARARGS,
     "events(buf, npages, page_size, ts_off, commit_off, commit_size, data_off, big, n,"
     " ts, off, len, tid) -> n: the events of every page"},
    {"gather", gather, METH_VARARGS,
     "gather(data, offs, lens, span, specs) -> n: fixed fields of n payloads into columns,"
     " specs = [(field offset, size, kind 0 bytes | 1 char[N] cut at NUL, out), ...]"},
    {"gather_types", gather_types, METH_VARARGS,
     "gather_types(data, offs, lens, tids, plans) -> rows: gather() for every type of a batch"
     " in one pass, plans = [(type id, span, sel out, specs), ...]"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmtrace.format._walk",
    "Ring-buffer page walk in C (the numpy walk in ringbuffer.py is its oracle).", -1, methods
};

PyMODINIT_FUNC PyInit__walk(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "INFO_COLS", INFO_COLS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
