//! A linear layer (`y = x·Wᵀ + b`) whose weights are stored for the shape an encoder's
//! inputs have: a few token rows against a large weight matrix.
//!
//! candle's `Linear` hands gemm the weight matrix as it is stored (`(out, in)`, or its
//! transpose). gemm then vectorises along the output features and, for a handful of token
//! rows, does not repack the weights: its kernel reads them in place, one 64-byte piece per
//! step of the inner dimension at a stride of a whole row. For all-MiniLM-L6-v2 and a short
//! text (ten tokens) that ran at 15–18 GFLOP/s here, stalled on those loads (perf: the
//! kernel's weight loads took 80% of its time). [`PackedLinear`] copies the weights once,
//! at load, into panels of [`PANEL`] output features, each panel `(in, PANEL)` row-major and
//! contiguous, and runs one gemm per panel: the kernel then streams each panel front to
//! back. Measured on MiniLM's 36 matrices, ten tokens: 4.8–7.3 against 12.7–14.4 ms per
//! forward pass; 32 tokens 11.6 against 24.8 ms; 80 tokens about even. Same arithmetic,
//! same results up to float rounding.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// Output features per panel. 32 (two of gemm's AVX2 row blocks, one of its AVX-512 ones)
/// was the fastest of 16, 32, 64 and 128 on MiniLM's shapes.
pub const PANEL: usize = 32;

/// A linear layer with panel-packed weights. Apply it with [`PackedLinear::forward`].
#[derive(Clone)]
pub struct PackedLinear {
    in_features: usize,
    out_features: usize,
    /// Panel `p` (features `p·PANEL ..`, the last one possibly narrower) starts at
    /// `p·PANEL·in_features`; inside it, feature `r` of input position `k` is at
    /// `k·width + r`.
    packed: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// GELU (erf form) applied to the output, see [`PackedLinear::then_gelu_erf`].
    gelu: bool,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("in_features", &self.in_features)
            .field("out_features", &self.out_features)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl PackedLinear {
    /// Packs `weight` `(out, in)` (any layout, any float dtype) and `bias` `(out)`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let rows = weight.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut packed = Vec::with_capacity(out_features * in_features);
        for first in (0..out_features).step_by(PANEL) {
            let panel = &rows[first..(first + PANEL).min(out_features)];
            for k in 0..in_features {
                packed.extend(panel.iter().map(|row| row[k]));
            }
        }
        let bias = match bias {
            Some(b) => {
                let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if b.len() != out_features {
                    candle_core::bail!(
                        "bias has {} values for {out_features} output features",
                        b.len()
                    );
                }
                Some(b)
            }
            None => None,
        };
        Ok(PackedLinear {
            in_features,
            out_features,
            packed,
            bias,
            gelu: false,
        })
    }

    /// The layer followed by GELU in its exact (erf) form, `x·Φ(x)`, applied to each output
    /// block while it is still in cache; [`gelu_erf`] says how close it is to the exact one.
    pub fn then_gelu_erf(mut self) -> Self {
        self.gelu = true;
        self
    }

    /// Loads `weight` and `bias` under `vb` (as `candle_nn::linear` does) and packs them.
    pub fn load(
        in_features: usize,
        out_features: usize,
        vb: candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = vb.get(out_features, "bias")?;
        Self::new(&weight, Some(&bias))
    }

