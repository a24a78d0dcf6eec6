/* One greedy OBS elimination step for every row of a chunk, fused.
 *
 * The torch version of a step is ~40 small tensor operations, each a pass over (rows x m) with its
 * own dispatch; this does the whole step for one row in two passes over that row's vectors while
 * they sit in L1/L2. The rank-B flush of the stored matrices (a GEMM) and the compaction stay in
 * torch. Built at install time or first use (obcompress.solvers._kernel_build); the torch path is
 * the reference.
 *
 * Per row r (all arrays row-major, m = compact coordinates, S = pending-vector slots):
 *   A    [R][m][m]  stored H^-1 (lagging by the k pending vectors in U; symmetric); row r starts at
 *                   A + r * astride (astride 0 while all rows still share the initial H^-1)
 *   U    [R][S][m]  pending vectors, slot k is written by this step
 *   w, diag, pen [R][m]   weights, current diag of H^-1, +inf where a coordinate may not be chosen
 *   alive [R][m]    uint8, cleared for the chosen coordinate
 *   idx   [R][m]    int64 original column of each coordinate
 *   mode 0: prune (target 0, score w^2/diag); N:M when gid != NULL (counts[R][G], ppg per group)
 *   mode 1: quantize on the grid (scale, zero)[R][m], maxq; outlier rule first.
 * Outputs at out[r * ostride]: order (original column or -1), loss, target value.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define DEFINE_STEP(NAME, REAL, SQRT)                                                              \
void NAME(int64_t R, int64_t m, int64_t S, int64_t k, const REAL *A, int64_t astride, REAL *U,      \
          REAL *w, REAL *diag, REAL *pen, uint8_t *alive, const int64_t *idx, int64_t mode,         \
          const REAL *scale, const REAL *zero, double maxq, const int32_t *gid, int32_t *counts,    \
          int64_t G, int64_t ppg, int64_t *order_out, double *loss_out, double *val_out,           \
          int64_t ostride, REAL *scratch)                                                          \
{                                                                                                   \
    const REAL inf = (REAL)INFINITY;                                                                \
    for (int64_t r = 0; r < R; r++) {                                                               \
        REAL *wr = w + r * m, *dr = diag + r * m, *pr = pen + r * m;                                \
        uint8_t *ar = alive + r * m;                                                                \
        const REAL *sr = scale ? scale + r * m : 0, *zr = zero ? zero + r * m : 0;                  \
        /* pass 1: scores, the best candidate, and (quantizing) the worst out-of-range weight */   \
        int64_t p = -1, worst = -1;                                                                 \
        REAL best = inf, worst_err = -1, tp = 0, tworst = 0;                                        \
        for (int64_t j = 0; j < m; j++) {                                                           \
            REAL x = wr[j], t = 0, e;                                                               \
            if (mode == 1) {                                                                        \
                REAL raw = (REAL)nearbyint(x / sr[j]) + zr[j];                                      \
                REAL code = raw < 0 ? 0 : (raw > (REAL)maxq ? (REAL)maxq : raw);                   \
                t = sr[j] * (code - zr[j]);                                                         \
                e = (x - t) * (x - t);                                                              \
                if (code != raw && ar[j] && e > worst_err) { worst_err = e; worst = j; tworst = t; } \
            } else {                                                                                \
                e = x * x;                                                                          \
            }                                                                                       \
            REAL sc = pr[j] + e / dr[j];                                                            \
            if (sc < best) { best = sc; p = j; tp = t; }                                            \
        }                                                                                           \
        if (worst >= 0) { p = worst; tp = tworst; }                                                 \
        REAL *Ur = U + r * S * m, *uk = Ur + k * m;                                                 \
        if (p < 0) { /* nothing left to choose in this row: an idle step */                         \
            memset(uk, 0, (size_t)m * sizeof(REAL));                                                \
            order_out[r * ostride] = -1; loss_out[r * ostride] = 0;                                 \
            if (val_out) val_out[r * ostride] = 0;                                                  \
            continue;                                                                               \
        }                                                                                           \
        /* the current column p of H^-1: stored row p minus the pending part */                    \
        REAL *col = scratch + r * m;                                                                \
        memcpy(col, A + r * astride + p * m, (size_t)m * sizeof(REAL));                              \
        for (int64_t i = 0; i < k; i++) {                                                           \
            const REAL *ui = Ur + i * m;                                                            \
            REAL c = ui[p];                                                                         \
            for (int64_t j = 0; j < m; j++) col[j] -= c * ui[j];                                    \
        }                                                                                           \
        REAL dp = col[p];                                                                           \
        if (!(dp > 0)) dp = (REAL)1e-30;                                                            \
        REAL delta = wr[p] - tp, coef = delta / dp, rs = (REAL)1 / SQRT(dp);                        \
        /* pass 2: re-fit the row, queue the rank-1 update, keep the diagonal current */           \
        for (int64_t j = 0; j < m; j++) {                                                           \
            REAL cj = col[j], u = cj * rs;                                                          \
            wr[j] -= coef * cj;                                                                     \
            uk[j] = u;                                                                              \
            dr[j] -= u * u;                                                                         \
        }                                                                                           \
        wr[p] = tp; dr[p] = 1; pr[p] = inf; ar[p] = 0;                                              \
        order_out[r * ostride] = idx[r * m + p];                                                    \
        loss_out[r * ostride] = 0.5 * (double)delta * (double)delta / (double)dp;                   \
        if (val_out) val_out[r * ostride] = (double)tp;                                             \
        if (gid) { /* N:M: a group that reached its quota keeps the rest of its weights */         \
            const int32_t *gr = gid + r * m;                                                        \
            int32_t g = gr[p];                                                                      \
            if (++counts[r * G + g] >= ppg)                                                         \
                for (int64_t j = 0; j < m; j++) if (gr[j] == g) pr[j] = inf;                        \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_STEP(obs_step_f32, float, sqrtf)
DEFINE_STEP(obs_step_f64, double, sqrt)

/* Compaction in place: A[r] (m x m, rows r*m*m) becomes A[r][sel_r][:, sel_r] (m_new x m_new, rows
 * r*m_new*m_new). Safe front to back because every destination offset is at most its source
 * offset (m_new <= m and sel is increasing), so no element is overwritten before it is read. One
 * read and one write per kept element, no second buffer. */
#define DEFINE_COMPACT(NAME, REAL)                                                                  \
void NAME(int64_t R, int64_t m, int64_t m_new, REAL *A, const int64_t *sel)                        \
{                                                                                                   \
    for (int64_t r = 0; r < R; r++) {                                                               \
        const int64_t *sr = sel + r * m_new;                                                        \
        const REAL *src = A + r * m * m;                                                            \
        REAL *dst = A + r * m_new * m_new;                                                          \
        for (int64_t i = 0; i < m_new; i++) {                                                       \
            const REAL *srow = src + sr[i] * m;                                                     \
            REAL *drow = dst + i * m_new;                                                           \
            for (int64_t j = 0; j < m_new; j++) drow[j] = srow[sr[j]];                              \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_COMPACT(compact_f32, float)
DEFINE_COMPACT(compact_f64, double)

/* out[r] = M[idx_r][:, idx_r] for a shared M (n x n): an index of n or more marks padding, which
 * gets an identity row and column. The batched Cholesky re-fit of pruned rows reads these. */
#define DEFINE_GATHER(NAME, REAL)                                                                   \
void NAME(int64_t R, int64_t n, int64_t s, const REAL *M, const int64_t *idx, REAL *out)           \
{                                                                                                   \
    for (int64_t r = 0; r < R; r++) {                                                               \
        const int64_t *ir = idx + r * s;                                                            \
        REAL *o = out + r * s * s;                                                                  \
        for (int64_t i = 0; i < s; i++) {                                                           \
            REAL *orow = o + i * s;                                                                 \
            if (ir[i] >= n) {                                                                       \
                for (int64_t j = 0; j < s; j++) orow[j] = 0;                                        \
                orow[i] = 1;                                                                        \
                continue;                                                                           \
            }                                                                                       \
            const REAL *mrow = M + ir[i] * n;                                                       \
            for (int64_t j = 0; j < s; j++) orow[j] = ir[j] < n ? mrow[ir[j]] : 0;                  \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_GATHER(gather_sub_f32, float)
DEFINE_GATHER(gather_sub_f64, double)

/* One greedy step of block pruning (blocks of c consecutive compact coordinates) for every row.
 * dblk [R][m/c][c][c] holds the current diagonal c x c blocks of H^-1 and is kept current here.
 * Block b costs 1/2 w_b D_b^-1 w_b^T; removing it is the block OBS step: with L L^T = D_b the c
 * new pending vectors are V = L^-1 H^-1[b, :], and w -= (L^-1 w_b)^T V. c is at most 16. */
#define DEFINE_BLOCK(NAME, REAL, SQRT)                                                              \
void NAME(int64_t R, int64_t m, int64_t S, int64_t k, int64_t c, const REAL *A, int64_t astride,    \
          REAL *U, REAL *w, REAL *dblk, uint8_t *alive, const int64_t *idx, int64_t *order_out,     \
          double *loss_out, int64_t ostride, REAL *scratch)                                         \
{                                                                                                   \
    const int64_t nb = m / c;                                                                       \
    for (int64_t r = 0; r < R; r++) {                                                               \
        REAL *wr = w + r * m, *Dr = dblk + r * nb * c * c, *Ur = U + r * S * m;                     \
        uint8_t *ar = alive + r * m;                                                                \
        REAL L[256], y[16];                                                                         \
        int64_t best_b = -1;                                                                        \
        double best = INFINITY;                                                                     \
        for (int64_t b = 0; b < nb; b++) {                                                          \
            if (!ar[b * c]) continue;                                                               \
            const REAL *D = Dr + b * c * c, *wb = wr + b * c;                                       \
            int ok = 1;                                                                             \
            double sc = 0;                                                                          \
            for (int64_t i = 0; i < c && ok; i++) {                                                 \
                for (int64_t j = 0; j <= i; j++) {                                                  \
                    REAL v = D[i * c + j];                                                          \
                    for (int64_t l = 0; l < j; l++) v -= L[i * c + l] * L[j * c + l];               \
                    if (i == j) { if (!(v > 0)) { ok = 0; break; } L[i * c + i] = SQRT(v); }        \
                    else L[i * c + j] = v / L[j * c + j];                                           \
                }                                                                                   \
                if (!ok) break;                                                                     \
                REAL v = wb[i];                                                                     \
                for (int64_t l = 0; l < i; l++) v -= L[i * c + l] * y[l];                           \
                y[i] = v / L[i * c + i];                                                            \
                sc += (double)y[i] * y[i];                                                          \
            }                                                                                       \
            if (ok && sc < best) { best = sc; best_b = b; }                                         \
        }                                                                                           \
        REAL *V = scratch + r * c * m;                                                              \
        if (best_b < 0) {                                                                           \
            memset(Ur + k * m, 0, (size_t)(c * m) * sizeof(REAL));                                  \
            order_out[r * ostride] = -1; loss_out[r * ostride] = 0;                                 \
            continue;                                                                               \
        }                                                                                           \
        const int64_t b0 = best_b * c;                                                              \
        /* the block's rows of the current H^-1: stored rows minus the pending part */             \
        for (int64_t t = 0; t < c; t++) {                                                           \
            REAL *col = V + t * m;                                                                  \
            memcpy(col, A + r * astride + (b0 + t) * m, (size_t)m * sizeof(REAL));                  \
            for (int64_t i = 0; i < k; i++) {                                                       \
                const REAL *ui = Ur + i * m;                                                        \
                REAL cf = ui[b0 + t];                                                               \
                for (int64_t j = 0; j < m; j++) col[j] -= cf * ui[j];                               \
            }                                                                                       \
        }                                                                                           \
        /* L L^T = D from the fresh rows, then V = L^-1 rows and y = L^-1 w_b in place */          \
        for (int64_t i = 0; i < c; i++)                                                             \
            for (int64_t j = 0; j <= i; j++) {                                                      \
                REAL v = V[i * m + b0 + j];                                                         \
                for (int64_t l = 0; l < j; l++) v -= L[i * c + l] * L[j * c + l];                   \
                L[i * c + j] = (i == j) ? SQRT(v > 0 ? v : (REAL)1e-30) : v / L[j * c + j];         \
            }                                                                                       \
        double loss = 0;                                                                            \
        for (int64_t i = 0; i < c; i++) {                                                           \
            REAL *vi = V + i * m;                                                                   \
            for (int64_t l = 0; l < i; l++) {                                                       \
                const REAL *vl = V + l * m; REAL f = L[i * c + l];                                  \
                for (int64_t j = 0; j < m; j++) vi[j] -= f * vl[j];                                 \
            }                                                                                       \
            REAL inv = (REAL)1 / L[i * c + i];                                                      \
            for (int64_t j = 0; j < m; j++) vi[j] *= inv;                                           \
            REAL v = wr[b0 + i];                                                                    \
            for (int64_t l = 0; l < i; l++) v -= L[i * c + l] * y[l];                               \
            y[i] = v * inv;                                                                         \
            loss += (double)y[i] * y[i];                                                            \
        }                                                                                           \
        /* re-fit the row, queue the c vectors, keep the diagonal blocks current */                \
        for (int64_t i = 0; i < c; i++) {                                                           \
            const REAL *vi = V + i * m; REAL yi = y[i];                                             \
            REAL *uk = Ur + (k + i) * m;                                                            \
            for (int64_t j = 0; j < m; j++) { wr[j] -= yi * vi[j]; uk[j] = vi[j]; }                 \
            for (int64_t b = 0; b < nb; b++) {                                                      \
                const REAL *vb = vi + b * c; REAL *D = Dr + b * c * c;                              \
                for (int64_t p = 0; p < c; p++)                                                     \
                    for (int64_t q = 0; q < c; q++) D[p * c + q] -= vb[p] * vb[q];                  \
            }                                                                                       \
        }                                                                                           \
        for (int64_t i = 0; i < c; i++) { wr[b0 + i] = 0; ar[b0 + i] = 0; }                         \
        order_out[r * ostride] = idx[r * m + b0] / c;                                               \
        loss_out[r * ostride] = 0.5 * loss;                                                         \
    }                                                                                               \
}

DEFINE_BLOCK(block_step_f32, float, sqrtf)
DEFINE_BLOCK(block_step_f64, double, sqrt)

/* How this library was built ("source=<digest>;cpu=<digest or any>", set by _kernel_build.py), so
 * that a library built for another CPU or from another source is not used. */
#ifndef OBC_BUILD_INFO
#define OBC_BUILD_INFO ""
#endif
const char *obc_build_info(void) { return OBC_BUILD_INFO; }
