/* train.data.decode_native: stored JPEGs -> resized crops, a whole chunk of a batch per call.

Hand-written C because this IS the loader's hot path: per image, Python around the codec cost
as much as the decode itself and serialised the worker threads on the GIL (docs/BENCHMARKS.md,
issue 10). One call fills many batch slots with the GIL released, so threads scale like
processes. Per image: header (its size must equal the record table's), the smallest
power-of-two DCT scale that keeps the output's resolution, decode ONLY the crop's region, then
PIL's antialiased bilinear resize in fixed point (decode_resample.h) with the flip folded in,
straight into the uint8 HWC slot. Every libjpeg warning rejects the image. docs/DESIGN.md has
the details; train/data/decode.py owns this module and its pure-Python fallback.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h> /* jpeglib.h needs FILE and size_t */
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#include "decode_resample.h"

#ifndef JCS_EXTENSIONS
#error "needs libjpeg-turbo's jpeglib.h (JCS_EXT_RGBX)"
#endif

enum { MODE_CROP = 0, MODE_REGION_ONLY = 1, MODE_FULL_ONLY = 2 };
/* Columns of the int64 params table, one row per image. */
enum { P_HEIGHT, P_WIDTH, P_TOP, P_LEFT, P_BOX_HEIGHT, P_BOX_WIDTH, P_FLIP, NUM_PARAMS };

#define ROWS_PER_READ 8
#define SLACK 16 /* bytes after a buffer that the resampling loops may touch */
#define EDGE_MARGIN 2 /* decoded columns beyond the box on each side (see decode_one) */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} error_state;

static void stop_on_error(j_common_ptr cinfo) {
    error_state *state = (error_state *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, state->message);
    longjmp(state->jump, 1);
}

/* level -1 is a warning: corrupt or truncated data that libjpeg would decode past. TurboJPEG's
   TJFLAG_STOPONWARNING does the same longjmp. Trace messages (level >= 0) are ignored. */
static void stop_on_warning(j_common_ptr cinfo, int level) {
    if (level < 0) stop_on_error(cinfo);
}

typedef struct {
    growable rows, horizontal, raw, x_first, x_count, x_weights, y_first, y_count, y_weights;
} scratch;

static void free_scratch(scratch *s) {
    growable *all[] = {&s->rows, &s->horizontal, &s->raw, &s->x_first, &s->x_count,
                       &s->x_weights, &s->y_first, &s->y_count, &s->y_weights};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]->data);
}

typedef struct {
    const unsigned char *data;
    size_t size;
    const int64_t *params;
    unsigned char *out; /* out_height x out_width x 3, or NULL in the decode-only modes */
} job;

static int dct_denominator(int64_t box_height, int64_t box_width, int out_height, int out_width) {
    for (int den = 8; den > 1; den /= 2)
        if (box_height >= (int64_t)out_height * den && box_width >= (int64_t)out_width * den) return den;
    return 1;
}

/* Reads `count` rows, ROWS_PER_READ at a time, into `rows` (row_bytes apart); with `x`, resamples
   each batch of rows into `horizontal`. */
static void read_rows(struct jpeg_decompress_struct *cinfo, int count, unsigned char *rows, size_t row_bytes,
                      const axis *x, int out_width, unsigned char *horizontal) {
    JSAMPROW pointers[ROWS_PER_READ];
    for (int done = 0; done < count;) {
        int want = count - done < ROWS_PER_READ ? count - done : ROWS_PER_READ;
        for (int got = 0; got < want;) { /* libjpeg hands out one or two rows a call */
            for (int i = got; i < want; i++) pointers[i - got] = rows + (size_t)i * row_bytes;
            JDIMENSION read = jpeg_read_scanlines(cinfo, pointers, (JDIMENSION)(want - got));
            if (read == 0) ERREXIT(cinfo, JERR_INPUT_EMPTY); /* cannot happen with a memory source */
            got += (int)read;
        }
        if (x != NULL)
            resample_rows(rows, row_bytes, want, x, out_width, horizontal + (size_t)done * out_width * 3,
                          (size_t)out_width * 3);
        done += want;
    }
}

