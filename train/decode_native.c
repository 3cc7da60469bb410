/* train.decode_native: stored JPEGs -> resized crops, a whole chunk of a batch per call.

Hand-written C because this IS the loader's hot path: per image, Python around the codec
(a resize call, a tobytes, a flip, a copy, a few objects) cost as much as the decode itself and
serialised the worker threads on the GIL (docs/BENCHMARKS.md, issue 10). One call here fills
many batch slots with the GIL released, so worker threads scale like processes. train/decode.py
owns it, picks it or its pure-Python fallback, and documents the contract.

Per image, with libjpeg (-ljpeg; libjpeg-turbo's jpeglib.h):
  1. header; its size must equal the record table's (else the bytes are not that record);
  2. the smallest power-of-two DCT scale (1/8, 1/4, 1/2) whose decoded box still has at
     least the output's resolution (train.augment.dct_scale_for_box's rule);
  3. decode ONLY the crop's region: jpeg_crop_scanline for its columns (widened by libjpeg to
     iMCU edges), jpeg_skip_scanlines above it, stop (jpeg_abort_decompress) below it;
  4. antialiased bilinear resize of the float box (PIL's triangle filter: support widened by
     the downscale factor; per-axis weights in 22-bit fixed point; horizontal pass to uint8,
     then vertical, as Pillow rounds), taps limited to the box's whole pixels (crop, then
     resize, as torchvision's RandomResizedCrop), the flip folded into the horizontal weights,
     written straight into the uint8 HWC slot.
Every libjpeg warning (corrupt data, which libjpeg would paper over with grey) and every error
stops the chunk and names the image's position; train/decode.py turns that into an error naming
the record. Modes 1 and 2 decode without resizing (the benchmark's region and full floors).
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

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifndef JCS_EXTENSIONS
#error "needs libjpeg-turbo's jpeglib.h (JCS_EXT_RGBX)"
#endif

enum { MODE_CROP = 0, MODE_REGION_ONLY = 1, MODE_FULL_ONLY = 2 };
/* Columns of the int64 params table, one row per image. */
enum { P_HEIGHT, P_WIDTH, P_TOP, P_LEFT, P_BOX_HEIGHT, P_BOX_WIDTH, P_FLIP, NUM_PARAMS };

#define PRECISION_BITS 14 /* int16 weights (Pillow uses 22 bits in int32; pillow-simd int16 too) */
#define ROUNDING (1 << (PRECISION_BITS - 1))
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

/* Buffers that grow and are reused across the images of one call. */
typedef struct {
    void *data;
    size_t size;
} growable;

static void *grow(growable *buffer, size_t size) {
    if (size > buffer->size) {
        void *data = realloc(buffer->data, size);
        if (data == NULL) return NULL;
        buffer->data = data;
        buffer->size = size;
    }
    return buffer->data;
}

typedef struct {
    growable rows, horizontal, raw, x_first, x_count, x_weights, y_first, y_count, y_weights;
} scratch;

static void free_scratch(scratch *s) {
    growable *all[] = {&s->rows, &s->horizontal, &s->raw, &s->x_first, &s->x_count,
                       &s->x_weights, &s->y_first, &s->y_count, &s->y_weights};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]->data);
}

/* One axis of the resize: output sample o takes `count[o]` taps from input `first[o]` on, with
   weights `weights[o * taps ...]` (int16, PRECISION_BITS fixed point, zero past count[o]; `taps`
   is even so the SIMD loops take them in pairs). */
typedef struct {
    int taps;
    int *first, *count;
    int16_t *weights;
} axis;

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* PIL's coefficients for the float box [in0, in1) of an input axis resized to `out_size`, taps
   limited to [low, high). `mirror` stores output o's weights at out_size - 1 - o. */
