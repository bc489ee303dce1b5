/* The first block of a CNN on the CPU in one pass: convolution with a tiny reduction (C_in x kh x kw <= 32),
 * 2 x 2 max-pooling, ReLU; and the gradient of its weight and bias.
 *
 * The unfused version materialises the full-resolution map (N x C_out x H x W), pools it with int64 indices and,
 * backwards, scatters into a zeroed map of the same size: memory traffic that costs more than the arithmetic.
 * Here each image is zero-padded once (it fits in the L1 cache); each pooled output is computed from its four
 * convolution outputs held in vector registers, VW channels at a time, and only the pooled map and a one-byte argmax
 * leave the loop.
 *
 * Layouts: x N x C x H x W (contiguous); wt K x CO, the convolution weight flattened (c, kh, kw) and transposed;
 * y and idx N x HO x WO x CO (channels-last). idx holds the window position of the maximum (0..3, row-major, the
 * first of equal values, as PyTorch's max-pooling), or 255 where ReLU zeroed the output (no gradient flows there).
 * Convolution stride 1, zero padding (PH, PW); pooling kernel 2, stride 2, no padding, floor mode. CO must be a
 * multiple of VW (the includer's vector width in floats: 16 for AVX-512, 8 for AVX2, 4 otherwise; the operators
 * require multiples of 16). Returns 0, or -1 for arguments out of range.
 *
 * This file is included by ops.cpp once per instruction set, inside a namespace and a `#pragma GCC target` (as ATen
 * compiles its CPU kernels once per capability), so it includes nothing itself; VW is defined by the includer, and
 * RMC_AVX512 / RMC_AVX2 mark those copies. A vector wider than the instruction set's registers would be lowered by
 * the compiler to scalar code (10x slower, measured), hence one width per copy.
 */

#define MAX_K 32
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4)));   /* for unaligned loads and stores */
typedef uint8_t vb __attribute__((vector_size(VW)));

/* One byte per lane, to and from memory. GCC turns the generic conversion into single-byte moves, which made the
 * backward pass 2x slower: with AVX-512 one instruction does it, with AVX2 a widening load or two packs. */
