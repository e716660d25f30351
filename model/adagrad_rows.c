/* Adagrad with momentum, in place, on selected rows of a parameter (see model/native.py).
 *
 * A state row is [accumulator (width) | velocity (width)]. For each element:
 *   a += g^2;  u = g / sqrt(a + eps);  v = mu * v - lr * u;
 *   p += v                  (heavy-ball)   or   p += mu * v - lr * u   (Nesterov)
 * which is model/optim.py's rule. `rows` lists distinct row indexes (NULL: rows 0..n_rows-1);
 * gradient row k belongs to row rows[k].
 */
#include <math.h>
#include <stdint.h>

void adagrad_momentum_rows(float *restrict param, int64_t param_stride,
                           float *restrict state, int64_t state_stride,
                           const int64_t *restrict rows, int64_t n_rows,
                           const float *restrict grad, int64_t width,
                           float lr, float momentum, float eps, int nesterov) {
    for (int64_t k = 0; k < n_rows; k++) {
        int64_t row = rows ? rows[k] : k;
        float *restrict p = param + row * param_stride;
        float *restrict acc = state + row * state_stride;
        float *restrict velocity = acc + width;
        const float *restrict g = grad + k * width;
        for (int64_t i = 0; i < width; i++) {
            float a = acc[i] + g[i] * g[i];
            float scaled = (1.0f / sqrtf(a + eps)) * g[i];
            float v = momentum * velocity[i] - lr * scaled;
            acc[i] = a;
            velocity[i] = v;
            p[i] += nesterov ? momentum * v - lr * scaled : v;
        }
    }
}
