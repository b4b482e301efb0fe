//! Builds a VM step by step from a [`VmConfig`] and runs it to its end.
use crate::config::VmConfig;
use crate::report::RunReport;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Placeholder until the VMM core lands.
    #[error("not yet implemented")]
    Unimplemented,
}

/// Options of one run that are not part of the VM's configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// When the process started (boot figures are measured from here).
    pub started: std::time::Instant,
    /// Stop the VM after this long (None: no limit).
    pub timeout: Option<std::time::Duration>,
}

/// Builds the VM described by `config`, runs it until it ends, and reports.
pub fn run(config: &VmConfig, options: &RunOptions) -> Result<RunReport, VmmError> {
    let _ = (config, options);
    Err(VmmError::Unimplemented)
}
