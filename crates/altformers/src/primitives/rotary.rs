//! Rotary position embeddings (RoFormer, arXiv 2104.09864).
//!
//! Each pair (x_{2i}, x_{2i+1}) of a head vector at position t is rotated by the angle
//! t * theta_i with theta_i = base^(-2i/d_h). Rotating both queries and keys makes q_t . k_s a
//! function of t - s only.

use candle_core::{DType, Device, Result, Tensor, D};

/// `theta_i = base^(-2i/d_h)`, `i < d_h / 2`.
fn frequencies(head_dim: usize, base: f64) -> impl Iterator<Item = f64> {
    (0..head_dim / 2).map(move |i| base.powf(-2.0 * i as f64 / head_dim as f64))
}

/// `cos` and `sin` tables `[T, d_h/2]` for positions `offset..offset+T`.
pub fn tables(offset: usize, len: usize, head_dim: usize, base: f64, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for t in offset..offset + len {
        for theta in frequencies(head_dim, base) {
            let (s, c) = (t as f64 * theta).sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
    let dtype = x.dtype();
    let mk = |v: Vec<f64>| Tensor::from_vec(v, (len, half), x.device())?.to_dtype(dtype);
    Ok((mk(cos)?, mk(sin)?))
}

/// The frequencies `theta_i` as an f64 `[d_h/2]` tensor on `device`, for [`tables_at`].
pub fn frequency_tensor(head_dim: usize, base: f64, device: &Device) -> Result<Tensor> {
    Tensor::new(frequencies(head_dim, base).collect::<Vec<_>>(), device)
}

/// [`tables`] for one position read from the device: `position` a one-element f32 tensor
/// (a whole number), `frequencies` from [`frequency_tensor`]; `[1, d_h/2]` tables in
/// `dtype`. Computed in f64 as [`tables`] does on the host; nothing is read back, so a step
/// that uses it is the same kernels at every position (replayable as a CUDA graph).
pub fn tables_at(position: &Tensor, frequencies: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
    let angles = frequencies.broadcast_mul(&position.to_dtype(DType::F64)?.reshape(1)?)?.unsqueeze(0)?;
    Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
}

/// Rotates `x: [B, H, T, d_h]` (positions `offset..offset+T`) pairwise.
pub fn apply(x: &Tensor, offset: usize, base: f64) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let (cos, sin) = cached_tables(offset, t, d, base, x)?;
    apply_tables(x, &cos, &sin)
}

/// [`tables`] cut from f64 tables of positions `0..n` kept on `x`'s device, one per (head
/// width, base, device), `n` doubled when a position beyond it is asked for (up to 64K
/// positions; longer ones are built per call). Kept for the life of the process. A decoding step
/// otherwise builds its tables on the host and uploads them for every layer, every token
/// (about 3 ms of a 12-layer Transformer's 6.4 ms GPU step, bench/results/2026-12-03-h200-
/// decode-all); the values are the same bits (the same f64 products, the same cast).
pub fn cached_tables(offset: usize, len: usize, head_dim: usize, base: f64, x: &Tensor) -> Result<(Tensor, Tensor)> {
    type Entry = (usize, u64, Device, usize, Tensor, Tensor);
    static CACHE: std::sync::Mutex<Vec<Entry>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().map_err(|_| candle_core::Error::Msg("rotary table cache poisoned".into()))?;
    let need = offset + len;
    // beyond 64K positions the table (up to 64 MB at d_h 128) is not kept
    if need > 1 << 16 {
        return tables(offset, len, head_dim, base, x);
    }
    let key = |e: &Entry| e.0 == head_dim && e.1 == base.to_bits() && e.2.same_device(x.device());
    let at = match cache.iter().position(key) {
        Some(i) if cache[i].3 >= need => i,
        found => {
            let n = need.next_power_of_two().max(1024);
            let (cos, sin) = tables(0, n, head_dim, base, &Tensor::zeros(1, DType::F64, x.device())?)?;
            let entry = (head_dim, base.to_bits(), x.device().clone(), n, cos, sin);
            match found {
                Some(i) => {
                    cache[i] = entry;
                    i
                }
                None => {
                    cache.push(entry);
                    cache.len() - 1
                }
            }
        }
    };
    let (_, _, _, _, cos, sin) = &cache[at];
    Ok((cos.narrow(0, offset, len)?.to_dtype(x.dtype())?, sin.narrow(0, offset, len)?.to_dtype(x.dtype())?))
}

/// Rotates `x: [B, H, T, d_h]` pairwise by the tables `[T, d_h/2]` of its positions.
pub fn apply_tables(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::kernels::rotary::applies(x) {
        return crate::kernels::rotary::rotate(x, cos, sin);
    }
    apply_tables_tensor(x, cos, sin)
}

/// [`apply_tables`] as tensor operations (the CPU's path, and the reference of the fused one).
pub fn apply_tables_tensor(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let cos = cos.reshape((t, d / 2, 1))?;
    let sin = sin.reshape((t, d / 2, 1))?;
    let pairs = x.reshape((b, h, t, d / 2, 2))?;
    let x0 = pairs.narrow(D::Minus1, 0, 1)?;
    let x1 = pairs.narrow(D::Minus1, 1, 1)?;
    let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Tensor::cat(&[r0, r1], D::Minus1)?.reshape((b, h, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn dot_product_depends_only_on_offset() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(3);
        let q = Tensor::from_vec(rng.normal_vec(16, 1.0), (1, 1, 1, 16), &dev)?.to_dtype(DType::F64)?;
        let k = Tensor::from_vec(rng.normal_vec(16, 1.0), (1, 1, 1, 16), &dev)?.to_dtype(DType::F64)?;
        let dot = |tq: usize, tk: usize| -> Result<f64> {
            let a = apply(&q, tq, 10000.0)?;
            let b = apply(&k, tk, 10000.0)?;
            (a * b)?.sum_all()?.to_scalar::<f64>()
        };
        for (t, s) in [(5, 2), (40, 37), (1003, 1000)] {
            let (d1, d2) = (dot(t, s)?, dot(t + 17, s + 17)?);
            assert!((d1 - d2).abs() < 1e-9, "offset {}: {d1} vs {d2}", t - s);
        }
        // and it does depend on the offset
        assert!((dot(5, 2)? - dot(5, 4)?).abs() > 1e-3);
        // rotation preserves norms
        let r = apply(&q, 77, 10000.0)?;
        let n0 = q.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let n1 = r.sqr()?.sum_all()?.to_scalar::<f64>()?;
        assert!((n0 - n1).abs() < 1e-9);
        Ok(())
    }

    /// The cached tables are the host's, bit for bit, before and after the cache grows.
    #[test]
    fn cached_tables_are_the_hosts() -> Result<()> {
        let x = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        for (offset, len) in [(0, 7), (5, 1), (1000, 40), (3000, 3)] {
            let (c, s) = tables(offset, len, 16, 500.0, &x)?;
            let (c2, s2) = cached_tables(offset, len, 16, 500.0, &x)?;
            assert_eq!(c.to_vec2::<f32>()?, c2.to_vec2::<f32>()?, "cos at {offset}");
            assert_eq!(s.to_vec2::<f32>()?, s2.to_vec2::<f32>()?, "sin at {offset}");
        }
        Ok(())
    }

    /// The tables of one position read from a tensor are the host's tables of that position.
    #[test]
    fn tables_of_a_device_position_are_the_hosts() -> Result<()> {
        let (d, base) = (16, 10000.0);
        let x = Tensor::zeros(1, DType::F64, &Device::Cpu)?;
        let freqs = frequency_tensor(d, base, &Device::Cpu)?;
        for t in [0usize, 5, 8191, 100_003] {
            let (c, s) = tables(t, 1, d, base, &x)?;
            let (c2, s2) = tables_at(&Tensor::new(&[t as f32], &Device::Cpu)?, &freqs, DType::F64)?;
            for (a, b) in [(&c, &c2), (&s, &s2)] {
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < 1e-12, "position {t}: {diff}");
            }
        }
        Ok(())
    }
}
