//! The device a command runs on.

use crate::{Result, TrainError};
use candle_core::Device;

/// "auto" picks CUDA, then Metal, then the CPU.
pub fn select_device(spec: &str) -> Result<Device> {
    let dev = match spec {
        "cpu" => Device::Cpu,
        "metal" => Device::new_metal(0)?,
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0)?
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0)?
            } else {
                Device::Cpu
            }
        }
        s => {
            let n = s.strip_prefix("cuda").map(|r| r.trim_start_matches(':')).unwrap_or("x");
            let n: usize = if n.is_empty() {
                0
            } else {
                n.parse().map_err(|_| {
                    TrainError::Invalid(format!("device = {s:?}: expected \"auto\", \"cpu\", \"cuda:N\" or \"metal\""))
                })?
            };
            Device::new_cuda(n)?
        }
    };
    Ok(dev)
}
