// Body of the fused k-means kernel; included twice by kmeans_cpu.cpp, inside a namespace, once
// compiled for AVX2 + FMA and once for the baseline ISA. No #include here: the includer has them.

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static const float kEps = 1e-12f;
// Points per block of a parallel pass (a function of the instance size only, so results do not
// depend on the thread count) and per sub-block whose dot products sit in a small scratch.
static const int64_t kMinBlock = 4096, kMaxBlocks = 64, kSub = 128;

// Dot products of two points with G centers (rows of D floats at c): two points share each center
// load, and 2 x G independent accumulators keep both FMA pipes busy.
template <int G>
static inline void dots2(const float* x0, const float* x1, const float* c, int64_t D, float* o0, float* o1) {
  v8f a0[G], a1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const v8f p0 = load8(x0 + d), p1 = load8(x1 + d);
    for (int g = 0; g < G; ++g) {
      const v8f cv = load8(c + g * D + d);
      a0[g] += p0 * cv;
      a1[g] += p1 * cv;
    }
  }
  for (int g = 0; g < G; ++g) {
    float s0 = hsum8(a0[g]), s1 = hsum8(a1[g]);
    for (int64_t e = d; e < D; ++e) {
      s0 += x0[e] * c[g * D + e];
      s1 += x1[e] * c[g * D + e];
    }
    o0[g] = s0;
    o1[g] = s1;
  }
}

// out[i * kk + j] = rows[i] . C[j] for m points and kk centers (C: kk rows of D floats).
static void dots(const float* const* rows, int64_t m, const float* C, int64_t kk, int64_t D, float* out) {
  for (int64_t i = 0; i < m; i += 2) {
    const float* x0 = rows[i];
    const float* x1 = i + 1 < m ? rows[i + 1] : rows[i];
    float* o0 = out + i * kk;
    float* o1 = i + 1 < m ? out + (i + 1) * kk : o0;  // odd tail: both halves compute the same point
    int64_t j = 0;
    for (; j + 4 <= kk; j += 4) dots2<4>(x0, x1, C + j * D, D, o0 + j, o1 + j);
    switch (kk - j) {
      case 3: dots2<3>(x0, x1, C + j * D, D, o0 + j, o1 + j); break;
      case 2: dots2<2>(x0, x1, C + j * D, D, o0 + j, o1 + j); break;
      case 1: dots2<1>(x0, x1, C + j * D, D, o0 + j, o1 + j); break;
      default: break;
    }
  }
}

static float sum_squares(const float* x, int64_t D) {
  v8f a = {0, 0, 0, 0, 0, 0, 0, 0}, b = a;
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const v8f p = load8(x + d), q = load8(x + d + 8);
    a += p * p;
    b += q * q;
  }
  for (; d + 8 <= D; d += 8) {
    const v8f p = load8(x + d);
    a += p * p;
  }
  float s = hsum8(a + b);
  for (; d < D; ++d) s += x[d] * x[d];
  return s;
}

static inline void axpy(float* y, float a, const float* x, int64_t D) {
  const v8f av = {a, a, a, a, a, a, a, a};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) store8(y + d, load8(y + d) + av * load8(x + d));
  for (; d < D; ++d) y[d] += a * x[d];
}

// One instance's fit; all arrays are over its valid points in order (padding never touched).
struct Instance {
  const Batch& bt;
  const Runner& run;
  int64_t b, n, D, k, t;
  bool cosine;
  std::vector<const float*> row;
  std::vector<float> aux, w, sw;  // aux: inverse norm (cosine) or squared norm (l2)
  std::vector<int32_t> lab, prev;
  std::vector<float> mind;
  std::vector<float> C, cterm;  // centers [k, D] (unit for cosine) and ||c||^2 (l2) or 0
  int64_t nblocks, block;

  Instance(const Batch& bt_, const Runner& run_, int64_t b_)
      : bt(bt_), run(run_), b(b_), n(0), D(bt_.D), k(bt_.k), t(bt_.t), cosine(bt_.cosine) {}

  int64_t bstart(int64_t i) const { return std::min(n, i * block); }
  int64_t bstop(int64_t i) const { return std::min(n, (i + 1) * block); }

  // Score whose argmin over centers is the nearest one (the per-point term is left out).
  inline float score(float dot, float ct) const { return cosine ? -dot : ct - 2.0f * dot; }
  inline float distance(float s, int64_t i) const {
    const float d = cosine ? s * aux[i] + 1.0f : s + aux[i];
    return d > 0.0f ? d : 0.0f;
  }