#if defined(RMC_AVX512)
static inline vi load_bytes(const uint8_t *p) { return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline void store_bytes(uint8_t *p, vi v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8((__m512i)v)); }
#elif defined(RMC_AVX2)
static inline vi load_bytes(const uint8_t *p) { return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline void store_bytes(uint8_t *p, vi v) {   /* lanes hold 0..255: the saturating packs keep them */
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128((__m256i)v), _mm256_extracti128_si256((__m256i)v, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packus_epi16(w, w));
}
#else
static inline vi load_bytes(const uint8_t *p) { vb b; memcpy(&b, p, VW); return __builtin_convertvector(b, vi); }
static inline void store_bytes(uint8_t *p, vi v) { const vb b = __builtin_convertvector(v, vb); memcpy(p, &b, VW); }
#endif

static inline vf load(const float *p) { return *(const vf_u *)p; }
static inline void store(float *p, vf v) { *(vf_u *)p = v; }
static inline vf select_f(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vi select_i(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }

/* One 2 x 2 window, VW channels: the first maximum in window order (a NaN wins: max-pooling propagates it), plus the
 * bias b (NULL for none), then ReLU (which keeps NaN, as torch.relu does). Stores the output and the window position
 * of the maximum, or 255 where ReLU zeroed it. */
static inline void max4_relu(vf a0, vf a1, vf a2, vf a3, const float *b, float *y, uint8_t *idx) {
    const vi zero_i = {0};
    vf best = a0;
    vi arg = zero_i, take;
    take = (a1 > best) | (a1 != a1); best = select_f(take, a1, best); arg = select_i(take, zero_i + 1, arg);
    take = (a2 > best) | (a2 != a2); best = select_f(take, a2, best); arg = select_i(take, zero_i + 2, arg);
    take = (a3 > best) | (a3 != a3); best = select_f(take, a3, best); arg = select_i(take, zero_i + 3, arg);
    if (b) best += load(b);
    const vi pass = (best > 0.0f) | (best != best);
    store(y, select_f(pass, best, (vf){0}));
    store_bytes(idx, select_i(pass, arg, zero_i + 255));
}

/* One image zero-padded (C x HP x WP). */
static void pad_image(const float *restrict xn, int C, int H, int W, int PH, int PW, int HP, int WP,
                      float *restrict xp) {
    memset(xp, 0, sizeof(float) * (size_t)C * HP * WP);
    for (int c = 0; c < C; c++)
        for (int h = 0; h < H; h++)
            memcpy(xp + ((size_t)c * HP + h + PH) * WP + PW, xn + ((size_t)c * H + h) * W, sizeof(float) * W);
}

/* Shapes, the padded-image buffer and the offset in it of each of a patch's K values (order c, kh, kw). */
typedef struct { int K, HO, WO, HP, WP; int off[MAX_K]; float *xp; } plan_t;

static int make_plan(plan_t *pl, int C, int H, int W, int KH, int KW, int PH, int PW, int CO) {
    pl->K = C * KH * KW;
    pl->HP = H + 2 * PH;
    pl->WP = W + 2 * PW;
    pl->HO = (pl->HP - KH + 1) / 2;
    pl->WO = (pl->WP - KW + 1) / 2;
    if (pl->K > MAX_K || CO % VW || PH < 0 || PW < 0 || pl->HO < 1 || pl->WO < 1) return -1;
    int k = 0;
    for (int c = 0; c < C; c++)
        for (int a = 0; a < KH; a++)
            for (int b = 0; b < KW; b++) pl->off[k++] = (c * pl->HP + a) * pl->WP + b;
    pl->xp = (float *)malloc(sizeof(float) * (size_t)C * pl->HP * pl->WP);
    return pl->xp ? 0 : -1;
}

/* The loops below are written once and inlined with K as a constant for the common first layers (3 x 3 on grey and
 * RGB images), where the compiler then keeps everything in registers. */
#define INLINE static inline __attribute__((always_inline))

INLINE void forward_body(const plan_t pl, const int K, const float *restrict x, const float *restrict wt,
                         const float *restrict bias, float *restrict y, uint8_t *restrict idx,
                         int N, int C, int H, int W, int PH, int PW, int CO) {
    const int WP = pl.WP;
    for (int n = 0; n < N; n++) {
        pad_image(x + (size_t)n * C * H * W, C, H, W, PH, PW, pl.HP, WP, pl.xp);
        for (int i = 0; i < pl.HO; i++)
            for (int j = 0; j < pl.WO; j++) {
                const float *p0 = pl.xp + (size_t)2 * i * WP + 2 * j;
                const size_t o = (((size_t)n * pl.HO + i) * pl.WO + j) * CO;
                for (int cb = 0; cb < CO; cb += VW) {
                    const vf b = load(bias + cb);
                    vf a0 = b, a1 = b, a2 = b, a3 = b;     /* the four convolution outputs of the window */
                    for (int k = 0; k < K; k++) {
                        const float *pk = p0 + pl.off[k];
                        const vf w = load(wt + (size_t)k * CO + cb);
                        a0 += pk[0] * w;
                        a1 += pk[1] * w;
                        a2 += pk[WP] * w;
                        a3 += pk[WP + 1] * w;
                    }
                    max4_relu(a0, a1, a2, a3, NULL, y + o + cb, idx + o + cb);   /* bias already in */
                }
            }
    }
}

int stem_forward(const float *restrict x, const float *restrict wt, const float *restrict bias,
                 float *restrict y, uint8_t *restrict idx,
                 int N, int C, int H, int W, int KH, int KW, int PH, int PW, int CO) {
    plan_t pl;
    if (make_plan(&pl, C, H, W, KH, KW, PH, PW, CO)) return -1;
    if (pl.K == 9) forward_body(pl, 9, x, wt, bias, y, idx, N, C, H, W, PH, PW, CO);
    else if (pl.K == 27) forward_body(pl, 27, x, wt, bias, y, idx, N, C, H, W, PH, PW, CO);
    else forward_body(pl, pl.K, x, wt, bias, y, idx, N, C, H, W, PH, PW, CO);
    free(pl.xp);
    return 0;
}

/* g: the gradient of y (same layout). gwt (K x CO) and gb (CO) are overwritten with the gradients summed over the
 * batch; per-image partial sums keep the float32 rounding error close to that of a blocked matrix product. */
INLINE void backward_body(const plan_t pl, const int K, const float *restrict x, const float *restrict g,
                          const uint8_t *restrict idx, float *restrict gwt, float *restrict gb,
                          int N, int C, int H, int W, int PH, int PW, int CO) {
    const int WP = pl.WP;
    const vf zero = {0};
    vf acc[MAX_K + 1];                                     /* K weight rows and the bias, for one channel block */
    memset(gwt, 0, sizeof(float) * K * CO);
    memset(gb, 0, sizeof(float) * CO);
    for (int n = 0; n < N; n++) {
        pad_image(x + (size_t)n * C * H * W, C, H, W, PH, PW, pl.HP, WP, pl.xp);
        for (int cb = 0; cb < CO; cb += VW) {
            for (int k = 0; k <= K; k++) acc[k] = zero;
            for (int i = 0; i < pl.HO; i++)
                for (int j = 0; j < pl.WO; j++) {
                    const size_t o = (((size_t)n * pl.HO + i) * pl.WO + j) * CO + cb;
                    __builtin_prefetch(g + o + 8 * CO);           /* the strided reads: ahead of need */
                    __builtin_prefetch(idx + o + 8 * CO);
                    const vf gv = load(g + o);
                    const vi iv = load_bytes(idx + o);
                    const vf m0 = select_f(iv == 0, gv, zero), m1 = select_f(iv == 1, gv, zero);
                    const vf m2 = select_f(iv == 2, gv, zero), m3 = select_f(iv == 3, gv, zero);
                    const float *p0 = pl.xp + (size_t)2 * i * WP + 2 * j;
                    for (int k = 0; k < K; k++) {
                        const float *pk = p0 + pl.off[k];
                        acc[k] += pk[0] * m0 + pk[1] * m1 + pk[WP] * m2 + pk[WP + 1] * m3;
                    }
                    acc[K] += m0 + m1 + m2 + m3;
                }
            for (int k = 0; k < K; k++) store(gwt + (size_t)k * CO + cb, load(gwt + (size_t)k * CO + cb) + acc[k]);
            store(gb + cb, load(gb + cb) + acc[K]);
        }
    }
}

int stem_backward(const float *restrict x, const float *restrict g, const uint8_t *restrict idx,
                  float *restrict gwt, float *restrict gb,
                  int N, int C, int H, int W, int KH, int KW, int PH, int PW, int CO) {
    plan_t pl;
    if (make_plan(&pl, C, H, W, KH, KW, PH, PW, CO)) return -1;
    if (pl.K == 9) backward_body(pl, 9, x, g, idx, gwt, gb, N, C, H, W, PH, PW, CO);
    else if (pl.K == 27) backward_body(pl, 27, x, g, idx, gwt, gb, N, C, H, W, PH, PW, CO);
    else backward_body(pl, pl.K, x, g, idx, gwt, gb, N, C, H, W, PH, PW, CO);
    free(pl.xp);
    return 0;
}

/* The blocks after the first: a convolution's output h without its bias (N x H x W x C, channels-last, C a multiple
 * of 16), the bias b (C; NULL for none) added here instead. The per-channel bias commutes with max-pooling, so it is
 * added after pooling, to 4x fewer values, and its gradient comes out of the pooling backward: the convolution's
 * own bias gradient (a separate slow pass in oneDNN) is not needed. */

/* y = relu(maxpool2x2(h) + b), idx as for the first block (N x HO x WO x C). PyTorch's version stores int64 indices
 * and, backwards, zero-fills the whole input gradient before scattering into it; here each element is written once. */
int pool_relu_forward(const float *restrict h, const float *restrict b, float *restrict y, uint8_t *restrict idx,
                      int N, int H, int W, int C) {
    const int HO = H / 2, WO = W / 2;
    if (C % VW || HO < 1 || WO < 1) return -1;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < HO; i++)
            for (int j = 0; j < WO; j++) {
                const float *p0 = h + (((size_t)n * H + 2 * i) * W + 2 * j) * C, *p2 = p0 + (size_t)W * C;
                const size_t o = (((size_t)n * HO + i) * WO + j) * C;
                for (int cb = 0; cb < C; cb += VW) {
                    max4_relu(load(p0 + cb), load(p0 + C + cb), load(p2 + cb), load(p2 + C + cb), b ? b + cb : NULL,
                              y + o + cb, idx + o + cb);
                }
            }
    return 0;
}

/* gh (N x H x W x C) = the gradient of h given g, the gradient of y: every element written once (the row and column
 * that floor-mode pooling leaves out of odd sizes get zeros); gb (C, when not NULL) = the bias gradient. */
int pool_relu_backward(const float *restrict g, const uint8_t *restrict idx, float *restrict gh, float *restrict gb,
                       int N, int H, int W, int C) {
    const int HO = H / 2, WO = W / 2;
    if (C % VW || HO < 1 || WO < 1 || C > 4096) return -1;
    const vf zero = {0};
    vf part[4096 / VW];
    if (gb) memset(gb, 0, sizeof(float) * C);
    for (int n = 0; n < N; n++) {
        float *gn = gh + (size_t)n * H * W * C;
        if (H % 2) memset(gn + (size_t)(H - 1) * W * C, 0, sizeof(float) * W * C);
        for (int cb = 0; cb < C; cb += VW) part[cb / VW] = zero;
        for (int i = 0; i < HO; i++) {
            if (W % 2) {
                memset(gn + ((size_t)2 * i * W + W - 1) * C, 0, sizeof(float) * C);
                memset(gn + ((size_t)(2 * i + 1) * W + W - 1) * C, 0, sizeof(float) * C);
            }
            for (int j = 0; j < WO; j++) {
                float *q0 = gn + ((size_t)2 * i * W + 2 * j) * C, *q2 = q0 + (size_t)W * C;
                const size_t o = (((size_t)n * HO + i) * WO + j) * C;
                for (int cb = 0; cb < C; cb += VW) {
                    const vf gv = load(g + o + cb);
                    const vi iv = load_bytes(idx + o + cb);
                    store(q0 + cb, select_f(iv == 0, gv, zero));
                    store(q0 + C + cb, select_f(iv == 1, gv, zero));
                    store(q2 + cb, select_f(iv == 2, gv, zero));
                    store(q2 + C + cb, select_f(iv == 3, gv, zero));
                    part[cb / VW] += select_f(iv != 255, gv, zero);
                }
            }
        }
        if (gb)
            for (int cb = 0; cb < C; cb += VW) store(gb + cb, load(gb + cb) + part[cb / VW]);
    }
    return 0;
}

/* y = mean over the HW positions of relu(h + b) (N x C), for a last block followed by global average pooling; mask
 * (N x HW x C) records where ReLU passed and count (N x C) how often, for the backward. */
int relu_gap_forward(const float *restrict h, const float *restrict b, float *restrict y, uint8_t *restrict mask,
                     float *restrict count, int N, int HW, int C) {
    if (C % VW || HW < 1) return -1;
    const vf zero = {0}, one = zero + 1.0f;
    const vi on = (vi){0} + 1;
    for (int n = 0; n < N; n++)
        for (int cb = 0; cb < C; cb += VW) {
            const vf bv = b ? load(b + cb) : zero;
            vf sum = zero, cnt = zero;
            for (int s = 0; s < HW; s++) {
                const size_t o = ((size_t)n * HW + s) * C + cb;
                const vf v = load(h + o) + bv;
                const vi pass = (v > 0.0f) | (v != v);
                sum += select_f(pass, v, zero);
                cnt += select_f(pass, one, zero);
                store_bytes(mask + o, pass & on);
            }
            store(y + (size_t)n * C + cb, sum / (float)HW);
            store(count + (size_t)n * C + cb, cnt);
        }
    return 0;
}

/* gh = g / HW where ReLU passed, else 0; gb (C, when not NULL) = sum over images of g * count / HW. */
int relu_gap_backward(const float *restrict g, const uint8_t *restrict mask, const float *restrict count,
                      float *restrict gh, float *restrict gb, int N, int HW, int C) {
    if (C % VW || HW < 1) return -1;
    const vf zero = {0};
    if (gb) memset(gb, 0, sizeof(float) * C);
    for (int n = 0; n < N; n++)
        for (int cb = 0; cb < C; cb += VW) {
            const vf gv = load(g + (size_t)n * C + cb) / (float)HW;
            for (int s = 0; s < HW; s++) {
                const size_t o = ((size_t)n * HW + s) * C + cb;
                store(gh + o, select_f(load_bytes(mask + o) != 0, gv, zero));
            }
            if (gb) store(gb + cb, load(gb + cb) + gv * load(count + (size_t)n * C + cb));
        }
    return 0;
}
