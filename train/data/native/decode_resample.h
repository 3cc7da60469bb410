/* The resize half of train/data/native/decode_native.c (included once, by it): PIL's antialiased bilinear
(triangle) filter over a float box, per-axis weights in 14-bit fixed point (int16, as
pillow-simd), a horizontal pass of decoded RGBX rows to uint8 RGB, then a vertical one, as Pillow
rounds. SSE2 where the compiler has it, plain C otherwise. */
#ifndef SHARDTRAIN_DECODE_RESAMPLE_H
#define SHARDTRAIN_DECODE_RESAMPLE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define PRECISION_BITS 14 /* int16 weights (Pillow uses 22 bits in int32; pillow-simd int16 too) */
#define ROUNDING (1 << (PRECISION_BITS - 1))


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

#endif
