//! Counter-based random numbers on the device: Philox4x32-10 (Salmon, Moraes, Dror and Shaw,
//! "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the generator cuRAND and PyTorch's
//! CUDA dropout use.
//!
//! Each value is a pure function of a 64-bit key and its index, so a tensor of uniforms is
//! computed in place on the device (no host mask uploaded), every element independently, and
//! a run keyed by (seed, step, micro-batch, site) draws the same numbers after a resume. The
//! CPU and CUDA implementations give the same bits; Metal, which has no kernel here, seeds
//! candle's own device generator with the key.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: four 32-bit outputs for one 128-bit counter under a 64-bit key.
pub fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0, hi1, lo1) = ((p0 >> 32) as u32, p0 as u32, (p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The top 24 bits as a float in [0, 1): every value exactly representable, as cuRAND does.
fn unit(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Uniforms in [0, 1) of `shape` on `dev`, f32: element i is output i % 4 of the block
/// counter i / 4 under `key`.
pub fn uniform(shape: impl Into<Shape>, key: u64, dev: &Device) -> candle_core::Result<Tensor> {
    uniform_stream(shape, key, 0, dev)
}

/// [`uniform`] from one of 2^32 independent streams of a key: the third counter word. Lets
/// a caller that draws a tensor in pieces (a chunk at a time) redraw any piece alone.
pub fn uniform_stream(shape: impl Into<Shape>, key: u64, stream: u32, dev: &Device) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    if let Device::Metal(_) = dev {
        dev.set_seed(mix(key, stream))?;
        return Tensor::rand(0f32, 1f32, shape, dev);
    }
    // The op needs an input for its device only: one zero, whatever the shape.
    let anchor = Tensor::zeros(1, DType::U8, dev)?;
    anchor.apply_op1_no_bwd(&Philox { key, stream, shape })
}

/// One 64-bit seed for (key, stream), for generators with a seed only.
fn mix(key: u64, stream: u32) -> u64 {
    let r = philox4x32_10([stream, 0, 0, 0], [key as u32, (key >> 32) as u32]);
    u64::from(r[0]) | (u64::from(r[1]) << 32)
}

/// `uniform(x.shape()) >= p` as x's dtype, scaled by 1 / (1 - p): the inverted-dropout mask.
pub fn dropout_mask(x: &Tensor, p: f64, key: u64) -> candle_core::Result<Tensor> {
    let u = uniform(x.shape(), key, x.device())?;
    (u.ge(p as f32)?.to_dtype(DType::F32)? * (1.0 / (1.0 - p)))?.to_dtype(x.dtype())
}

struct Philox {
    key: u64,
    stream: u32,
    shape: Shape,
}

impl Philox {
    fn key_words(&self) -> [u32; 2] {
        [self.key as u32, (self.key >> 32) as u32]
    }

    fn host(&self) -> Vec<f32> {
        let n = self.shape.elem_count();
        let k = self.key_words();
        let mut out = vec![0f32; n];
        out.par_chunks_mut(4 * 1024).enumerate().for_each(|(chunk, vals)| {
            for (j, four) in vals.chunks_mut(4).enumerate() {
                let block = (chunk * 1024 + j) as u64;
                let r = philox4x32_10([block as u32, (block >> 32) as u32, self.stream, 0], k);
                for (v, x) in four.iter_mut().zip(r) {
                    *v = unit(x);
                }
            }
        });
        out
    }
}

impl CustomOp1 for Philox {
    fn name(&self) -> &'static str {
        "philox-uniform"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.host()), self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let dev = s.device().clone();
        let n = self.shape.elem_count();
        let blocks = n.div_ceil(4);
        let [k0, k1] = self.key_words();
        let n64 = n as u64;
        // SAFETY: the kernel writes every one of the n elements.
        let mut out = unsafe { dev.alloc::<f32>(n.max(1))? };
        if blocks > 0 {
            let func = dev.get_or_load_custom_func("philox_uniform_f32", "taper_random", crate::ptx::RANDOM)?;
            let mut b = func.builder();
            b.arg(&mut out).arg(&n64).arg(&k0).arg(&k1).arg(&self.stream);
            // SAFETY: the argument list matches the kernel's signature in cuda/random.cu.
            unsafe { b.launch(LaunchConfig::for_num_elems(blocks as u32)) }.w()?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), self.shape.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers from Random123's kat_vectors for philox4x32-10.
    #[test]
    fn philox_matches_random123() {
        let cases = [
            ([0u32; 4], [0u32; 2], [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]),
            ([u32::MAX; 4], [u32::MAX; 2], [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (c, k, want) in cases {
            assert_eq!(philox4x32_10(c, k), want, "ctr {c:08x?} key {k:08x?}");
        }
    }

    #[test]
    fn uniforms_are_keyed_uniform_and_reproducible() {
        let dev = Device::Cpu;
        let a: Vec<f32> = uniform(100_003, 7, &dev).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = uniform(100_003, 7, &dev).unwrap().to_vec1().unwrap();
        let c: Vec<f32> = uniform(100_003, 8, &dev).unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().zip(&c).filter(|(x, y)| x == y).count() < 100);
        assert!(a.iter().all(|x| (0.0..1.0).contains(x)));
        // Mean 1/2 and variance 1/12, within 5 standard errors.
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 0.5).abs() < 5.0 * (1.0f64 / 12.0 / n).sqrt(), "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 1e-3, "variance {var}");
        // A prefix of a longer draw is the shorter draw: element i depends on i and the key only.
        let short: Vec<f32> = uniform(17, 7, &dev).unwrap().to_vec1().unwrap();
        assert_eq!(short, a[..17]);
        let other: Vec<f32> = uniform_stream(17, 7, 1, &dev).unwrap().to_vec1().unwrap();
        assert!(other.iter().zip(&short).all(|(x, y)| x != y));
    }

    #[test]
    fn dropout_mask_keeps_one_minus_p_scaled() {
        let x = Tensor::ones((64, 1000), DType::F32, &Device::Cpu).unwrap();
        let m: Vec<f32> = dropout_mask(&x, 0.25, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    }
}
