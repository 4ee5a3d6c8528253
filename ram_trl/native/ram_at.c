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

/* The loops below are written once, for any dtype, index width and epsilon case, and
 * specialized by the compiler: ALWAYS_INLINE functions called with constant arguments. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE float load(const int dtype, const void *p, int64_t i) {
    if (dtype == BF16) return from_bits((uint32_t)((const uint16_t *)p)[i] << 16);
    if (dtype == F16) return half_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* store f at out[i] in the dtype; 0 when the stored value is not finite */
ALWAYS_INLINE int store(const int dtype, void *out, int64_t i, float f) {
    if (dtype == F32) {
        ((float *)out)[i] = f;
        return isfinite(f);
    }
    const uint16_t h = dtype == BF16 ? float_to_bf16(f) : float_to_half(f);
    ((uint16_t *)out)[i] = h;
    return (h & 0x7FFFu) < (dtype == BF16 ? 0x7F80u : 0x7C00u);
}

ALWAYS_INLINE int64_t index_at(const void *indices, const int wide, int64_t k) {
    return wide ? ((const int64_t *)indices)[k] : (int64_t)((const int32_t *)indices)[k];
}

/* out = base; 1 when every base value is finite (from the exponent bits) */
ALWAYS_INLINE int copy_finite(const int dtype, const void *base, void *out, int64_t n) {
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

/* float32's largest finite magnitude: a larger |delta| is an Inf (or the compare fails: NaN) */
#define FINITE_LIMIT 3.4028234663852886e38f

/*
 * Add agent t's changes in [lo, hi) (its indices from k on) into the block's sums and counts;
 * returns where it stopped, or -1 for an index below the block (out of order), with `flags`
 * |= 1 for a non-finite delta, 2 for one at or below the snapshot's epsilon. With `kept`
 * (epsilon <= the snapshot's), every change that passes the check is one.
 */
ALWAYS_INLINE int64_t add_changes(const int dtype, const int wide, const int kept,
                                  const void *base, const void *idx, const void *val,
                                  int64_t k, int64_t last, int64_t bottom, int64_t top,
                                  int64_t lo, int64_t shift, float floor_epsilon, float epsilon,
                                  float *restrict sum, uint8_t *restrict count, int *flags) {
    int small = 0, huge = 0;
    for (; k < last; k++) {
        const int64_t i = index_at(idx, wide, k);
        if (i >= top) break;
        if (i < bottom) return -1;
        const int64_t p = i - shift;
        const float d = load(dtype, val, k) - load(dtype, base, p), size = fabsf(d);
        huge |= !(size <= FINITE_LIMIT);
        small |= !(size > floor_epsilon);
        const int keep = kept || size > epsilon;
        sum[p - lo] += keep ? d : 0.0f;
        count[p - lo] += (uint8_t)keep;
    }
    *flags |= huge | (small << 1);
    return k;
}

/*
 * Write base + merged delta at agent t's changes in [lo, hi) (a shared element gets the same
 * bits from each of its agents); 0 when a value written is not finite.
 */
ALWAYS_INLINE int write_merged(const int dtype, const int wide, const int kept,
                               const void *base, void *out, const void *idx, const void *val,
                               int64_t first, int64_t last, int64_t lo, int64_t shift,
                               float lambda, float epsilon, const float *restrict sum,
                               const uint8_t *restrict count) {
    int finite = 1;
    for (int64_t k = first; k < last; k++) {
        const int64_t p = index_at(idx, wide, k) - shift, q = p - lo;
        const float base_value = load(dtype, base, p);
        if (!kept && !(fabsf(load(dtype, val, k) - base_value) > epsilon)) continue; /* not t's */
        const unsigned c = count[q];
        const float merged = sum[q] / (float)c * (c == 1 ? lambda : 1.0f);
        finite &= store(dtype, out, p, merged != 0.0f ? base_value + merged : base_value);
    }
    return finite;
}

/* the whole merge of ram_merge_at for one dtype */
ALWAYS_INLINE int merge(const int dtype, int64_t n, const void *base, void *out, int agents,
                        const void *const *indices, const int *wide, const int64_t *nnz,
                        int64_t shift, const void *const *values, const float *lambdas,
                        const float *stored_epsilon, float epsilon, float *restrict sum,
                        uint8_t *restrict count, int64_t *at, int64_t *end) {
    const int size = dtype == F32 ? 4 : 2;
    for (int t = 0; t < agents; t++) at[t] = 0;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        const int64_t hi = n - lo < BLOCK ? n : lo + BLOCK;
        if (!copy_finite(dtype, (const uint8_t *)base + lo * size, (uint8_t *)out + lo * size,
                         hi - lo))
            return NOT_FINITE;
        for (int t = 0; t < agents; t++) { /* this block's changes, added in agent order */
            const int kept = epsilon <= stored_epsilon[t];
            int flags = 0;
            int64_t k;
#define ADD(W, K) add_changes(dtype, W, K, base, indices[t], values[t], at[t], nnz[t], \
                              lo + shift, hi + shift, lo, shift, stored_epsilon[t], epsilon, \
                              sum, count, &flags)
            if (wide[t]) k = kept ? ADD(1, 1) : ADD(1, 0);
            else k = kept ? ADD(0, 1) : ADD(0, 0);
#undef ADD
            if (k < 0) return OUT_OF_RANGE;
            if (flags & 1) return NOT_FINITE;
            if (flags & 2) return NOT_CHANGED;
            end[t] = k;
        }
        int finite = 1;
        for (int t = 0; t < agents; t++) {
            const int kept = epsilon <= stored_epsilon[t];
#define WRITE(W, K) write_merged(dtype, W, K, base, out, indices[t], values[t], at[t], end[t], \
                                 lo, shift, lambdas[t], epsilon, sum, count)
            if (wide[t]) finite &= kept ? WRITE(1, 1) : WRITE(1, 0);
            else finite &= kept ? WRITE(0, 1) : WRITE(0, 0);
#undef WRITE
            at[t] = end[t];
        }
        memset(sum, 0, (size_t)(hi - lo) * sizeof(float));
        memset(count, 0, (size_t)(hi - lo));
        if (!finite) return NOT_FINITE;
    }
    for (int t = 0; t < agents; t++)
        if (at[t] != nnz[t]) return OUT_OF_RANGE;
    return OK;
}

