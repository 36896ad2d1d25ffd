//! Choosing the libtorch device for training.

use tch::Device;

/// Device requested on the command line.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU, or an error when none is usable.
    Cuda,
    /// The first CUDA GPU when one is usable, else the CPU.
    #[default]
    Auto,
}

/// Errors from resolving a [`DeviceChoice`].
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// CUDA was requested but libtorch cannot use it.
    #[error(
        "CUDA was requested but this libtorch has no CUDA support or no GPU is visible; install the CUDA build of libtorch 2.13 (for example `pip install torch==2.13.0` and build with LIBTORCH_USE_PYTORCH=1) or use --device cpu"
    )]
    CudaUnavailable,
}

/// Maps a [`DeviceChoice`] to a libtorch device, using GPU 0 for CUDA.
pub fn resolve_device(choice: DeviceChoice) -> Result<Device, DeviceError> {
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if cuda => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(DeviceError::CudaUnavailable),
        DeviceChoice::Auto if cuda => Ok(Device::Cuda(0)),
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_resolves_to_cpu() {
        assert_eq!(resolve_device(DeviceChoice::Cpu).unwrap(), Device::Cpu);
    }

    #[test]
    fn auto_follows_cuda_availability() {
        let expected = if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        };
        assert_eq!(resolve_device(DeviceChoice::Auto).unwrap(), expected);
    }

    #[test]
    fn cuda_needs_a_gpu() {
        let resolved = resolve_device(DeviceChoice::Cuda);
        if tch::Cuda::is_available() {
            assert_eq!(resolved.unwrap(), Device::Cuda(0));
        } else {
            let message = resolved.unwrap_err().to_string();
            assert!(message.contains("--device cpu"), "{message}");
        }
    }
}
