//! Tiny guests (a handful of 32-bit instructions at the PVH entry state) run on the real
//! KVM, checking how exits reach the bus and how each way of ending a VM is reported.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::runner::run_vcpus;
use super::{Kvm, Vcpu, Vm, VmControl};
use crate::config::{Backend, ZoneConfig};
use crate::devices::debug_exit::DebugExit;
use crate::devices::serial::{ConsoleSink, SerialDevice};
use crate::devices::{DeviceBuses, MmioBus, MmioDevice, PioBus};
use crate::exit::VmExit;
use crate::guest_report::GuestReportCollector;
use crate::memory::GuestRam;

const CODE_GPA: u64 = 0x10_0000;
const DATA_GPA: u64 = 0x20_0000;

/// Runs `code` at 1 MiB in 32-bit protected mode on `vcpus` vCPUs (APs wait for SIPI).
fn run_code(code: &[u8], data: &[u8], vcpus: u32, timeout: Duration) -> (VmExit, GuestReportCollector) {
    run_code_with(code, &[(DATA_GPA, data)], vcpus, timeout)
}

/// Like [`run_code`], with extra `(gpa, bytes)` written to guest memory first.
fn run_code_with(code: &[u8], blobs: &[(u64, &[u8])], vcpus: u32, timeout: Duration) -> (VmExit, GuestReportCollector) {
    run_code_on(code, blobs, vcpus, timeout, MmioBus::new())
}

/// Like [`run_code_with`], with `mmio` as the MMIO bus.
fn run_code_on(
    code: &[u8],
    blobs: &[(u64, &[u8])],
    vcpus: u32,
    timeout: Duration,
    mmio: MmioBus,
) -> (VmExit, GuestReportCollector) {
    let kvm = Kvm::open().unwrap();
    let ram = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
    let vm = Vm::new(&kvm, &ram).unwrap();
    ram.memory().write_slice(code, GuestAddress(CODE_GPA)).unwrap();
    for &(gpa, bytes) in blobs {
        ram.memory().write_slice(bytes, GuestAddress(gpa)).unwrap();
    }
    let entry = crate::boot::pvh::configure(&ram, CODE_GPA).unwrap();
    let cpuid = kvm.supported_cpuid().unwrap();
    let vcpus: Vec<_> = (0..vcpus).map(|id| Vcpu::new(&vm, &cpuid, id, vcpus).unwrap()).collect();
    vcpus[0].set_entry(&entry).unwrap();
    let collector = Arc::new(Mutex::new(GuestReportCollector::new(std::time::Instant::now())));
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irq, 4).unwrap();
    let mut bus = PioBus::new();
    bus.insert(0x3f8, 8, Arc::new(Mutex::new(SerialDevice::new(irq, ConsoleSink::new(false, collector.clone())))))
        .unwrap();
    bus.insert(0xf4, 4, Arc::new(Mutex::new(DebugExit))).unwrap();
    let control = Arc::new(VmControl::new().unwrap());
    let buses = Arc::new(DeviceBuses::new(bus, mmio));
    let exit = run_vcpus(vcpus, buses, ram.memory(), &control, Some(timeout), Vec::new()).unwrap();
    let collector = Arc::try_unwrap(collector).ok().unwrap().into_inner().unwrap();
    (exit, collector)
}

/// `mov al, status; out 0xf4, al; hlt`
fn debug_exit(status: u8) -> Vec<u8> {
    vec![0xb0, status, 0xe6, 0xf4, 0xf4]
}

#[test]
fn io_exits_reach_the_serial_port_and_debug_exit_ends_the_vm() {
    // mov esi, DATA; mov dx, 0x3f8; loop: lodsb; test al, al; jz done; out dx, al; jmp loop
    let mut code = vec![0xbe];
    code.extend_from_slice(&(DATA_GPA as u32).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
    code.extend(debug_exit(7));
    let (exit, collector) =
        run_code(&code, b"FL error {\"msg\":\"hello from the guest\"}\n\0", 1, Duration::from_secs(20));
    assert_eq!(exit, VmExit::DebugExit { status: 7 });
    assert_eq!(collector.report.errors, vec!["hello from the guest".to_string()]);
}

#[test]
fn unclaimed_mmio_reads_as_all_ones() {
    // mov eax, [0xd0000000]; out 0xf4, al
    let code = [0xa1, 0x00, 0x00, 0x00, 0xd0, 0xe6, 0xf4, 0xf4];
    let (exit, _) = run_code(&code, &[], 1, Duration::from_secs(20));
    assert_eq!(exit, VmExit::DebugExit { status: 0xff });
}

/// An MMIO register that keeps the last value written and reads it back plus one.
struct Register(u32);

impl MmioDevice for Register {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let bytes = (self.0 + 1).to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        self.0 = u32::from_le_bytes(bytes);
    }
}

