//! The built-in guest's paravirtual console (`faultline_abi::PV_CONSOLE_PORT`): the guest
//! names a buffer in its memory with one port write, and its bytes go to the same
//! [`ConsoleSink`] as the UART's, as if written to the UART one by one. One VM exit per
//! line instead of one per byte. The UART stays for Linux, for QEMU (which has no such
//! device: the guest finds none and falls back to the UART) and for a guest's last words.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::serial::ConsoleSink;
use crate::devices::PioDevice;
use crate::exit::VmExit;
use faultline_abi::{PV_CONSOLE_MAGIC, PV_CONSOLE_MAX};

/// The device on the port bus: reads guest memory, writes the console sink.
pub struct PvConsole {
    memory: GuestMemoryMmap,
    sink: ConsoleSink,
    /// Reused for every buffer (no allocation per line).
    bytes: Vec<u8>,
}

impl PvConsole {
    /// A console reading buffers from `memory` and writing them to `sink`.
    pub fn new(memory: GuestMemoryMmap, sink: ConsoleSink) -> Self {
        PvConsole { memory, sink, bytes: Vec::with_capacity(PV_CONSOLE_MAX) }
    }

    /// Takes the buffer at `gpa` (length, then bytes); a bad one is logged and dropped
    /// (the guest's fault, not the VMM's).
    fn take_buffer(&mut self, gpa: u64) {
        let mut len = [0u8; 4];
        if let Err(err) = self.memory.read_slice(&mut len, GuestAddress(gpa)) {
            tracing::warn!("pv console: buffer header at {gpa:#x} is not in guest RAM ({err}); dropped");
            return;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > PV_CONSOLE_MAX {
            tracing::warn!("pv console: buffer at {gpa:#x} claims {len} bytes (at most {PV_CONSOLE_MAX}); dropped");
            return;
        }
        self.bytes.resize(len, 0);
        if let Err(err) = self.memory.read_slice(&mut self.bytes, GuestAddress(gpa + 4)) {
            tracing::warn!("pv console: {len} bytes at {:#x} are not in guest RAM ({err}); dropped", gpa + 4);
            return;
        }
        // The sink never fails (a closed stdout is ignored there).
        let _ = self.sink.write_all(&self.bytes);
    }
}

impl PioDevice for PvConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&PV_CONSOLE_MAGIC.to_le_bytes()),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmExit> {
        match (offset, <[u8; 4]>::try_from(data)) {
            (0, Ok(gpa)) => self.take_buffer(u32::from_le_bytes(gpa) as u64),
            _ => tracing::debug!("pv console: ignored write of {data:x?} at offset {offset}"),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::guest_report::GuestReportCollector;

    fn console() -> (PvConsole, Arc<Mutex<GuestReportCollector>>, GuestMemoryMmap) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let collector = Arc::new(Mutex::new(GuestReportCollector::new(std::time::Instant::now())));
        (PvConsole::new(memory.clone(), ConsoleSink::new(false, collector.clone())), collector, memory)
    }

    #[test]
    fn a_read_at_the_port_is_the_magic_and_elsewhere_all_ones() {
        let (mut pv, _, _) = console();
        let mut data = [0u8; 4];
        pv.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), PV_CONSOLE_MAGIC);
        let mut byte = [0u8; 1];
        pv.read(0, &mut byte);
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn a_buffer_reaches_the_sink_and_bad_ones_are_dropped() {
        let (mut pv, collector, memory) = console();
        let line = b"FL done {\"status\":0,\"name\":\"success\"}\n";
        memory.write_slice(&(line.len() as u32).to_le_bytes(), GuestAddress(0x1000)).unwrap();
        memory.write_slice(line, GuestAddress(0x1004)).unwrap();
        assert!(pv.write(0, &0x1000u32.to_le_bytes()).is_none());
        // Too long, and outside guest RAM: nothing reaches the sink, nothing panics.
        memory.write_slice(&(PV_CONSOLE_MAX as u32 + 1).to_le_bytes(), GuestAddress(0x2000)).unwrap();
        pv.write(0, &0x2000u32.to_le_bytes());
        pv.write(0, &0xffff_0000u32.to_le_bytes());
        let collector = collector.lock().unwrap();
        assert_eq!(collector.report.done.as_ref().map(|done| done.status), Some(0));
        assert!(collector.report.unparsed.is_empty());
    }
}
