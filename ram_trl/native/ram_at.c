/*
 * RAM at the agents' stored changes, in one pass per cache-sized block (ram_trl.native).
 *
 * A task-vector snapshot stores, per tensor, the increasing flat indices of the elements an
 * agent changed and its values there. Merging a chunk of a tensor from snapshots is then a walk
 * over those indices: every other element stays at the base. Done with torch ops, each change
 * goes through six to eight indexed kernels (a gather from the base, scatter-adds into a sum
 * and a count, gathers back, a scatter into the output); here it is two loops over a block of
 * BLOCK elements whose scratch buffers stay in the L2 cache.
 *
 * The numbers are ram_trl.methods.ram.ram_rule's bit for bit, with IEEE float32 arithmetic
 * (built with -ffp-contract=off, never -ffast-math): a delta is float32(agent) -
 * float32(base); an element is changed iff |delta| > epsilon; a shared element is the sum of
 * its changing deltas in agent order, from +0, divided by their count; a unique one is
 * (0 + delta) / 1 * lambda_t; the output is base + merged where merged != 0, else the base's
 * bits, rounded to the dtype to nearest even as torch rounds.
 *
 * Nothing here reports errors in words: a status says that the torch path must run instead
 * (it names the tensor, the agent and what is wrong) and the output is then not to be used.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { BF16 = 0, F16 = 1, F32 = 2 };
enum { OK = 0, NOT_FINITE = 1, NOT_CHANGED = 2, OUT_OF_RANGE = 3 };

/* elements merged at a time: 64K float32 sums, counts and the base's rows fit in L2 */
#define BLOCK 65536

static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* IEEE half <-> float: the FP16 library's portable functions, which c10::Half uses too */
static inline float half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | (two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized)));
}

static inline uint16_t float_to_half(float f) {
    const uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    const float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t bits = to_bits(from_bits((bias >> 1) + 0x07800000u) + base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* bfloat16, round to nearest even: c10::BFloat16's round_to_nearest_even */
static inline uint16_t float_to_bf16(float f) {
    const uint32_t u = to_bits(f);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define LOAD_BF16(p, i) from_bits((uint32_t)((const uint16_t *)(p))[i] << 16)
#define LOAD_F16(p, i) half_to_float(((const uint16_t *)(p))[i])
#define LOAD_F32(p, i) (((const float *)(p))[i])

/* store f at out[i] in the dtype; 0 when the stored value is not finite */
#define STORE_BF16(o, i, f) (((uint16_t *)(o))[i] = float_to_bf16(f), \
                             (((uint16_t *)(o))[i] & 0x7FFFu) < 0x7F80u)
#define STORE_F16(o, i, f) (((uint16_t *)(o))[i] = float_to_half(f), \
                            (((uint16_t *)(o))[i] & 0x7FFFu) < 0x7C00u)
#define STORE_F32(o, i, f) (((float *)(o))[i] = (f), isfinite(((float *)(o))[i]))

/* out = base; 1 when every base value is finite (from the exponent bits) */
static int copy_finite(int dtype, const void *base, void *out, int64_t n) {
    if (dtype == F32) {
        const uint32_t *b = base;
        uint32_t *o = out, worst = 0;
        for (int64_t i = 0; i < n; i++) {
            const uint32_t u = b[i], m = u & 0x7FFFFFFFu;
            o[i] = u;
            worst = m > worst ? m : worst;
        }
        return worst < 0x7F800000u;
    }
    const uint16_t *b = base;
    uint16_t *o = out, worst = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint16_t u = b[i], m = u & 0x7FFFu;
        o[i] = u;
        worst = m > worst ? m : worst;
    }
    return worst < (dtype == BF16 ? 0x7F80u : 0x7C00u);
}

static inline int64_t index_at(const void *indices, int wide, int64_t k) {
    return wide ? ((const int64_t *)indices)[k] : (int64_t)((const int32_t *)indices)[k];
}

/* float32's largest finite magnitude: a larger |delta| is an Inf (or the compare fails: NaN) */
#define FINITE_LIMIT 3.4028234663852886e38f

