//! Devices the guest reaches through port I/O or MMIO, and the buses that dispatch to
//! them ([`PioBus`], [`mmio::MmioBus`], bundled as [`DeviceBuses`]). Reads no device
//! claims return all ones; writes to them are ignored.

pub mod debug_exit;
pub mod mmio;
pub mod pv_console;
pub mod serial;
pub mod step_control;
pub mod virtio;

pub use mmio::{MmioBus, MmioBusError, MmioDevice};

use std::sync::{Arc, Mutex};

use crate::exit::VmExit;

/// A device on the port-I/O bus.
pub trait PioDevice: Send {
    /// A read of `data.len()` bytes at `offset` from the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// A write at `offset`; returns how the VM ends if this write ends it.
    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmExit>;
}

/// Errors building the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ports.
    #[error("ports {base:#x}..{end:#x} overlap a device already on the bus")]
    Overlap {
        /// First port.
        base: u16,
        /// One past the last port.
        end: u32,
    },
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Port-I/O bus: port ranges to devices. Built before the vCPUs start, then shared.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at ports `base..base + len`.
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) -> Result<(), BusError> {
        let end = base as u32 + len as u32;
        if self.ranges.iter().any(|r| (base as u32) < r.base as u32 + r.len as u32 && (r.base as u32) < end) {
            return Err(BusError::Overlap { base, end });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && (port as u32) < r.base as u32 + r.len as u32)
            .map(|r| (r, port - r.base))
    }

    /// Dispatches an IN; unclaimed ports read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((range, offset)) => range.device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data),
            None => {
                tracing::trace!("read of unclaimed port {port:#x}");
                data.fill(0xff);
            }
        }
    }

    /// Dispatches an OUT; unclaimed ports ignore it. Returns how the VM ends, if it does.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<VmExit> {
        match self.find(port) {
            Some((range, offset)) => range.device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data),
            None => {
                tracing::trace!("write of {data:x?} to unclaimed port {port:#x}");
                None
            }
        }
    }
}

/// The buses a vCPU dispatches its I/O exits to.
#[derive(Default)]
pub struct DeviceBuses {
    /// Port I/O (IN/OUT exits).
    pub pio: PioBus,
    /// Memory-mapped I/O (MMIO read/write exits).
    pub mmio: MmioBus,
}

impl DeviceBuses {
    /// Both buses, as given.
    pub fn new(pio: PioBus, mmio: MmioBus) -> Self {
        Self { pio, mmio }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _: u16, data: &[u8]) -> Option<VmExit> {
            self.0 = data[0];
            None
        }
    }

    #[test]
    fn bus_dispatches_by_port_range_and_defaults_to_all_ones() {
        let mut bus = PioBus::new();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Echo(10)))).unwrap();
        let mut data = [0u8; 1];
        bus.read(0x102, &mut data);
        assert_eq!(data, [12]);
        bus.write(0x100, &[20]);
        bus.read(0x103, &mut data);
        assert_eq!(data, [23]);
        bus.read(0x104, &mut data);
        assert_eq!(data, [0xff]);
        assert!(bus.insert(0x103, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
    }
}