static int axis_init(axis *a, growable *first, growable *count, growable *weights, growable *raw_buffer,
                     double in0, double in1, int low, int high, int out_size, int mirror) {
    double scale = (in1 - in0) / out_size;
    double filter_scale = scale < 1.0 ? 1.0 : scale;
    double support = filter_scale; /* the triangle's support is 1 */
    int taps = (int)ceil(support) * 2 + 2; /* PIL's ceil(support) * 2 + 1, rounded up to even */
    double *raw = grow(raw_buffer, sizeof(double) * taps);
    a->taps = taps;
    a->first = grow(first, sizeof(int) * out_size);
    a->count = grow(count, sizeof(int) * out_size);
    a->weights = grow(weights, sizeof(int16_t) * (size_t)out_size * taps);
    if (raw == NULL || a->first == NULL || a->count == NULL || a->weights == NULL) return -1;
    for (int o = 0; o < out_size; o++) {
        double center = in0 + (o + 0.5) * scale;
        int start = (int)floor(center - support + 0.5);
        int end = (int)floor(center + support + 0.5);
        if (start < low) start = low;
        if (end > high) end = high;
        if (end <= start) { /* a box narrower than one tap at the edge: nearest pixel */
            start = end > low ? end - 1 : low;
            end = start + 1;
        }
        double total = 0.0;
        for (int i = 0; i < end - start; i++) {
            raw[i] = triangle((start + i - center + 0.5) / filter_scale);
            total += raw[i];
        }
        int slot = mirror ? out_size - 1 - o : o;
        int16_t *w = a->weights + (size_t)slot * taps;
        for (int i = 0; i < taps; i++) {
            double normalized = i < end - start ? (total > 0.0 ? raw[i] / total : 1.0) : 0.0;
            w[i] = (int16_t)floor(normalized * (1 << PRECISION_BITS) + 0.5);
        }
        a->first[slot] = start;
        a->count[slot] = end - start;
    }
    return 0;
}

static inline uint32_t load32(const unsigned char *p) {
    uint32_t value;
    memcpy(&value, p, 4);
    return value;
}

static inline unsigned char clip8(int32_t value) {
    value >>= PRECISION_BITS;
    return value < 0 ? 0 : value > 255 ? 255 : (unsigned char)value;
}

/* `num_rows` decoded RGBX rows (`row_bytes` apart) -> out_width resampled RGB pixels each, rows
   `out_row_bytes` apart. Reads up to one pixel past a row's last tap (weight 0) and writes one
   byte past each row's last pixel: callers leave slack for both. The SSE2 loop takes 4 rows per
   pass over the weights, each tap pair in one multiply-add over all four channels. */
__attribute__((noinline)) static void resample_rows(const unsigned char *restrict rows, size_t row_bytes, int num_rows, const axis *x,
                          int out_width, unsigned char *restrict out, size_t out_row_bytes) {
    const int *restrict first = x->first, *restrict count = x->count;
    const int16_t *restrict weights = x->weights;
    const int taps = x->taps;
    int r = 0;
#if defined(__SSE2__)
    const __m128i zero = _mm_setzero_si128();
    for (; r + 4 <= num_rows; r += 4) {
        const unsigned char *row = rows + (size_t)r * row_bytes;
        unsigned char *target = out + (size_t)r * out_row_bytes;
        for (int o = 0; o < out_width; o++) {
            const unsigned char *pixel = row + 4 * first[o];
            const int16_t *w = weights + (size_t)o * taps;
            __m128i sum0 = _mm_set1_epi32(ROUNDING), sum1 = sum0, sum2 = sum0, sum3 = sum0;
            for (int i = 0, n = count[o]; i < n; i += 2) {
                __m128i weight = _mm_set1_epi32((int)load32((const unsigned char *)(w + i)));
                const unsigned char *p = pixel + 4 * i;
#define TAP_PAIR(sum, k)                                                                                    \
    sum = _mm_add_epi32(sum, _mm_madd_epi16(_mm_unpacklo_epi8(_mm_unpacklo_epi8(                          \
                                                _mm_cvtsi32_si128((int)load32(p + (k) * row_bytes)),        \
                                                _mm_cvtsi32_si128((int)load32(p + (k) * row_bytes + 4))),   \
                                                zero),                                                      \
                                            weight))
                TAP_PAIR(sum0, 0);
                TAP_PAIR(sum1, 1);
                TAP_PAIR(sum2, 2);
                TAP_PAIR(sum3, 3);
#undef TAP_PAIR
            }
            __m128i pack01 = _mm_packs_epi32(_mm_srai_epi32(sum0, PRECISION_BITS), _mm_srai_epi32(sum1, PRECISION_BITS));
            __m128i pack23 = _mm_packs_epi32(_mm_srai_epi32(sum2, PRECISION_BITS), _mm_srai_epi32(sum3, PRECISION_BITS));
            __m128i bytes = _mm_packus_epi16(pack01, pack23); /* row0 RGBX, row1 RGBX, row2 RGBX, row3 RGBX */
            uint32_t rgbx[4];
            _mm_storeu_si128((__m128i *)rgbx, bytes);
            if (o + 1 < out_width) { /* the 4th byte lands in the next pixel, rewritten next */
                for (int k = 0; k < 4; k++) memcpy(target + (size_t)k * out_row_bytes + 3 * o, &rgbx[k], 4);
            } else {
                for (int k = 0; k < 4; k++) memcpy(target + (size_t)k * out_row_bytes + 3 * o, &rgbx[k], 3);
            }
        }
    }
#endif
    for (; r < num_rows; r++) {
        const unsigned char *row = rows + (size_t)r * row_bytes;
        unsigned char *target = out + (size_t)r * out_row_bytes;
        for (int o = 0; o < out_width; o++) {
            const unsigned char *pixel = row + 4 * first[o];
            const int16_t *w = weights + (size_t)o * taps;
            int32_t red = ROUNDING, green = ROUNDING, blue = ROUNDING;
            for (int i = 0, n = count[o]; i < n; i++) {
                red += pixel[4 * i] * w[i];
                green += pixel[4 * i + 1] * w[i];
                blue += pixel[4 * i + 2] * w[i];
            }
            target[3 * o] = clip8(red);
            target[3 * o + 1] = clip8(green);
            target[3 * o + 2] = clip8(blue);
        }
    }
}