#[test]
fn mmio_exits_reach_the_device_on_the_mmio_bus() {
    // mov dword [0xd0000010], 0x41; mov eax, [0xd0000010]; out 0xf4, al
    let mut code = vec![0xc7, 0x05, 0x10, 0x00, 0x00, 0xd0, 0x41, 0x00, 0x00, 0x00];
    code.extend_from_slice(&[0xa1, 0x10, 0x00, 0x00, 0xd0, 0xe6, 0xf4, 0xf4]);
    let register = Arc::new(Mutex::new(Register(0)));
    let mut mmio = MmioBus::new();
    mmio.insert(0xd000_0000, 0x1000, register.clone()).unwrap();
    let (exit, _) = run_code_on(&code, &[], 1, Duration::from_secs(20), mmio);
    assert_eq!(exit, VmExit::DebugExit { status: 0x42 });
    assert_eq!(register.lock().unwrap().0, 0x41);
}

#[test]
fn exception_without_idt_is_reported_as_triple_fault() {
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> shutdown.
    let (exit, _) = run_code(&[0x0f, 0x0b], &[], 1, Duration::from_secs(20));
    assert!(matches!(exit, VmExit::TripleFault { vcpu: 0, .. }), "{exit:?}");
}

#[test]
fn emulation_failure_is_reported_with_rip_and_instruction_bytes() {
    // pxor xmm0, xmm0 at CPL0 (emulated on this nested host), then a debug exit.
    let mut code = vec![0x66, 0x0f, 0xef, 0xc0];
    code.extend(debug_exit(0));
    let (exit, _) = run_code(&code, &[], 1, Duration::from_secs(20));
    match exit {
        VmExit::InternalError { vcpu: 0, rip, instruction_bytes, .. } => {
            assert_eq!(rip, CODE_GPA);
            assert!(instruction_bytes.starts_with("66 0f ef c0"), "{instruction_bytes}");
        }
        // A host with hardware-assisted CPL0 just runs it.
        VmExit::DebugExit { status: 0 } => {}
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn timeout_stops_a_spinning_guest_and_kicks_every_vcpu() {
    // jmp $ on the BSP; the AP waits for a SIPI that never comes.
    let started = std::time::Instant::now();
    let (exit, _) = run_code(&[0xeb, 0xfe], &[], 2, Duration::from_millis(300));
    assert!(matches!(&exit, VmExit::Stopped { reason } if reason.contains("timeout")), "{exit:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn debug_exit_on_the_bsp_kicks_waiting_aps() {
    let (exit, _) = run_code(&debug_exit(0), &[], 4, Duration::from_secs(20));
    assert_eq!(exit, VmExit::DebugExit { status: 0 });
}

#[test]
fn ap_started_by_init_and_sipi_runs_its_real_mode_trampoline() {
    let mut code = Vec::new();
    let mut lapic_write = |offset: u32, value: u32| {
        // mov dword [0xfee00000 + offset], value
        code.extend_from_slice(&[0xc7, 0x05]);
        code.extend_from_slice(&(0xfee0_0000u32 + offset).to_le_bytes());
        code.extend_from_slice(&value.to_le_bytes());
    };
    lapic_write(0xf0, 0x1ff); // SVR: enable the LAPIC
    lapic_write(0x310, 1 << 24); // ICR high: APIC ID 1
    lapic_write(0x300, 0x4500); // INIT
    lapic_write(0x300, 0x4600 | (0x8000 >> 12)); // SIPI to 0x8000
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
                                           // The AP's trampoline (real mode): mov al, 0x42; out 0xf4, al; hlt
    let (exit, _) = run_code_with(&code, &[(0x8000, &[0xb0, 0x42, 0xe6, 0xf4, 0xf4])], 2, Duration::from_secs(30));
    assert_eq!(exit, VmExit::DebugExit { status: 0x42 });
}

/// Reads MSR `index` of `vcpu` as the host sees it.
fn read_msr(vcpu: &Vcpu, index: u32) -> u64 {
    let mut msrs =
        kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry { index, ..Default::default() }]).unwrap();
    assert_eq!(vcpu.fd().get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

#[test]
fn a_vcpu_state_moves_to_a_fresh_vm_and_its_tsc_does_not_go_back() {
    use crate::persist::Persist;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    let kvm = Kvm::open().unwrap();
    let ram = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
    let vm = Vm::new(&kvm, &ram).unwrap();
    let cpuid = kvm.supported_cpuid().unwrap();
    let vcpu = Vcpu::new(&vm, &cpuid, 0, 1).unwrap();
    let entry = crate::boot::pvh::configure(&ram, CODE_GPA).unwrap();
    vcpu.set_entry(&entry).unwrap();
    let mut regs = vcpu.fd().get_regs().unwrap();
    regs.rax = 0x1234_5678_9abc_def0;
    regs.r15 = 42;
    vcpu.fd().set_regs(&regs).unwrap();
    let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_SYSENTER_CS,
        data: 0x10,
        ..Default::default()
    }])
    .unwrap();
    vcpu.fd().set_msrs(&msrs).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let saved = vcpu.save().unwrap();
    let saved_tsc = saved.msrs.iter().find(|m| m.0 == MSR_IA32_TSC).expect("the TSC is saved").1;
    assert!(saved.msrs.len() > 10, "{saved:?}");
    // Through serde, as a snapshot carries it.
    let json = serde_json::to_vec(&saved).unwrap();
    let carried: crate::vstate::VcpuState = serde_json::from_slice(&json).unwrap();

    let ram2 = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
    let vm2 = Vm::new(&kvm, &ram2).unwrap();
    let mut fresh = Vcpu::new(&vm2, &cpuid, 0, 1).unwrap();
    assert_ne!(fresh.fd().get_regs().unwrap().rax, regs.rax);
    fresh.restore(&carried).unwrap();
    let restored = fresh.fd().get_regs().unwrap();
    assert_eq!((restored.rax, restored.r15, restored.rip), (regs.rax, regs.r15, regs.rip));
    assert_eq!(fresh.fd().get_sregs().unwrap().cr0, vcpu.fd().get_sregs().unwrap().cr0);
    assert_eq!(read_msr(&fresh, MSR_IA32_SYSENTER_CS), 0x10);
    assert!(read_msr(&fresh, MSR_IA32_TSC) >= saved_tsc, "the restored TSC went back");
    // A state of another vCPU is refused.
    let other = Vcpu::new(&vm2, &cpuid, 1, 2).unwrap();
    let mut other = other;
    assert!(other.restore(&carried).unwrap_err().to_string().contains("state is of vCPU 0"));
}