/*
 * One dtype's merge. Everything a loop reads is first copied into locals: the counts are bytes,
 * and a store through a byte pointer may alias anything, so the compiler would reload every
 * array argument after each one.
 */
#define MERGE_AT(NAME, LOAD, STORE, DTYPE, SIZE)                                               \
    static int NAME(int64_t n, const void *base, void *out, int agents,                       \
                    const void *const *indices, const int *wide, const int64_t *nnz,           \
                    int64_t shift, const void *const *values, const float *lambdas,            \
                    const float *stored_epsilon, float epsilon, float *restrict sum,           \
                    uint8_t *restrict count, int64_t *at, int64_t *end) {                      \
        for (int t = 0; t < agents; t++) at[t] = 0;                                            \
        for (int64_t lo = 0; lo < n; lo += BLOCK) {                                            \
            const int64_t hi = n - lo < BLOCK ? n : lo + BLOCK;                                \
            if (!copy_finite(DTYPE, (const uint8_t *)base + lo * SIZE,                         \
                             (uint8_t *)out + lo * SIZE, hi - lo))                              \
                return NOT_FINITE;                                                             \
            for (int t = 0; t < agents; t++) { /* add this block's changes, in agent order */  \
                const void *const idx = indices[t], *const val = values[t];                    \
                const int w = wide[t];                                                         \
                const int64_t last = nnz[t], top = hi + shift, bottom = lo + shift;            \
                const float floor_epsilon = stored_epsilon[t];                                 \
                int64_t k = at[t];                                                             \
                int small = 0, huge = 0;                                                       \
                for (; k < last; k++) {                                                        \
                    const int64_t i = index_at(idx, w, k);                                     \
                    if (i >= top) break;                                                       \
                    if (i < bottom) return OUT_OF_RANGE;                                       \
                    const int64_t p = i - shift;                                               \
                    const float d = LOAD(val, k) - LOAD(base, p), size = fabsf(d);             \
                    huge |= !(size <= FINITE_LIMIT);                                           \
                    small |= !(size > floor_epsilon);                                          \
                    const int keep = size > epsilon;                                           \
                    sum[p - lo] += keep ? d : 0.0f;                                            \
                    count[p - lo] += (uint8_t)keep;                                            \
                }                                                                              \
                end[t] = k;                                                                    \
                if (huge) return NOT_FINITE;                                                   \
                if (small) return NOT_CHANGED;                                                 \
            }                                                                                  \
            int finite = 1;                                                                    \
            for (int t = 0; t < agents; t++) { /* a shared element gets the same bits each time */ \
                const void *const idx = indices[t], *const val = values[t];                    \
                const int w = wide[t];                                                         \
                const float lambda = lambdas[t];                                               \
                const int64_t first = at[t], last = end[t];                                    \
                for (int64_t k = first; k < last; k++) {                                       \
                    const int64_t p = index_at(idx, w, k) - shift, q = p - lo;                 \
                    const float base_value = LOAD(base, p);                                    \
                    if (!(fabsf(LOAD(val, k) - base_value) > epsilon)) continue; /* not t's */ \
                    const unsigned c = count[q];                                               \
                    const float merged = sum[q] / (float)c * (c == 1 ? lambda : 1.0f);         \
                    finite &= STORE(out, p, merged != 0.0f ? base_value + merged : base_value); \
                }                                                                              \
                at[t] = last;                                                                  \
            }                                                                                  \
            memset(sum, 0, (size_t)(hi - lo) * sizeof(float));                                 \
            memset(count, 0, (size_t)(hi - lo));                                               \
            if (!finite) return NOT_FINITE;                                                    \
        }                                                                                      \
        for (int t = 0; t < agents; t++)                                                       \
            if (at[t] != nnz[t]) return OUT_OF_RANGE;                                          \
        return OK;                                                                             \
    }

MERGE_AT(merge_bf16, LOAD_BF16, STORE_BF16, BF16, 2)
MERGE_AT(merge_f16, LOAD_F16, STORE_F16, F16, 2)
MERGE_AT(merge_f32, LOAD_F32, STORE_F32, F32, 4)