/* Rows of horizontally resampled pixels (`row_bytes` apart) -> the output, vertically. */
__attribute__((noinline)) static void resample_columns(const unsigned char *restrict rows, size_t row_bytes, const axis *y, int out_height,
                             unsigned char *restrict out) {
    for (int o = 0; o < out_height; o++) {
        const int16_t *w = y->weights + (size_t)o * y->taps;
        const unsigned char *source = rows + (size_t)y->first[o] * row_bytes;
        int n = y->count[o];
        unsigned char *restrict target = out + (size_t)o * row_bytes;
        size_t j = 0;
#if defined(__SSE2__)
        const __m128i zero = _mm_setzero_si128();
        for (; j + 16 <= row_bytes; j += 16) {
            __m128i sum0 = _mm_set1_epi32(ROUNDING), sum1 = sum0, sum2 = sum0, sum3 = sum0;
            for (int i = 0; i < n; i += 2) {
                /* an odd count's last pair repeats its row with weight 0 (never past the rows) */
                const unsigned char *second = source + (size_t)(i + 1 < n ? i + 1 : i) * row_bytes;
                __m128i a = _mm_loadu_si128((const __m128i *)(source + (size_t)i * row_bytes + j));
                __m128i b = _mm_loadu_si128((const __m128i *)(second + j));
                __m128i weight = _mm_set1_epi32((int)load32((const unsigned char *)(w + i)));
                __m128i low = _mm_unpacklo_epi8(a, b), high = _mm_unpackhi_epi8(a, b);
                sum0 = _mm_add_epi32(sum0, _mm_madd_epi16(_mm_unpacklo_epi8(low, zero), weight));
                sum1 = _mm_add_epi32(sum1, _mm_madd_epi16(_mm_unpackhi_epi8(low, zero), weight));
                sum2 = _mm_add_epi32(sum2, _mm_madd_epi16(_mm_unpacklo_epi8(high, zero), weight));
                sum3 = _mm_add_epi32(sum3, _mm_madd_epi16(_mm_unpackhi_epi8(high, zero), weight));
            }
            __m128i first_half = _mm_packs_epi32(_mm_srai_epi32(sum0, PRECISION_BITS), _mm_srai_epi32(sum1, PRECISION_BITS));
            __m128i second_half = _mm_packs_epi32(_mm_srai_epi32(sum2, PRECISION_BITS), _mm_srai_epi32(sum3, PRECISION_BITS));
            _mm_storeu_si128((__m128i *)(target + j), _mm_packus_epi16(first_half, second_half));
        }
#endif
        for (; j < row_bytes; j++) {
            int32_t sum = ROUNDING;
            for (int i = 0; i < n; i++) sum += source[(size_t)i * row_bytes + j] * w[i];
            target[j] = clip8(sum);
        }
    }
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
    PyModuleDef_HEAD_INIT, "train.decode_native",
    "Stored JPEGs -> resized crops in one GIL-free call (see train/decode.py).", -1, methods,
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
