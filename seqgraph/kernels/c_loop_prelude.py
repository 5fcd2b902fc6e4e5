"""The C runtime every generated time loop of the cpu backend links against (c_loops.py).

`LOOP_PRELUDE` is C source placed once in a program's library, before its loops: the GEMMs'
function pointers (MKL's, and seqgraph's own `sg_mm` from cpu_gemm.py), a per-step weight
packed once per call (`sg_weight_init`) and the product with it (`sg_linear`), strided stores
(`sg_store`), the row-split driver `sg_split_rows` that gives each thread whole loops on rows
of its own, and `sg_accum`. It is text only: this module must not generate per-plan code
(that is c_loops.py) nor compile anything (that is c_launch.py).
"""
from __future__ import annotations

from .cpu_gemm import SG_MM_API

LOOP_PRELUDE = r"""
/* ---- whole time loops: BLAS through function pointers handed over by seqgraph ---- */
/* helpers off the hot path, compiled once instead of inlined (and vectorised) into each of the
   six loop variants: inlined, they added a third to the C compiler's time for an LSTM */
#define SG_COLD __attribute__((noinline))
typedef void (*sg_gemm_fn)(const char*, const char*, const int*, const int*, const int*, const real*,
                           const real*, const int*, const real*, const int*, const real*, real*, const int*);
typedef size_t (*sg_pack_size_fn)(int, int, int, int);
typedef void (*sg_pack_fn)(int, int, int, int, int, int, float, const float*, int, float*);
typedef void (*sg_compute_fn)(int, int, int, int, int, int, const float*, int, const float*, int, float,
                              float*, int);
static sg_gemm_fn sg_gemm;
static sg_pack_size_fn sg_pack_size;
static sg_pack_fn sg_pack;
static sg_compute_fn sg_compute;
""" + SG_MM_API + r"""
static sg_mm_prepare_fn sg_mm_prepare;
static sg_mm_release_fn sg_mm_release;
static sg_mm_fn sg_mm;

/* gemm: sgemm_/dgemm_ (Fortran BLAS); the packed-B trio: MKL's cblas_sgemm_pack* (float only);
   seqgraph's own sg_mm trio (cpu_gemm.py's library; 0 for double) */
void sg_set_blas(void* gemm, void* pack_size, void* pack, void* compute, void* mm_prepare, void* mm_release,
                 void* mm) {
    sg_mm_prepare = (sg_mm_prepare_fn)mm_prepare;
    sg_mm_release = (sg_mm_release_fn)mm_release;
    sg_mm = (sg_mm_fn)mm;
    sg_gemm = (sg_gemm_fn)gemm;
    sg_pack_size = (sg_pack_size_fn)pack_size;
    sg_pack = (sg_pack_fn)pack;
    sg_compute = (sg_compute_fn)compute;
}

/* A per-step weight W (N, K) as the GEMMs read it: `trans` = 1 when W is row-major with
   leading dim `ld` (y = x W^T takes W transposed), 0 when W^T is (K, N) row-major with `ld`.
   A W with neither layout is copied into `owned`. `packed` is MKL's packed form for B rows;
   `mm` is sg_mm's view of W when `own`. */
typedef struct {
    const real* w; int trans, ld, own; int64_t ld64, n, k; real* owned; void* packed;  /* ld64: ld untruncated */
#ifndef SG_DOUBLE
    sg_mm_b mm;  /* sg_mm's view of W when `own` */
#endif
} sg_weight;

/* Packing W costs about as much as a few products with it, and pays back per row multiplied:
   a call that multiplies fewer than SG_PACK_MIN_ROWS rows by W in all (steps x this thread's
   rows: a decoder run one step at a time, a batch of one) uses W as it is. Measured (LSTM, 2
   threads, docs/kernels.md): at B=1 packing never paid, at T=50 B=16 it saved 7-17%. */
#ifndef SG_PACK_MIN_ROWS
#define SG_PACK_MIN_ROWS 128
#endif

/* own: the products run sg_mm (cpu_gemm.py) instead of MKL (float only); T: the call's steps */
static int sg_weight_init(sg_weight* g, int64_t B, int64_t N, int64_t K, const real* W, int64_t s0, int64_t s1,
                          int64_t own, int64_t T) {
    g->n = N; g->k = K; g->owned = 0; g->packed = 0; g->own = 0;
    if (s1 == 1 && s0 >= K) { g->w = W; g->trans = 1; g->ld64 = s0; }
    else if (s0 == 1 && s1 >= N) { g->w = W; g->trans = 0; g->ld64 = s1; }
    else {
        g->owned = (real*)malloc(sizeof(real) * (size_t)(N * K));
        if (g->owned == 0) return 1;
        for (int64_t i = 0; i < N; ++i)
            for (int64_t j = 0; j < K; ++j) g->owned[i * K + j] = W[i * s0 + j * s1];
        g->w = g->owned; g->trans = 1; g->ld64 = K;
    }
    g->ld = (int)g->ld64;
#ifndef SG_DOUBLE
    if (T * B < SG_PACK_MIN_ROWS) return 0;
    if (own && sg_mm != 0) {
        g->own = 1;
        return sg_mm_prepare(&g->mm, N, K, g->w, g->trans ? g->ld64 : 1, g->trans ? 1 : g->ld64);
    }
    if (sg_pack_size != 0 && sg_pack != 0 && sg_compute != 0) {
        /* row-major (101), the B matrix (162), W^T as stored: transposed (112) or not (111) */
        size_t bytes = sg_pack_size(162, (int)B, (int)N, (int)K);
        g->packed = malloc(bytes);
        if (g->packed == 0) return 1;
        sg_pack(101, 162, g->trans ? 112 : 111, (int)B, (int)N, (int)K, 1.0f, g->w, g->ld, (float*)g->packed);
    }
#else
    (void)own; (void)T;
#endif
    return 0;
}

static void sg_weight_free(sg_weight* g) {
    free(g->owned);
    free(g->packed);
#ifndef SG_DOUBLE
    if (g->own) sg_mm_release(&g->mm);
#endif
}

/* y (B, N) contiguous = x W^T; x rows `rs` apart, columns `cs` apart (gathered into `scratch`
   (B, K) unless cs == 1) */
static void sg_linear(int64_t B, const sg_weight* g, const real* x, int64_t rs, int64_t cs, real* y, real* scratch) {
    int64_t K = g->k;
    if (cs != 1 || rs < K) {
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = 0; j < K; ++j) scratch[b * K + j] = x[b * rs + j * cs];
        x = scratch; rs = K;
    }
    int m = (int)B, n = (int)g->n, k = (int)K, lx = (int)rs;
#ifndef SG_DOUBLE
    if (g->own) {
        sg_mm(B, g->n, K, x, rs, &g->mm, 0, y, g->n);
        return;
    }
    if (g->packed != 0) {  /* row-major, A not transposed (111), B packed (151) */
        sg_compute(101, 111, 151, m, n, k, x, lx, (const float*)g->packed, n, 0.0f, y, n);
        return;
    }
#endif
    /* column-major: y^T (N x B) = op(W) (N x K) x^T (K x B) */
    const real one = 1, zero = 0;
    sg_gemm(g->trans ? "T" : "N", "N", &n, &m, &k, &one, g->w, &g->ld, x, &lx, &zero, y, &n);
}

/* dst (B, w) contiguous = src (rows rs apart, columns cs apart; rs = 0 broadcasts one row);
   on padded rows (mask[b] == 0) zero (mode 1) or prev's row (mode 2) */
static void sg_store(int64_t B, int64_t w, const real* src, int64_t rs, int64_t cs, real* dst, int mode,
                     const real* prev, int64_t prs, int64_t pcs, const unsigned char* mask) {
    if (mode == 0 && cs == 1 && rs == w) {  /* one contiguous block */
        memcpy(dst, src, sizeof(real) * (size_t)(B * w));
        return;
    }
    for (int64_t b = 0; b < B; ++b) {
        int keep = mode == 0 || mask == 0 || mask[b] != 0;
        const real* s = keep ? src + b * rs : prev + b * prs;
        int64_t c = keep ? cs : pcs;
        if (!keep && mode == 1)
            for (int64_t j = 0; j < w; ++j) dst[b * w + j] = 0;
        else
            for (int64_t j = 0; j < w; ++j) dst[b * w + j] = s[j * c];
    }
}

/* One loop variant over rows of the batch: T, rows, mask (null or at its first row), the mask's
   stride from one step to the next, the tensor slots and their strides, own, and split: 1 when
   the loop runs on a thread's own rows (its regions then stay on that thread) */
typedef int (*sg_rows_fn)(int64_t, int64_t, const unsigned char*, int64_t, void**, const int64_t*, int64_t, int);

/* Rows of an RNN never meet inside a step (a row of a product reads one row of its input, a
   region works row by row), so with threads > 1 each thread runs the whole loop on its own
   block of rows: its slots shifted by b0 rows along the dim rows_dim[i] (-1: a tensor without
   rows, such as a weight), no synchronisation between steps. Inside, regions run on the
   thread's rows, and the products see they are in a parallel region and stay on the thread
   (MKL by its own rule, sg_mm by omp_in_parallel). With threads <= 1 the loop runs once over
   all B rows, and its products and regions split each call over the threads themselves. */
/* The real steps of rows < b, cum[b] for 0 <= b <= B, when every step's real rows come before
   its padded ones (a batch sorted longest first); else (or when malloc fails) 0. */
SG_COLD static int64_t* sg_real_steps_before(int64_t T, int64_t B, const unsigned char* mask) {
    if (mask == 0) return 0;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t b = 1; b < B; ++b)
            if (mask[t * B + b] != 0 && mask[t * B + b - 1] == 0) return 0;
    int64_t* cum = (int64_t*)calloc((size_t)(B + 1), sizeof(int64_t));
    if (cum == 0) return 0;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t b = 0; b < B; ++b) cum[b + 1] += mask[t * B + b] != 0;
    for (int64_t b = 0; b < B; ++b) cum[b + 1] += cum[b];
    return cum;
}

/* Where thread id of nt starts its block of rows: at B * id / nt, or, with cum (see above),
   where the real steps before it reach id / nt of them all. A loop skips the rows that end a
   step as padding, so with a batch sorted longest first equal blocks would leave the first
   thread most of the work; blocks of equal real steps share it. */
SG_COLD static int64_t sg_block_start(int64_t id, int64_t nt, int64_t B, const int64_t* cum) {
    if (id >= nt) return B;
    if (cum == 0 || cum[B] == 0) return B * id / nt;
    int64_t b = 0;
    while (b < B && cum[b] * nt < cum[B] * id) ++b;
    return b;
}

static int sg_split_rows(sg_rows_fn fn, int64_t T, int64_t B, const unsigned char* mask, void** P,
                         const int64_t* D, int64_t own, int64_t threads, const signed char* rows_dim, int n) {
    if (threads > B) threads = B;
#ifdef _OPENMP
    if (threads > 1) {
        int rc = 0;
        int64_t* cum = sg_real_steps_before(T, B, mask);
        SG_PRAGMA(omp parallel num_threads(threads))
        {
            int64_t nt = sg_num_threads(), id = sg_thread_num();
            int64_t b0 = sg_block_start(id, nt, B, cum), b1 = sg_block_start(id + 1, nt, B, cum);
            void* Q[n > 0 ? n : 1];
            for (int i = 0; i < n; ++i)
                Q[i] = rows_dim[i] < 0 ? P[i] : (void*)((real*)P[i] + b0 * D[3 * i + rows_dim[i]]);
            if (b1 > b0 && fn(T, b1 - b0, mask != 0 ? mask + b0 : 0, B, Q, D, own, 1)) { SG_ATOMIC rc = 1; }
        }
        free(cum);
        return rc;
    }
#endif
    (void)threads; (void)rows_dim; (void)n;
    return fn(T, B, mask, B, P, D, own, 0);
}

/* rows Bt <= b < B of dst (B, w) contiguous: prev's rows (rows prs apart, columns pcs apart),
   or zeros when prev is 0 */
SG_COLD static void sg_tail(int64_t Bt, int64_t B, int64_t w, real* dst, const real* prev, int64_t prs, int64_t pcs) {
    for (int64_t b = Bt; b < B; ++b)
        for (int64_t j = 0; j < w; ++j) dst[b * w + j] = prev != 0 ? prev[b * prs + j * pcs] : 0;
}

/* acc (rows ars apart, columns acs apart) += src (likewise) */
static void sg_accum(int64_t B, int64_t w, real* acc, int64_t ars, int64_t acs, const real* src, int64_t rs, int64_t cs) {
    for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < w; ++j) acc[b * ars + j * acs] += src[b * rs + j * cs];
}
/* the same on the real rows only (m[b] != 0): a padded row's value, which may be nan, is left out */
static void sg_accum_real(int64_t B, int64_t w, real* acc, int64_t ars, const real* src, int64_t rs,
                          const unsigned char* m) {
    for (int64_t b = 0; b < B; ++b)
        if (m[b])
            for (int64_t j = 0; j < w; ++j) acc[b * ars + j] += src[b * rs + j];
}
"""


__all__ = ["LOOP_PRELUDE"]