  // Gathers the valid points and their norms; false when a valid point has a NaN/inf feature.
  bool prepare() {
    const float* xb = bt.x + b * bt.stride_b;
    const bool* vb = bt.valid + b * bt.N;
    const float* wb = bt.w + b * bt.N;
    for (int64_t i = 0; i < bt.N; ++i)
      if (vb[i]) {
        row.push_back(xb + i * bt.stride_n);
        w.push_back(wb[i]);
      }
    n = static_cast<int64_t>(row.size());
    nblocks = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + kMinBlock - 1) / kMinBlock));
    block = (n + nblocks - 1) / std::max<int64_t>(nblocks, 1);
    aux.resize(n);
    std::vector<char> bad(nblocks, 0);
    run.run(nblocks, [&](int64_t blk) {
      for (int64_t i = bstart(blk); i < bstop(blk); ++i) {
        const float nrm = std::sqrt(sum_squares(row[i], D));
        if (!std::isfinite(nrm)) {
          bad[blk] = 1;
          return;
        }
        aux[i] = cosine ? (nrm > kEps ? 1.0f / nrm : 0.0f) : nrm * nrm;
      }
    });
    for (char v : bad)
      if (v) return false;
    sw.resize(n);
    for (int64_t i = 0; i < n; ++i) sw[i] = cosine ? w[i] * aux[i] : w[i];
    return true;
  }

  void point(int64_t i, float* out) const {
    for (int64_t d = 0; d < D; ++d) out[d] = cosine ? row[i][d] * aux[i] : row[i][d];
  }
  float center_term(const float* c) const {
    if (cosine) return 0.0f;
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += static_cast<double>(c[d]) * c[d];
    return static_cast<float>(s);
  }

  // Inverse-CDF draw over p >= 0 (float64 cumulative sums, like scikit-learn's stable_cumsum).
  static int64_t sample(const std::vector<double>& cdf, double u, int64_t last) {
    const double target = u * cdf.back();
    const int64_t j = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
    return std::min(j, last);
  }

  // Greedy k-means++ (scikit-learn's variant); leaves the seeds in C and, for the first Lloyd
  // iteration, each point's nearest seed in lab and its distance in mind.
  void seed() {
    int64_t last = n - 1;
    while (last > 0 && !(w[last] > 0)) --last;
    std::vector<double> cdf(n);
    auto build_cdf = [&](const float* p, bool use_w) {
      double acc = 0;
      for (int64_t i = 0; i < n; ++i) cdf[i] = (acc += use_w ? w[i] : p[i]);
    };
    build_cdf(nullptr, true);
    const int64_t first = sample(cdf, bt.u_first[b], last);
    point(first, C.data());
    cterm[0] = center_term(C.data());
    std::vector<float> closest(n), best_s(n), sc(t * n), p(n), cand(t * D), cterm_c(t);
    std::vector<double> part(nblocks * std::max<int64_t>(t, 1));
    run.run(nblocks, [&](int64_t blk) {
      float dd[kSub];
      double pot = 0;
      for (int64_t s = bstart(blk); s < bstop(blk); s += kSub) {
        const int64_t m = std::min(kSub, bstop(blk) - s);
        dots(row.data() + s, m, C.data(), 1, D, dd);
        for (int64_t i = 0; i < m; ++i) {
          const float v = score(dd[i], cterm[0]);
          best_s[s + i] = v;
          lab[s + i] = 0;
          closest[s + i] = distance(v, s + i);
          pot += static_cast<double>(closest[s + i]) * w[s + i];
        }
      }
      part[blk * t] = pot;
    });
    double pot = 0;
    for (int64_t blk = 0; blk < nblocks; ++blk) pot += part[blk * t];
    std::fill(part.begin(), part.end(), 0.0);
    const double* ub = bt.u_trials + b * (k - 1) * t;
    for (int64_t c = 1; c < k; ++c) {
      // Degenerate rows (no mass left: duplicates) fall back to weight-proportional picks.
      for (int64_t i = 0; i < n; ++i) p[i] = closest[i] * w[i];
      build_cdf(p.data(), !(pot > 0));
      for (int64_t j = 0; j < t; ++j) {
        point(sample(cdf, ub[(c - 1) * t + j], last), cand.data() + j * D);
        cterm_c[j] = center_term(cand.data() + j * D);
      }
      run.run(nblocks, [&](int64_t blk) {
        float dd[kSub * 8];
        double cp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t s = bstart(blk); s < bstop(blk); s += kSub) {
          const int64_t m = std::min(kSub, bstop(blk) - s);
          for (int64_t j0 = 0; j0 < t; j0 += 8) {
            const int64_t tt = std::min<int64_t>(8, t - j0);
            dots(row.data() + s, m, cand.data() + j0 * D, tt, D, dd);
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < tt; ++j) {
                const float v = score(dd[i * tt + j], cterm_c[j0 + j]);
                sc[(j0 + j) * n + s + i] = v;
                cp[j] += static_cast<double>(std::min(distance(v, s + i), closest[s + i])) * w[s + i];
              }
            for (int64_t j = 0; j < tt; ++j) {
              part[blk * t + j0 + j] += cp[j];
              cp[j] = 0;
            }
          }
        }
      });
      std::vector<double> cand_pot(t, 0.0);
      for (int64_t blk = 0; blk < nblocks; ++blk)
        for (int64_t j = 0; j < t; ++j) {
          cand_pot[j] += part[blk * t + j];
          part[blk * t + j] = 0;
        }
      int64_t best = 0;
      for (int64_t j = 1; j < t; ++j)
        if (cand_pot[j] < cand_pot[best]) best = j;
      std::memcpy(C.data() + c * D, cand.data() + best * D, D * sizeof(float));
      cterm[c] = cterm_c[best];
      const float* sb = sc.data() + best * n;
      for (int64_t i = 0; i < n; ++i) {
        closest[i] = std::min(distance(sb[i], i), closest[i]);
        if (sb[i] < best_s[i]) {  // strict: ties keep the earlier seed (first argmin)
          best_s[i] = sb[i];
          lab[i] = static_cast<int32_t>(c);
        }
      }
      pot = cand_pot[best];
    }
    for (int64_t i = 0; i < n; ++i) mind[i] = distance(best_s[i], i);
  }

  // One pass: with `estep`, nearest center and its distance per point; with `sums`, the new
  // per-cluster sums of sw * x and of w (blocks reduced in order). Returns the number of
  // points of positive weight whose label differs from prev.
  int64_t pass(bool estep, bool want_sums, std::vector<double>& sums, std::vector<double>& counts) {
    std::vector<double> psum(want_sums ? nblocks * k * D : 0), pcnt(want_sums ? nblocks * k : 0);
    std::vector<int64_t> pchanged(nblocks, 0);
    run.run(nblocks, [&](int64_t blk) {
      std::vector<float> dd(kSub * k), acc(want_sums ? k * D : 0);
      double* bs = want_sums ? psum.data() + blk * k * D : nullptr;
      double* bc = want_sums ? pcnt.data() + blk * k : nullptr;
      int64_t changed = 0;
      for (int64_t s = bstart(blk); s < bstop(blk); s += kSub) {
        const int64_t m = std::min(kSub, bstop(blk) - s);
        if (estep) {
          dots(row.data() + s, m, C.data(), k, D, dd.data());
          for (int64_t i = 0; i < m; ++i) {
            int32_t best = 0;
            float bv = score(dd[i * k], cterm[0]);
            for (int64_t j = 1; j < k; ++j) {
              const float v = score(dd[i * k + j], cterm[j]);
              if (v < bv) {
                bv = v;
                best = static_cast<int32_t>(j);
              }
            }
            lab[s + i] = best;
            mind[s + i] = distance(bv, s + i);
          }
        }
        for (int64_t i = s; i < s + m; ++i) changed += (w[i] > 0) && lab[i] != prev[i];
        if (want_sums) {
          // Float sums over one sub-block, flushed into float64: cheap and accurate for any n.
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t i = s; i < s + m; ++i) {
            if (!(w[i] > 0)) continue;
            axpy(acc.data() + lab[i] * D, sw[i], row[i], D);
            bc[lab[i]] += w[i];
          }
          for (int64_t j = 0; j < k * D; ++j) bs[j] += acc[j];
        }
      }
      pchanged[blk] = changed;
    });
    int64_t changed = 0;
    for (int64_t blk = 0; blk < nblocks; ++blk) changed += pchanged[blk];
    if (want_sums) {
      std::fill(sums.begin(), sums.end(), 0.0);
      std::fill(counts.begin(), counts.end(), 0.0);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        for (int64_t j = 0; j < k * D; ++j) sums[j] += psum[blk * k * D + j];
        for (int64_t j = 0; j < k; ++j) counts[j] += pcnt[blk * k + j];
      }
    }
    return changed;
  }

  // Re-seeds the r-th empty cluster at the r-th farthest point of positive weight; that point's
  // weight leaves its old cluster, so the sums stay a partition of the data (as scikit-learn).
  void repair_empty(std::vector<double>& sums, std::vector<double>& counts) {
    bool any = false;
    for (int64_t j = 0; j < k; ++j) any |= !(counts[j] > 0);
    if (!any) return;
    std::vector<int64_t> far;
    for (int64_t i = 0; i < n; ++i)
      if (w[i] > 0) far.push_back(i);
    const int64_t top = std::min<int64_t>(k, static_cast<int64_t>(far.size()));
    std::partial_sort(far.begin(), far.begin() + top, far.end(), [&](int64_t a, int64_t c) {
      return mind[a] > mind[c] || (mind[a] == mind[c] && a < c);
    });
    int64_t rank = 0;
    for (int64_t j = 0; j < k; ++j) {
      if (counts[j] > 0) continue;
      const int64_t p = far[std::min(rank++, top - 1)];
      const int64_t old = lab[p];
      for (int64_t d = 0; d < D; ++d) {
        const double v = static_cast<double>(sw[p] * row[p][d]);
        sums[old * D + d] -= v;
        sums[j * D + d] = v;
      }
      counts[old] -= w[p];
      counts[j] = w[p];
    }
  }

  void fit() {
    lab.assign(n, 0);
    prev.assign(n, -1);
    mind.assign(n, 0.0f);
    C.assign(k * D, 0.0f);
    cterm.assign(k, 0.0f);
    double wsum = 0, msq = 0;
    for (int64_t i = 0; i < n; ++i) {
      wsum += w[i];
      msq += static_cast<double>(w[i]) * (cosine ? (aux[i] > 0 ? 1.0 : 0.0) : aux[i]);
    }
    msq /= wsum;
    bool seeded = false;
    if (bt.init == nullptr) {
      seed();
      seeded = true;
    } else {
      const float* ib = bt.init + b * k * D;
      for (int64_t j = 0; j < k; ++j) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += static_cast<double>(ib[j * D + d]) * ib[j * D + d];
        const double scale = cosine ? 1.0 / std::max(std::sqrt(s), static_cast<double>(kEps)) : 1.0;
        for (int64_t d = 0; d < D; ++d) C[j * D + d] = static_cast<float>(ib[j * D + d] * scale);
        cterm[j] = center_term(C.data() + j * D);
      }
    }
    std::vector<double> sums(k * D), counts(k);
    double tol_b = -1;
    bool strict = false;
    int64_t it = 0;
    for (; it < bt.max_iter; ++it) {
      // The first iteration after seeding reuses the seeding's labels: only the sums are computed.
      const int64_t changed = pass(!(seeded && it == 0), true, sums, counts);
      if (changed == 0) {
        strict = true;  // labels and distances already match the current centers
        ++it;
        break;
      }
      if (tol_b < 0) {
        double mm = 0;
        for (int64_t d = 0; d < D; ++d) {
          double tot = 0;
          for (int64_t j = 0; j < k; ++j) tot += sums[j * D + d];
          tot /= wsum;
          mm += tot * tot;
        }
        tol_b = std::max(msq - mm, 0.0) / D * bt.tol;
      }
      repair_empty(sums, counts);
      double shift = 0;
      for (int64_t j = 0; j < k; ++j) {
        double scale;
        if (cosine) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += sums[j * D + d] * sums[j * D + d];
          scale = 1.0 / std::max(std::sqrt(s), static_cast<double>(kEps));
        } else {
          scale = counts[j] > 0 ? 1.0 / counts[j] : 1.0;
        }
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(sums[j * D + d] * scale);
          const double delta = static_cast<double>(v) - C[j * D + d];
          shift += delta * delta;
          C[j * D + d] = v;
        }
        cterm[j] = center_term(C.data() + j * D);
      }
      prev.swap(lab);
      if (shift <= tol_b) {
        ++it;
        break;
      }
    }
    if (!strict) {
      std::vector<double> none;
      pass(true, false, none, none);  // final E-step (as scikit-learn) for the centers kept
    }
    double inertia = 0;
    for (int64_t i = 0; i < n; ++i) inertia += static_cast<double>(mind[i]) * w[i];
    // Outputs: labels on the batch's own positions.
    const bool* vb = bt.valid + b * bt.N;
    int64_t* lb = bt.labels + b * bt.N;
    for (int64_t i = 0, j = 0; i < bt.N; ++i)
      if (vb[i]) lb[i] = lab[j++];
    std::memcpy(bt.centers + b * k * D, C.data(), k * D * sizeof(float));
    bt.inertia[b] = static_cast<float>(inertia);
    bt.n_iter[b] = it;
  }
};

static void fit_instance(const Batch& bt, int64_t b, const Runner& run) {
  Instance inst(bt, run, b);
  if (!inst.prepare()) {
    bt.finite[b] = false;
    return;
  }
  inst.fit();
}