/* Decodes (and in MODE_CROP resizes) one image; 0, or -1 with state->message set. */
static int decode_one(struct jpeg_decompress_struct *cinfo, error_state *state, scratch *s, const job *image,
                      int out_height, int out_width, int mode) {
    if (setjmp(state->jump)) {
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    const int64_t *p = image->params;
    jpeg_mem_src(cinfo, image->data, (unsigned long)image->size);
    jpeg_read_header(cinfo, TRUE);
    if ((int64_t)cinfo->image_height != p[P_HEIGHT] || (int64_t)cinfo->image_width != p[P_WIDTH]) {
        snprintf(state->message, sizeof(state->message), "decoded size %ux%u, the record table says %lldx%lld",
                 cinfo->image_height, cinfo->image_width, (long long)p[P_HEIGHT], (long long)p[P_WIDTH]);
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    if (p[P_TOP] < 0 || p[P_LEFT] < 0 || p[P_BOX_HEIGHT] < 1 || p[P_BOX_WIDTH] < 1 ||
        p[P_TOP] + p[P_BOX_HEIGHT] > p[P_HEIGHT] || p[P_LEFT] + p[P_BOX_WIDTH] > p[P_WIDTH]) {
        snprintf(state->message, sizeof(state->message), "crop box (%lld, %lld, %lld, %lld) is outside the %lldx%lld image",
                 (long long)p[P_TOP], (long long)p[P_LEFT], (long long)p[P_BOX_HEIGHT], (long long)p[P_BOX_WIDTH],
                 (long long)p[P_HEIGHT], (long long)p[P_WIDTH]);
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    int den = dct_denominator(p[P_BOX_HEIGHT], p[P_BOX_WIDTH], out_height, out_width);
    cinfo->out_color_space = JCS_EXT_RGBX; /* 4 bytes a pixel: one SIMD lane group each */
    cinfo->scale_num = 1;
    cinfo->scale_denom = (unsigned int)den;
    jpeg_start_decompress(cinfo);
    int scaled_height = (int)cinfo->output_height, scaled_width = (int)cinfo->output_width;
    if (mode == MODE_FULL_ONLY) {
        size_t row_bytes = (size_t)scaled_width * 4;
        unsigned char *rows = grow(&s->rows, row_bytes * ROWS_PER_READ + SLACK);
        if (rows == NULL) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 0);
        read_rows(cinfo, scaled_height, rows, row_bytes, NULL, 0, NULL);
        jpeg_abort_decompress(cinfo);
        return 0;
    }
    /* The box in decoded (scaled) pixels, and the whole pixels that hold it. */
    double top = (double)p[P_TOP] / den, left = (double)p[P_LEFT] / den;
    double bottom = (double)(p[P_TOP] + p[P_BOX_HEIGHT]) / den, right = (double)(p[P_LEFT] + p[P_BOX_WIDTH]) / den;
    int row0 = (int)floor(top), row1 = (int)ceil(bottom), col0 = (int)floor(left), col1 = (int)ceil(right);
    if (row1 > scaled_height) row1 = scaled_height;
    if (col1 > scaled_width) col1 = scaled_width;
    /* libjpeg upsamples chroma at a cropped region's edges as at the image's: two more columns
       each side keep the box's own columns as a full decode has them. */
    int margin_left = col0 < EDGE_MARGIN ? col0 : EDGE_MARGIN;
    int margin_right = scaled_width - col1 < EDGE_MARGIN ? scaled_width - col1 : EDGE_MARGIN;
    JDIMENSION x_offset = (JDIMENSION)(col0 - margin_left);
    JDIMENSION crop_width = (JDIMENSION)(col1 + margin_right - (col0 - margin_left));
    if (crop_width < (JDIMENSION)scaled_width) jpeg_crop_scanline(cinfo, &x_offset, &crop_width);
    if (row0 > 0) jpeg_skip_scanlines(cinfo, (JDIMENSION)row0);
    size_t row_bytes = (size_t)crop_width * 4;
    int region_rows = row1 - row0;
    unsigned char *rows = grow(&s->rows, row_bytes * ROWS_PER_READ + SLACK);
    if (rows == NULL) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 0);
    if (mode == MODE_REGION_ONLY) {
        read_rows(cinfo, region_rows, rows, row_bytes, NULL, 0, NULL);
        jpeg_abort_decompress(cinfo);
        return 0;
    }
    /* Region coordinates: columns from x_offset, rows from row0. */
    axis x, y;
    int origin = (int)x_offset;
    if (axis_init(&x, &s->x_first, &s->x_count, &s->x_weights, &s->raw, left - origin, right - origin,
                  col0 - origin, col1 - origin, out_width, (int)p[P_FLIP]) ||
        axis_init(&y, &s->y_first, &s->y_count, &s->y_weights, &s->raw, top - row0, bottom - row0, 0,
                  region_rows, out_height, 0))
        ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 1);
    size_t out_row_bytes = (size_t)out_width * 3;
    unsigned char *horizontal = grow(&s->horizontal, out_row_bytes * region_rows + SLACK);
    if (horizontal == NULL) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 2);
    read_rows(cinfo, region_rows, rows, row_bytes, &x, out_width, horizontal);
    jpeg_abort_decompress(cinfo); /* the rows below the crop are never decoded */
    resample_columns(horizontal, out_row_bytes, &y, out_height, image->out);
    return 0;
}

