//! COM1: vm-superio's 16550 UART. What the guest writes goes to a [`ConsoleSink`] that
//! feeds the report collector and, if asked, echoes to stdout. The UART's interrupt is an
//! eventfd wired to IRQ 4 with KVM_IRQFD (the tiny guest and Linux's early console poll).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::PioDevice;
use crate::exit::VmExit;
use crate::guest_report::GuestReportCollector;
use crate::persist::Persist;

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
#[derive(Clone)]
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
    uart: Serial<EventFdTrigger, NoEvents, ConsoleSink>,
    /// A second handle on the interrupt eventfd, for rebuilding the UART on restore.
    interrupt: EventFd,
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing to `sink`.
    ///
    /// # Panics
    /// Never in practice: duplicating an eventfd fails only when the process is out of
    /// file descriptors, which the VMM checks at start.
    pub fn new(interrupt: EventFd, sink: ConsoleSink) -> Self {
        let spare = interrupt.try_clone().expect("duplicating the serial interrupt eventfd");
        SerialDevice { uart: Serial::new(EventFdTrigger(interrupt), sink), interrupt: spare }
    }
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, in serde form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Why the serial device's state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved state is not one the UART can take (e.g. an over-full FIFO).
    #[error("the serial device's saved state is invalid: {0}")]
    BadState(String),
    /// The interrupt eventfd could not be duplicated.
    #[error("cannot duplicate the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Error = SerialError;

    fn save(&self) -> Result<SerialDeviceState, SerialError> {
        let s = self.uart.state();
        Ok(SerialDeviceState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialError> {
        let superio = SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let trigger = EventFdTrigger(self.interrupt.try_clone().map_err(SerialError::EventFd)?);
        let sink = self.uart.writer().clone();
        self.uart = Serial::from_state(&superio, trigger, NoEvents, sink)
            .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(())
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

    #[test]
    fn saved_registers_come_back_on_a_fresh_uart() {
        let collector = Arc::new(Mutex::new(GuestReportCollector::new(std::time::Instant::now())));
        let sink = ConsoleSink::new(false, collector);
        let mut serial = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), sink.clone());
        serial.write(7, &[0x5a]); // scratch
        serial.write(3, &[0x80]); // DLAB on
        serial.write(0, &[0x03]); // divisor low
        let saved = serial.save().unwrap();
        let mut fresh = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), sink);
        assert_ne!(fresh.save().unwrap(), saved);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save().unwrap(), saved);
        let mut scratch = [0u8];
        fresh.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        let too_full = SerialDeviceState { in_buffer: vec![0; 4096], ..saved };
        assert!(matches!(fresh.restore(&too_full), Err(SerialError::BadState(_))));
    }
}
