//! Where models compute, chosen once at start (`--device auto|cpu|cuda[:N]`): the CPU, on the
//! packed kernels, or one CUDA GPU, on candle's CUDA backend (builds with the `cuda` feature).
//! Every architecture has a path on both; a checkpoint a GPU path would compute differently is
//! refused there by name (its family says why); nothing moves to the CPU behind the operator's
//! back.

use std::fmt;
use std::str::FromStr;

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA device 0 when this build has CUDA and a device opens; else the CPU.
    Auto,
    Cpu,
    /// The CUDA device with this ordinal; failing to open it fails the start.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.trim() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| DeviceError::Syntax(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?}: expected auto, cpu, cuda or cuda:N (N the CUDA device ordinal)")]
    Syntax(String),
    #[error(
        "device cuda:{0}: this build has no CUDA support; run the kiln-model-server image tagged -cuda (built with `make build-cuda`), or --device cpu"
    )]
    NotBuilt(usize),
    #[error("device cuda:{ordinal} cannot be opened: {message}")]
    Open { ordinal: usize, message: String },
}

/// How a request resolves before any device is touched: what `auto` means in this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePlan {
    Cpu,
    /// Open this CUDA device or fail.
    Cuda(usize),
    /// Try CUDA device 0; use the CPU if it does not open (said in the log and `/status`).
    CudaElseCpu,
}

/// The plan for `request` in a build with (`cuda_built`) or without the `cuda` feature.
pub fn plan(request: DeviceRequest, cuda_built: bool) -> Result<DevicePlan, DeviceError> {
    match (request, cuda_built) {
        (DeviceRequest::Cpu, _) | (DeviceRequest::Auto, false) => Ok(DevicePlan::Cpu),
        (DeviceRequest::Cuda(n), true) => Ok(DevicePlan::Cuda(n)),
        (DeviceRequest::Cuda(n), false) => Err(DeviceError::NotBuilt(n)),
        (DeviceRequest::Auto, true) => Ok(DevicePlan::CudaElseCpu),
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The device models compute on.
#[derive(Clone)]
pub struct ComputeDevice {
    /// `None` for the CPU, else the CUDA ordinal.
    cuda: Option<usize>,
    /// The GPU's name as the driver reports it, or the CPU's instruction set.
    name: String,
    candle: candle_core::Device,
    /// Why `auto` ended on the CPU, when it tried CUDA.
    note: Option<String>,
}

impl fmt::Debug for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.label(), self.name)
    }
}

impl ComputeDevice {
    pub fn cpu() -> Self {
        let name = format!(
            "cpu (row kernels {}, matmul {})",
            crate::kernels::Isa::chosen().name(),
            crate::kernels::gemm::matmul_isa()
        );
        ComputeDevice { cuda: None, name, candle: candle_core::Device::Cpu, note: None }
    }

    /// Open what `request` asks for in this build.
    pub fn open(request: DeviceRequest) -> Result<Self, DeviceError> {
        match plan(request, CUDA_BUILT)? {
            DevicePlan::Cpu => Ok(Self::cpu()),
            DevicePlan::Cuda(n) => Self::cuda(n),
            DevicePlan::CudaElseCpu => Ok(Self::cuda(0).unwrap_or_else(|e| {
                let mut cpu = Self::cpu();
                cpu.note = Some(format!("auto chose the CPU: {e}"));
                cpu
            })),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(ordinal: usize) -> Result<Self, DeviceError> {
        let open = |e: candle_core::Error| DeviceError::Open { ordinal, message: e.to_string() };
        let candle = candle_core::Device::new_cuda(ordinal).map_err(open)?;
        let name = candle
            .as_cuda_device()
            .map_err(open)?
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|e| format!("unnamed ({e})"));
        Ok(ComputeDevice { cuda: Some(ordinal), name, candle, note: None })
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(ordinal: usize) -> Result<Self, DeviceError> {
        Err(DeviceError::NotBuilt(ordinal))
    }

    /// `cpu` or `cuda:N`, as `--device` writes it.
    pub fn label(&self) -> String {
        match self.cuda {
            None => "cpu".to_string(),
            Some(n) => format!("cuda:{n}"),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    pub fn is_cpu(&self) -> bool {
        self.cuda.is_none()
    }

    /// The candle device tensors of a GPU path are created on.
    pub fn candle(&self) -> &candle_core::Device {
        &self.candle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_written_and_bad_ones_say_what_is_expected() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA:0", ""] {
            let err = bad.parse::<DeviceRequest>().expect_err(bad).to_string();
            assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{bad}: {err}");
        }
    }

    #[test]
    fn auto_means_cuda_only_in_a_cuda_build_and_an_explicit_gpu_is_never_dropped() {
        assert_eq!(plan(DeviceRequest::Auto, false), Ok(DevicePlan::Cpu));
        assert_eq!(plan(DeviceRequest::Auto, true), Ok(DevicePlan::CudaElseCpu));
        assert_eq!(plan(DeviceRequest::Cpu, true), Ok(DevicePlan::Cpu));
        assert_eq!(plan(DeviceRequest::Cuda(1), true), Ok(DevicePlan::Cuda(1)));
        let err = plan(DeviceRequest::Cuda(1), false).expect_err("no CUDA in this build");
        assert_eq!(err, DeviceError::NotBuilt(1));
        assert!(err.to_string().contains("-cuda"), "{err}");
    }

    #[test]
    fn devices_are_labelled_as_written() {
        let cpu = ComputeDevice::cpu();
        assert_eq!(cpu.label(), "cpu");
        assert!(cpu.is_cpu() && cpu.name().starts_with("cpu ("), "{}", cpu.name());
        let gpu = ComputeDevice { cuda: Some(2), ..ComputeDevice::cpu() };
        assert_eq!(gpu.label(), "cuda:2");
        assert!(!gpu.is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_auto_is_the_cpu_and_cuda_fails_the_start() {
        let auto = ComputeDevice::open(DeviceRequest::Auto).expect("auto");
        assert!(auto.is_cpu() && auto.note().is_none());
        let err = ComputeDevice::open(DeviceRequest::Cuda(0)).expect_err("not built");
        assert_eq!(err, DeviceError::NotBuilt(0));
    }
}