#[test]
fn the_vm_irqchip_and_pit_state_moves_to_a_fresh_vm() {
    use crate::persist::Persist;
    let kvm = Kvm::open().unwrap();
    let ram = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
    let vm = Vm::new(&kvm, &ram).unwrap();
    let mut pit = vm.fd().get_pit2().unwrap();
    pit.channels[0].count = 0x1234;
    pit.channels[0].mode = 2;
    vm.fd().set_pit2(&pit).unwrap();
    let saved = vm.save().unwrap();
    let json = serde_json::to_vec(&saved).unwrap();
    let carried: crate::vstate::VmState = serde_json::from_slice(&json).unwrap();
    let ram2 = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
    let mut vm2 = Vm::new(&kvm, &ram2).unwrap();
    assert_ne!(vm2.fd().get_pit2().unwrap().channels[0].count, 0x1234);
    vm2.restore(&carried).unwrap();
    let restored = vm2.fd().get_pit2().unwrap();
    assert_eq!((restored.channels[0].count, restored.channels[0].mode), (0x1234, 2));
    assert!(vm2.fd().get_clock().unwrap().clock >= saved.clock.clock);
}

/// Runs a guest that writes one dword into each of `pages` pages from 4 MiB on a VM
/// whose dirty logging is on (through the ring of `ring` entries, or the log), and
/// returns the pages the tracker harvested (indices in the slot) and the ring's counts.
/// With `exits`, the guest also writes port 0x80 after each page (an exit to the VMM:
/// KVM looks at its requests, a full ring among them, before it enters again).
fn dirty_pages_written(
    pages: u32,
    ring: Option<u32>,
    exits: bool,
) -> (Vec<u64>, Option<super::dirty_ring::DirtyRingCounts>) {
    let kvm = Kvm::open().unwrap();
    let ram = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
    let mut vm = Vm::create(&kvm, &ram).unwrap();
    if let Some(entries) = ring {
        vm.enable_dirty_ring(entries).unwrap();
    }
    vm.create_pit().unwrap();
    let memory = vm.register_memory(&ram).unwrap();
    vm.adopt_memory(memory);
    vm.enable_dirty_log().unwrap();
    assert_eq!(vm.dirty_tracker(), if ring.is_some() { "ring" } else { "log" });
    // mov edi, 0x400000; mov ecx, pages; l: mov [edi], ecx; (out 0x80, al;)
    // add edi, 0x1000; dec ecx; jnz l
    let mut code = vec![0xbf, 0x00, 0x00, 0x40, 0x00, 0xb9];
    code.extend_from_slice(&pages.to_le_bytes());
    code.extend_from_slice(&[0x89, 0x0f]);
    if exits {
        code.extend_from_slice(&[0xe6, 0x80]);
    }
    code.extend_from_slice(&[0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x49, 0x75, if exits { 0xf3 } else { 0xf5 }]);
    code.extend(debug_exit(0));
    ram.memory().write_slice(&code, GuestAddress(CODE_GPA)).unwrap();
    let entry = crate::boot::pvh::configure(&ram, CODE_GPA).unwrap();
    let cpuid = kvm.supported_cpuid().unwrap();
    let vcpu = Vcpu::new(&vm, &cpuid, 0, 1).unwrap();
    vcpu.set_entry(&entry).unwrap();
    let mut bus = PioBus::new();
    bus.insert(0xf4, 4, Arc::new(Mutex::new(DebugExit))).unwrap();
    let control = Arc::new(VmControl::new().unwrap());
    let buses = Arc::new(DeviceBuses::new(bus, MmioBus::new()));
    let exit = run_vcpus(vec![vcpu], buses, ram.memory(), &control, Some(Duration::from_secs(60)), Vec::new()).unwrap();
    assert_eq!(exit, VmExit::DebugExit { status: 0 });
    let taken = vm.take_dirty_pages(0).unwrap();
    assert!(vm.take_dirty_pages(0).unwrap().iter().all(|p| !taken.contains(p)), "a second harvest repeats pages");
    (taken, vm.dirty_rings().map(|r| r.counts()))
}

