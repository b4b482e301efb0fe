//! The step-control port (`abi::STEP_CONTROL_PORT`): lets the VMM end the guest's
//! open-ended step (`churn` with `fl.until_stopped=1`), e.g. when the chaos driver has
//! done its events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use faultline_abi as abi;

use crate::devices::PioDevice;
use crate::exit::VmExit;
use crate::persist::Persist;

/// Ports the device claims.
pub const STEP_CONTROL_PORTS: u16 = 1;

/// Reads `abi::STEP_STOP` once `stop` is set, 0 before.
#[derive(Debug, Clone, Default)]
pub struct StepControl {
    stop: Arc<AtomicBool>,
}

impl StepControl {
    /// A device answering from `stop`.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self { stop }
    }
}

/// Whether the VMM has asked the guest's open-ended step to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepControlState {
    /// The stop flag.
    pub stop: bool,
}

impl Persist for StepControl {
    type State = StepControlState;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<StepControlState, Self::Error> {
        Ok(StepControlState { stop: self.stop.load(Ordering::Acquire) })
    }

    fn restore(&mut self, state: &StepControlState) -> Result<(), Self::Error> {
        self.stop.store(state.stop, Ordering::Release);
        Ok(())
    }
}

impl PioDevice for StepControl {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = if self.stop.load(Ordering::Acquire) { abi::STEP_STOP } else { 0 };
        }
    }

    fn write(&mut self, _offset: u16, _data: &[u8]) -> Option<VmExit> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_once_asked() {
        let stop = Arc::new(AtomicBool::new(false));
        let mut device = StepControl::new(stop.clone());
        let mut byte = [0xffu8];
        device.read(0, &mut byte);
        assert_eq!(byte, [0]);
        stop.store(true, Ordering::Release);
        device.read(0, &mut byte);
        assert_eq!(byte, [abi::STEP_STOP]);
    }
}
