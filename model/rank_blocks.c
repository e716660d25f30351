/* The search after the int8 first pass of model.ranking.Int8Catalogue, one row at a time.
 *
 * The same steps as Int8Catalogue._search in torch (the reference and the fallback), in one
 * pass over each row's integer products instead of a dozen tensor operations, each with
 * its own temporaries (at 40k items and batches of ~30 rows those cost ~85 us a row,
 * more than the int8 product itself):
 *
 *   1. a block's ceiling: its largest product times the row's unit, plus its largest bias;
 *   2. T: the k-th best first pass (product * unit + bias) in the k blocks of highest
 *      ceiling, a lower bound of the k-th best overall;
 *   3. every item of a block whose ceiling reaches T - 2 bound, and whose first pass
 *      does too, is scored in float32 (vector . output + bias); the k best are returned,
 *      best first.
 */
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64

typedef struct {
    float value;
    int64_t index;
} entry;

/* A min-heap of at most k entries: the k largest values pushed so far. */
static void push(entry *heap, int64_t *size, int64_t k, float value, int64_t index) {
    int64_t i;
    if (*size < k) {
        i = (*size)++;
        while (i > 0 && heap[(i - 1) / 2].value > value) {
            heap[i] = heap[(i - 1) / 2];
            i = (i - 1) / 2;
        }
    } else {
        if (!(value > heap[0].value))
            return;
        i = 0;
        for (;;) {
            int64_t child = 2 * i + 1;
            if (child >= k)
                break;
            if (child + 1 < k && heap[child + 1].value < heap[child].value)
                child++;
            if (!(heap[child].value < value))
                break;
            heap[i] = heap[child];
            i = child;
        }
    }
    heap[i].value = value;
    heap[i].index = index;
}

/* Eight partial sums: a float sum is not reassociated by the compiler, and one chain of
 * dependent additions would take four cycles an element. */
static float dot(const float *x, const float *v, int64_t width) {
    float partial[8] = {0};
    int64_t d = 0;
    for (; d + 8 <= width; d += 8)
        for (int j = 0; j < 8; j++)
            partial[j] += x[d + j] * v[d + j];
    float sum = 0.0f;
    for (int j = 0; j < 8; j++)
        sum += partial[j];
    for (; d < width; d++)
        sum += x[d] * v[d];
    return sum;
}

static int descending(const void *a, const void *b) {
    float x = ((const entry *)a)->value, y = ((const entry *)b)->value;
    return (x < y) - (x > y);
}

/* Returns 0, or -1 if memory ran out (nothing written then). */
int rank_blocks(const int32_t *products, int64_t rows, int64_t blocks, const float *unit,
                const float *bound, const float *padded_bias, const float *block_max_bias,
                const float *outputs, int64_t width, const float *vectors, const float *bias,
                int64_t items, int64_t k, int64_t *out_index, float *out_score) {
    float *ceiling = malloc(sizeof(float) * blocks);
    entry *best = malloc(sizeof(entry) * k);
    entry *first = malloc(sizeof(entry) * k);
    if (!ceiling || !best || !first) {
        free(ceiling);
        free(best);
        free(first);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *p = products + r * blocks * BLOCK;
        const float *x = outputs + r * width;
        float u = unit[r];
        int64_t n_best = 0, n_first = 0;
        for (int64_t b = 0; b < blocks; b++) {
            int32_t m = p[b * BLOCK];
            for (int i = 1; i < BLOCK; i++)
                m = p[b * BLOCK + i] > m ? p[b * BLOCK + i] : m;
            ceiling[b] = (float)m * u + block_max_bias[b];
            push(best, &n_best, k, ceiling[b], b);
        }
        for (int64_t j = 0; j < n_best; j++) {
            int64_t b = best[j].index;
            for (int i = 0; i < BLOCK; i++)
                push(first, &n_first, k, (float)p[b * BLOCK + i] * u + padded_bias[b * BLOCK + i],
                     b * BLOCK + i);
        }
        float threshold = first[0].value - 2.0f * bound[r];
        n_best = 0;
        for (int64_t b = 0; b < blocks; b++) {
            if (!(ceiling[b] >= threshold))
                continue;
            for (int i = 0; i < BLOCK; i++) {
                int64_t item = b * BLOCK + i;
                if (item >= items || !((float)p[item] * u + padded_bias[item] >= threshold))
                    continue;
                push(best, &n_best, k, dot(x, vectors + item * width, width) + bias[item],
                     item);
            }
        }
        qsort(best, n_best, sizeof(entry), descending);
        for (int64_t j = 0; j < k; j++) {
            out_index[r * k + j] = j < n_best ? best[j].index : -1;
            out_score[r * k + j] = j < n_best ? best[j].value : 0.0f;
        }
    }
    free(ceiling);
    free(best);
    free(first);
    return 0;
}