/// The pages of `written` missing from `taken`.
fn missing(pages: u32, taken: &[u64]) -> Vec<u64> {
    (0..u64::from(pages)).map(|i| (4 << 20) / 4096 + i).filter(|p| !taken.contains(p)).collect()
}

#[test]
fn the_dirty_ring_and_the_log_harvest_the_same_pages_and_a_full_ring_loses_none() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let pages = 1000u32;
    let (by_log, _) = dirty_pages_written(pages, None, true);
    // The smallest ring holds far fewer than 1000 entries: the vCPU exits with
    // KVM_EXIT_DIRTY_RING_FULL, its thread collects the rings and it goes on.
    let (by_ring, counts) = dirty_pages_written(pages, Some(super::dirty_ring::MIN_ENTRIES), true);
    for (name, taken) in [("log", &by_log), ("ring", &by_ring)] {
        let lost = missing(pages, taken);
        assert!(lost.is_empty(), "the {name} lost {} of {pages} written pages: {lost:?}", lost.len());
    }
    let counts = counts.unwrap();
    assert!(counts.full_exits > 0, "{counts:?}");
    assert!(counts.harvested >= u64::from(pages), "{counts:?}");
    assert_eq!(counts.overflows, 0, "{counts:?}");
}

#[test]
fn a_ring_overrun_by_kvm_is_counted_and_the_vcpu_runs_on() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    // Without exits, a KVM that emulates this code (no EPT) may push the whole run
    // without a full exit: the ring is overrun. The vCPU must still finish (the ring
    // resynchronized), and pages may be missing only if the overrun was counted.
    let pages = 1000u32;
    let (taken, counts) = dirty_pages_written(pages, Some(super::dirty_ring::MIN_ENTRIES), false);
    let counts = counts.unwrap();
    let lost = missing(pages, &taken);
    assert!(
        lost.is_empty() || counts.overflows > 0,
        "{} pages lost without an overflow counted: {counts:?}",
        lost.len()
    );
    eprintln!("{counts:?}, {} of {pages} pages not harvested", lost.len());
}