#define MERGE_ARGS                                                                             \
    int64_t n, const void *base, void *out, int agents, const void *const *indices,           \
        const int *wide, const int64_t *nnz, int64_t shift, const void *const *values,        \
        const float *lambdas, const float *stored_epsilon, float epsilon, float *sum,         \
        uint8_t *count, int64_t *at, int64_t *end
#define MERGE_PASS n, base, out, agents, indices, wide, nnz, shift, values, lambdas, \
                   stored_epsilon, epsilon, sum, count, at, end
static int merge_bf16(MERGE_ARGS) { return merge(BF16, MERGE_PASS); }
static int merge_f16(MERGE_ARGS) { return merge(F16, MERGE_PASS); }
static int merge_f32(MERGE_ARGS) { return merge(F32, MERGE_PASS); }

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
 * changed too. `scratch` and `cursors` as above (only the BLOCK bytes are used). Each agent's
 * tally is kept in four interleaved copies: consecutive changes mostly hit the same count, and
 * one copy would make every increment wait for the one before.
 */
int ram_count_at(int64_t n, int agents, const void *const *indices, const int *wide,
                 const int64_t *nnz, int64_t shift, int64_t *hist, void *scratch,
                 int64_t *cursors) {
    if (agents >= 255) return OUT_OF_RANGE;
    uint8_t *restrict count = (uint8_t *)((float *)scratch + BLOCK);
    int64_t *at = cursors, *end = cursors + agents;
    int64_t tally[4][256];
    int status = OK;
    for (int t = 0; t < agents; t++) at[t] = 0;
    for (int64_t lo = 0; lo < n && status == OK; lo += BLOCK) {
        const int64_t hi = n - lo < BLOCK ? n : lo + BLOCK;
        for (int t = 0; t < agents && status == OK; t++) {
            const void *const idx = indices[t];
            const int w = wide[t];
            const int64_t last = nnz[t], top = hi + shift, bottom = lo + shift;
            int64_t k = at[t];
            for (; k < last; k++) {
                const int64_t i = index_at(idx, w, k);
                if (i >= top) break;
                if (i < bottom) { status = OUT_OF_RANGE; break; }
                count[i - bottom] += 1;
            }
            end[t] = k;
        }
        for (int t = 0; t < agents && status == OK; t++) {
            const void *const idx = indices[t];
            const int w = wide[t];
            const int64_t first = at[t], last = end[t], bottom = lo + shift;
            memset(tally, 0, sizeof(tally));
            for (int64_t k = first; k < last; k++)
                tally[k & 3][count[index_at(idx, w, k) - bottom]] += 1;
            for (int c = 1; c <= agents; c++)
                hist[(int64_t)t * agents + c - 1] += tally[0][c] + tally[1][c] + tally[2][c] + tally[3][c];
            at[t] = last;
        }
        memset(count, 0, (size_t)(hi - lo));
    }
    for (int t = 0; t < agents && status == OK; t++)
        if (at[t] != nnz[t]) status = OUT_OF_RANGE;
    if (status != OK) memset(count, 0, BLOCK);
    return status;
}

/*
 * Where each row of a tensor starts in its sorted stored indices: offsets[r] = how many
 * indices are below r * row_numel, for r = 0..rows, in one pass that also checks them. OK, or
 * OUT_OF_RANGE when they are not strictly increasing within [0, rows * row_numel).
 */
int ram_row_offsets(const void *indices, int wide, int64_t nnz, int64_t row_numel, int64_t rows,
                    int64_t *offsets) {
    int64_t previous = -1, row = 0, next = row_numel;
    offsets[0] = 0;
    for (int64_t k = 0; k < nnz; k++) {
        const int64_t i = index_at(indices, wide, k);
        if (i <= previous) return OUT_OF_RANGE;
        previous = i;
        while (i >= next && row < rows) {
            offsets[++row] = k;
            next += row_numel;
        }
    }
    if (nnz > 0 && previous >= rows * row_numel) return OUT_OF_RANGE;
    while (row < rows) offsets[++row] = nnz;
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
        out[i] = load(dtype, in, i);
}
