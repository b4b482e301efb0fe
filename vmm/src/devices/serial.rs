//! COM1: vm-superio's 16550 UART. What the guest writes goes to a [`ConsoleSink`] that
//! feeds the report collector and, if asked, echoes to stdout. The UART's interrupt is an
//! eventfd wired to IRQ 4 with KVM_IRQFD (the tiny guest and Linux's early console poll).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::PioDevice;
use crate::exit::VmExit;
use crate::guest_report::GuestReportCollector;

/// The ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// Ports of a 16550.
pub const SERIAL_PORTS: u16 = 8;

/// Raises the UART's interrupt by writing its eventfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub struct ConsoleSink {
    echo: bool,
    collector: Arc<Mutex<GuestReportCollector>>,
}

impl ConsoleSink {
    /// Feeds `collector`; also copies to stdout when `echo`.
    pub fn new(echo: bool, collector: Arc<Mutex<GuestReportCollector>>) -> Self {
        ConsoleSink { echo, collector }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.collector.lock().unwrap_or_else(|e| e.into_inner()).push_bytes(buf);
        if self.echo {
            let mut out = io::stdout().lock();
            // A closed stdout must not stop the guest.
            let _ = out.write_all(buf);
            if buf.contains(&b'\n') {
                let _ = out.flush();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.echo {
            let _ = io::stdout().flush();
        }
        Ok(())
    }
}

/// The UART on the port bus.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing to `sink`.
    pub fn new(interrupt: EventFd, sink: ConsoleSink) -> Self {
        SerialDevice { uart: Serial::new(EventFdTrigger(interrupt), sink) }
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmExit> {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                tracing::debug!("serial write at offset {offset}: {e}");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_the_uart_reach_the_report_collector() {
        let collector = Arc::new(Mutex::new(GuestReportCollector::new(std::time::Instant::now())));
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(event, ConsoleSink::new(false, collector.clone()));
        for &byte in b"FL done {\"status\":0,\"name\":\"success\"}\n" {
            serial.write(0, &[byte]);
        }
        assert_eq!(collector.lock().unwrap().report.done.as_ref().unwrap().status, 0);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
    }
}