/*
 * Merge n elements of one tensor (flat, from element `shift` of it) from `agents` snapshots:
 * agent t's nnz[t] changes are at indices[t] (int64 if wide[t], else int32; increasing, each
 * in [shift, shift + n)) with values[t] in the base's dtype. `lambdas` scales the unique
 * elements, `stored_epsilon` is each snapshot's own threshold (a stored change no larger is a
 * damaged snapshot), `epsilon` the method's. `scratch` holds BLOCK zeroed float32 and then
 * BLOCK zeroed bytes, left zeroed; `cursors` 2 * agents int64. Fewer than 255 agents.
 */
int ram_merge_at(int dtype, int64_t n, const void *base, void *out, int agents,
                 const void *const *indices, const int *wide, const int64_t *nnz, int64_t shift,
                 const void *const *values, const float *lambdas, const float *stored_epsilon,
                 float epsilon, void *scratch, int64_t *cursors) {
    if (agents >= 255) return OUT_OF_RANGE;
    float *sum = scratch;
    uint8_t *count = (uint8_t *)(sum + BLOCK);
    int status = (dtype == BF16 ? merge_bf16 : dtype == F16 ? merge_f16 : merge_f32)(
        n, base, out, agents, indices, wide, nnz, shift, values, lambdas, stored_epsilon,
        epsilon, sum, count, cursors, cursors + agents);
    if (status != OK) {
        memset(sum, 0, BLOCK * sizeof(float));
        memset(count, 0, BLOCK);
    }
    return status;
}

/*
 * The overlap histogram of n elements from the agents' stored indices alone (the counting
 * pass of RAM+): hist[t * agents + k] += how many of agent t's changes exactly k other agents
 * changed too. `scratch` and `cursors` as above (only the BLOCK bytes are used).
 */
int ram_count_at(int64_t n, int agents, const void *const *indices, const int *wide,
                 const int64_t *nnz, int64_t shift, int64_t *hist, void *scratch,
                 int64_t *cursors) {
    if (agents >= 255) return OUT_OF_RANGE;
    uint8_t *count = (uint8_t *)((float *)scratch + BLOCK);
    int64_t *at = cursors, *end = cursors + agents;
    for (int t = 0; t < agents; t++) at[t] = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        const int64_t hi = n - lo < BLOCK ? n : lo + BLOCK;
        for (int t = 0; t < agents; t++) {
            int64_t k = at[t];
            for (; k < nnz[t]; k++) {
                const int64_t p = index_at(indices[t], wide[t], k) - shift;
                if (p >= hi || p < lo) {
                    if (p < lo || p >= n) {
                        memset(count, 0, BLOCK);
                        return OUT_OF_RANGE;
                    }
                    break;
                }
                count[p - lo] += 1;
            }
            end[t] = k;
        }
        for (int t = 0; t < agents; t++) {
            int64_t *row = hist + (int64_t)t * agents - 1;
            for (int64_t k = at[t]; k < end[t]; k++)
                row[count[index_at(indices[t], wide[t], k) - shift - lo]] += 1;
        }
        for (int t = 0; t < agents; t++) { /* clear what this block touched */
            for (int64_t k = at[t]; k < end[t]; k++)
                count[index_at(indices[t], wide[t], k) - shift - lo] = 0;
            at[t] = end[t];
        }
    }
    for (int t = 0; t < agents; t++)
        if (at[t] != nnz[t]) return OUT_OF_RANGE;
    return OK;
}

/* float32 -> dtype as the kernels round (for tests against torch's rounding) */
void ram_round(int dtype, const float *in, void *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (dtype == BF16) ((uint16_t *)out)[i] = float_to_bf16(in[i]);
        else if (dtype == F16) ((uint16_t *)out)[i] = float_to_half(in[i]);
        else ((float *)out)[i] = in[i];
    }
}

/* dtype -> float32 as the kernels widen (for tests) */
void ram_widen(int dtype, const void *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        out[i] = dtype == BF16 ? LOAD_BF16(in, i) : dtype == F16 ? LOAD_F16(in, i) : LOAD_F32(in, i);
}
