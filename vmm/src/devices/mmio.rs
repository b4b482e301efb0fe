//! The MMIO bus: guest-physical address windows to devices. Reads of addresses no device
//! claims return all ones; writes to them are ignored (as on a PC with nothing decoding
//! the address).

use std::sync::{Arc, Mutex};

/// A device on the MMIO bus.
pub trait MmioDevice: Send {
    /// A read of `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` from the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building the MMIO bus.
#[derive(Debug, thiserror::Error)]
pub enum MmioBusError {
    /// Two devices claim overlapping addresses.
    #[error("MMIO window [{base:#x}, {end:#x}) overlaps a device already on the bus; give each device its own window")]
    Overlap {
        /// First address.
        base: u64,
        /// One past the last address.
        end: u64,
    },
    /// The window is empty or wraps around the address space.
    #[error("MMIO window at {base:#x} of {len:#x} bytes is empty or wraps around the address space")]
    BadWindow {
        /// First address.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Window {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

/// MMIO bus: address windows to devices. Built before the vCPUs start, then shared.
#[derive(Default)]
pub struct MmioBus {
    windows: Vec<Window>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at guest-physical addresses `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn MmioDevice>>) -> Result<(), MmioBusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(MmioBusError::BadWindow { base, len })?;
        if self.windows.iter().any(|w| base < w.base + w.len && w.base < end) {
            return Err(MmioBusError::Overlap { base, end });
        }
        self.windows.push(Window { base, len, device });
        Ok(())
    }

    /// The device and offset an access of `len` bytes at `addr` reaches; an access that
    /// straddles the end of a window reaches nothing.
    fn find(&self, addr: u64, len: usize) -> Option<(&Window, u64)> {
        self.windows
            .iter()
            .find(|w| addr >= w.base && addr - w.base < w.len && (addr - w.base).saturating_add(len as u64) <= w.len)
            .map(|w| (w, addr - w.base))
    }

    /// Whether a device claims `addr`.
    pub fn claims(&self, addr: u64) -> bool {
        self.find(addr, 1).is_some()
    }

    /// Dispatches a read; unclaimed addresses read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((w, offset)) => w.device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data),
            None => {
                tracing::debug!("read of {} bytes at unclaimed MMIO {addr:#x}", data.len());
                data.fill(0xff);
            }
        }
    }

    /// Dispatches a write; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((w, offset)) => w.device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data),
            None => tracing::debug!("write of {data:x?} to unclaimed MMIO {addr:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with offset + stored byte.
    struct Scratch(u8);
    impl MmioDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn bus_dispatches_by_window_and_defaults_to_all_ones() {
        let mut bus = MmioBus::new();
        bus.insert(0xd000_0000, 0x1000, Arc::new(Mutex::new(Scratch(1)))).unwrap();
        bus.insert(0xd000_1000, 0x1000, Arc::new(Mutex::new(Scratch(50)))).unwrap();
        let mut data = [0u8; 4];
        bus.read(0xd000_0010, &mut data);
        assert_eq!(data, [0x11; 4]);
        bus.write(0xd000_1000, &[7]);
        bus.read(0xd000_1002, &mut data[..1]);
        assert_eq!(data[0], 9);
        bus.read(0xd000_0000 - 4, &mut data);
        assert_eq!(data, [0xff; 4]);
        // Straddling the end of the last window: nobody's.
        bus.read(0xd000_1ffe, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.write(0xe000_0000, &[1, 2]);
        assert!(bus.claims(0xd000_1fff) && !bus.claims(0xd000_2000));
    }

    #[test]
    fn overlapping_or_wrapping_windows_are_refused() {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, Arc::new(Mutex::new(Scratch(0)))).unwrap();
        assert!(matches!(
            bus.insert(0x1800, 0x1000, Arc::new(Mutex::new(Scratch(0)))),
            Err(MmioBusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX - 1, 4, Arc::new(Mutex::new(Scratch(0)))),
            Err(MmioBusError::BadWindow { .. })
        ));
        assert!(matches!(bus.insert(0x9000, 0, Arc::new(Mutex::new(Scratch(0)))), Err(MmioBusError::BadWindow { .. })));
    }
}