    /// `x·Wᵀ + b` over the last dimension of `x` (f32, any leading dimensions).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `dst` (`rows × out_features`, row-major) = `x` (`rows × in_features`)·Wᵀ + b.
    fn run(&self, x: &[f32], rows: usize, dst: &mut [f32]) {
        let (n_in, n_out) = (self.in_features, self.out_features);
        debug_assert_eq!(x.len(), rows * n_in);
        debug_assert_eq!(dst.len(), rows * n_out);
        if let Some(bias) = &self.bias {
            for row in dst.chunks_exact_mut(n_out) {
                row.copy_from_slice(bias);
            }
        }
        for first in (0..n_out).step_by(PANEL) {
            let width = PANEL.min(n_out - first);
            let panel = &self.packed[first * n_in..(first + width) * n_in];
            // SAFETY: dst holds rows × n_out values; the block written is rows ×
            // [first, first + width), rows n_out apart. x holds rows × n_in values and the
            // panel n_in × width, each read with the strides given.
            unsafe {
                gemm::gemm(
                    rows,
                    width,
                    n_in,
                    dst.as_mut_ptr().add(first),
                    1,
                    n_out as isize,
                    self.bias.is_some(),
                    x.as_ptr(),
                    1,
                    n_in as isize,
                    panel.as_ptr(),
                    1,
                    width as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        if self.gelu {
            gelu_erf(dst);
        }
    }
}

/// GELU in its erf form, `x/2·(1 + erf(x/√2))`, in place. erf is the rational
/// approximation on [-4, 4] (beyond it erf is ±1 in f32) that Eigen and XLA use for f32:
/// polynomials in x², so the loop vectorises, where libm's `erff` (candle's `gelu_erf`) is a
/// branchy call per value and was a tenth of a MiniLM forward pass. Largest error against
/// the exact erf: 3.3e-7 (the unit test checks 4e-7 against an f64 series), 6.6e-7 on GELU.
pub fn gelu_erf(xs: &mut [f32]) {
    const A: [f32; 7] = [
        -2.7261424e-10,
        2.7706815e-08,
        -2.101024e-06,
        -5.6925062e-05,
        -7.3499064e-04,
        -2.9546e-03,
        -1.6096033e-02,
    ];
    const B: [f32; 5] = [
        -1.45660715e-05,
        -2.1337405e-04,
        -1.682827e-03,
        -7.3733293e-03,
        -1.4264739e-02,
    ];
    for v in xs {
        let x = (*v * std::f32::consts::FRAC_1_SQRT_2).clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = A[0];
        for a in &A[1..] {
            p = p * x2 + a;
        }
        let mut q = B[0];
        for b in &B[1..] {
            q = q * x2 + b;
        }
        *v *= 0.5 * (1.0 + x * p / q);
    }
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("packed-linear takes f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed-linear takes a contiguous input");
        };
        let dims = layout.dims();
        if dims.last() != Some(&self.in_features) {
            candle_core::bail!(
                "packed-linear: input {dims:?} does not end in {} features",
                self.in_features
            );
        }
        let x = &data[start..end];
        let rows = x.len() / self.in_features;
        let mut dst = vec![0f32; rows * self.out_features];
        if rows > 0 {
            self.run(x, rows, &mut dst);
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = self.out_features;
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The same product, computed naively in f64.
    fn naive(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        rows: usize,
        n_in: usize,
        n_out: usize,
    ) -> Vec<f32> {
        let mut y = Vec::with_capacity(rows * n_out);
        for r in 0..rows {
            for o in 0..n_out {
                let mut acc = b.map_or(0.0, |b| b[o] as f64);
                for k in 0..n_in {
                    acc += x[r * n_in + k] as f64 * w[o * n_in + k] as f64;
                }
                y.push(acc as f32);
            }
        }
        y
    }

    #[test]
    fn matches_a_naive_product_for_any_shape() {
        let dev = Device::Cpu;
        // Output widths below, at and between panels; one row, many rows; with and without bias.
        for (rows, n_in, n_out, bias) in [
            (1, 8, 3, true),
            (10, 384, 384, true),
            (7, 40, 32, false),
            (3, 17, 33, true),
            (45, 64, 100, true),
            (2, 1536, 65, false),
        ] {
            let w = values(n_out * n_in, 1);
            let x = values(rows * n_in, 2);
            let b = bias.then(|| values(n_out, 3));
            let wt = Tensor::from_vec(w.clone(), (n_out, n_in), &dev).unwrap();
            let bt = b.clone().map(|b| Tensor::from_vec(b, n_out, &dev).unwrap());
            let lin = PackedLinear::new(&wt, bt.as_ref()).unwrap();
            let xt = Tensor::from_vec(x.clone(), (1, rows, n_in), &dev).unwrap();
            let y = lin.forward(&xt).unwrap();
            assert_eq!(y.dims(), &[1, rows, n_out]);
            let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = naive(&x, &w, b.as_deref(), rows, n_in, n_out);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{rows}x{n_in}->{n_out} [{i}]: {g} vs {w}"
                );
            }
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn strided_weights_and_inputs_are_read_by_their_layout() {
        let dev = Device::Cpu;
        let w = values(24 * 40, 4);
        // The same weights given as a transposed view of (in, out) storage.
        let stored = Tensor::from_vec(w.clone(), (24, 40), &dev).unwrap();
        let view = stored.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!view.is_contiguous());
        let x = Tensor::from_vec(values(40 * 5, 5), (40, 5), &dev)
            .unwrap()
            .t()
            .unwrap();
        let a = PackedLinear::new(&stored, None)
            .unwrap()
            .forward(&x)
            .unwrap();
        let b = PackedLinear::new(&view, None).unwrap().forward(&x).unwrap();
        let c = x.matmul(&stored.t().unwrap()).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let diff = max_abs_diff(&a, &c);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn wrong_inputs_are_errors() {
        let dev = Device::Cpu;
        let lin =
            PackedLinear::new(&Tensor::zeros((4, 8), DType::F32, &dev).unwrap(), None).unwrap();
        assert!(
            lin.forward(&Tensor::zeros((2, 7), DType::F32, &dev).unwrap())
                .is_err()
        );
        assert!(
            lin.forward(&Tensor::zeros((2, 8), DType::F64, &dev).unwrap())
                .is_err()
        );
        let bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let err = PackedLinear::new(
            &Tensor::zeros((4, 8), DType::F32, &dev).unwrap(),
            Some(&bias),
        );
        assert!(err.is_err());
        // No rows: an empty answer of the right shape.
        let y = lin
            .forward(&Tensor::zeros((0, 8), DType::F32, &dev).unwrap())
            .unwrap();
        assert_eq!(y.dims(), &[0, 4]);
    }

    /// erf by its Maclaurin series in f64 (exact to rounding for |x| ≤ 6 with enough terms).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_erf_is_within_a_few_ulps_of_the_exact_one() {
        let xs: Vec<f32> = (-8000..=8000).map(|i| i as f32 / 1000.0).collect();
        let mut ys = xs.clone();
        gelu_erf(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let x = f64::from(*x);
            let erf = if x.abs() < 5.5 {
                erf_series(x / std::f64::consts::SQRT_2)
            } else {
                x.signum()
            };
            let exact = 0.5 * x * (1.0 + erf);
            let err = (f64::from(*y) - exact).abs();
            assert!(
                err <= 4e-7 * (1.0 + x.abs()),
                "gelu({x}) = {y}, exact {exact}"
            );
        }
        // The fused layer gives the layer's output through it.
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(64 * 16, 7), (64, 16), &dev).unwrap();
        let x = Tensor::from_vec(values(3 * 16, 8), (3, 16), &dev).unwrap();
        let plain = PackedLinear::new(&w, None).unwrap().forward(&x).unwrap();
        let fused = PackedLinear::new(&w, None)
            .unwrap()
            .then_gelu_erf()
            .forward(&x)
            .unwrap();
        let mut want = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        gelu_erf(&mut want);
        assert_eq!(fused.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}