PyDoc_STRVAR(decode_crops_doc,
"decode_crops(out, out_height, out_width, jpegs, params, mode=0) -> None | (position, reason)\n\n"
"Fill out (a writable C-contiguous uint8 buffer of len(jpegs) x out_height x out_width x 3)\n"
"with each JPEG's crop, resized; params: C-contiguous int64 rows (height, width, top, left,\n"
"box_height, box_width, flip). Stops at the first bad image and returns its position and why.\n"
"mode 1: decode only the crop's region; mode 2: decode the whole image; neither writes out.\n"
"Runs without the GIL.");

static PyObject *decode_crops(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"out", "out_height", "out_width", "jpegs", "params", "mode", NULL};
    PyObject *out_object, *jpegs_object, *params_object;
    int out_height, out_width, mode = MODE_CROP;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiiOO|i", keywords, &out_object, &out_height, &out_width,
                                     &jpegs_object, &params_object, &mode))
        return NULL;
    if (out_height < 1 || out_width < 1 || mode < MODE_CROP || mode > MODE_FULL_ONLY) {
        PyErr_SetString(PyExc_ValueError, "need out_height, out_width >= 1 and mode in 0..2");
        return NULL;
    }
    PyObject *jpegs = PySequence_Fast(jpegs_object, "jpegs must be a sequence of buffers");
    if (jpegs == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(jpegs);
    Py_buffer out = {0}, params = {0};
    Py_buffer *buffers = PyMem_Calloc(count > 0 ? count : 1, sizeof(Py_buffer));
    job *jobs = PyMem_Calloc(count > 0 ? count : 1, sizeof(job));
    Py_ssize_t acquired = 0;
    PyObject *result = NULL;
    if (buffers == NULL || jobs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyObject_GetBuffer(params_object, &params, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    if (params.itemsize != 8 || params.len != (Py_ssize_t)(count * NUM_PARAMS * 8)) {
        PyErr_Format(PyExc_ValueError, "params must hold %zd x %d int64", count, NUM_PARAMS);
        goto done;
    }
    size_t image_bytes = (size_t)out_height * out_width * 3;
    if (PyObject_GetBuffer(out_object, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (out.len != (Py_ssize_t)(image_bytes * count)) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, %zd images of %dx%dx3 need %zd", out.len, count,
                     out_height, out_width, (Py_ssize_t)(image_bytes * count));
        goto done;
    }
    for (; acquired < count; acquired++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(jpegs, acquired), &buffers[acquired], PyBUF_SIMPLE) < 0)
            goto done;
        jobs[acquired].data = buffers[acquired].buf;
        jobs[acquired].size = (size_t)buffers[acquired].len;
        jobs[acquired].params = (const int64_t *)params.buf + acquired * NUM_PARAMS;
        jobs[acquired].out = (unsigned char *)out.buf + acquired * image_bytes;
    }
    volatile Py_ssize_t failed = -1;
    error_state state;
    struct jpeg_decompress_struct cinfo;
    scratch s;
    memset(&s, 0, sizeof(s));
    Py_BEGIN_ALLOW_THREADS
    cinfo.err = jpeg_std_error(&state.pub);
    state.pub.error_exit = stop_on_error;
    state.pub.emit_message = stop_on_warning;
    state.message[0] = '\0';
    if (setjmp(state.jump) == 0) {
        jpeg_create_decompress(&cinfo);
        for (Py_ssize_t i = 0; i < count; i++) {
            if (decode_one(&cinfo, &state, &s, &jobs[i], out_height, out_width, mode)) {
                failed = i;
                break;
            }
        }
        jpeg_destroy_decompress(&cinfo);
    } else {
        failed = 0; /* jpeg_create_decompress itself failed (a libjpeg of another ABI) */
    }
    free_scratch(&s);
    Py_END_ALLOW_THREADS
    if (failed >= 0)
        result = Py_BuildValue("(ns)", failed, state.message[0] ? state.message : "libjpeg failed");
    else
        result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < acquired; i++) PyBuffer_Release(&buffers[i]);
    if (out.obj != NULL) PyBuffer_Release(&out);
    if (params.obj != NULL) PyBuffer_Release(&params);
    PyMem_Free(buffers);
    PyMem_Free(jobs);
    Py_DECREF(jpegs);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_crops", (PyCFunction)(void (*)(void))decode_crops, METH_VARARGS | METH_KEYWORDS, decode_crops_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "train.data.decode_native",
    "Stored JPEGs -> resized crops in one GIL-free call (see train/data/decode.py).", -1, methods,
};

PyMODINIT_FUNC PyInit_decode_native(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    if (PyModule_AddIntConstant(module, "JPEG_LIB_VERSION", JPEG_LIB_VERSION) < 0 ||
        PyModule_AddIntConstant(module, "MODE_CROP", MODE_CROP) < 0 ||
        PyModule_AddIntConstant(module, "MODE_REGION_ONLY", MODE_REGION_ONLY) < 0 ||
        PyModule_AddIntConstant(module, "MODE_FULL_ONLY", MODE_FULL_ONLY) < 0 ||
        PyModule_AddIntConstant(module, "NUM_PARAMS", NUM_PARAMS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
