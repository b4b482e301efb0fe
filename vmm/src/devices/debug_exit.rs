//! QEMU's `isa-debug-exit`: a byte written to its port ends the VM with that status.

use crate::devices::PioDevice;
use crate::exit::VmExit;

/// Number of ports the device claims (like QEMU's iosize=4).
pub const DEBUG_EXIT_PORTS: u16 = 4;

/// The debug-exit device.
#[derive(Debug, Default)]
pub struct DebugExit;

impl PioDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Option<VmExit> {
        data.first().map(|&status| VmExit::DebugExit { status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_byte_is_the_exit_status() {
        assert_eq!(DebugExit.write(0, &[3, 0, 0, 0]), Some(VmExit::DebugExit { status: 3 }));
        assert_eq!(DebugExit.write(0, &[]), None);
    }
}
