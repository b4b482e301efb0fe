//! The whole path on the real KVM: a tiny guest (32-bit code at the PVH entry state)
//! plays a driver script of MMIO writes — negotiate, set up the inflate queue, DRIVER_OK,
//! notify — and exits with the Status register it reads back. Its vCPU's MMIO exits go
//! through the bus to the transport, the balloon discards the pages, and the interrupt
//! goes to the in-kernel IOAPIC through the irqfd.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::balloon::BalloonConfig;
use super::test_driver::{reg, Rig, VirtQueue, BASE};
use super::{status, VIRTIO_F_VERSION_1};
use crate::config::Backend;
use crate::devices::debug_exit::DebugExit;
use crate::devices::{DeviceBuses, PioBus};
use crate::exit::VmExit;
use crate::smmu::PAGE_4K;
use crate::vstate::runner::run_vcpus;
use crate::vstate::{Kvm, Vcpu, Vm, VmControl};

const CODE: u64 = 0x10_0000;
const SCRIPT: u64 = 0x20_0000;
const RINGS: u64 = 0x4_0000;
const PFNS: u64 = 0x5_0000;
const DATA: u64 = 0x40_0000;

/// `mov esi, SCRIPT; loop: lodsd; test eax, eax; jz done; mov ebx, eax; lodsd;
/// mov [ebx], eax; jmp loop; done: mov eax, [BASE + STATUS]; out 0xf4, al; hlt`
fn script_player() -> Vec<u8> {
    let mut code = vec![0xbe];
    code.extend_from_slice(&(SCRIPT as u32).to_le_bytes());
    code.extend_from_slice(&[0xad, 0x85, 0xc0, 0x74, 0x07, 0x89, 0xc3, 0xad, 0x89, 0x03, 0xeb, 0xf4]);
    code.push(0xa1);
    code.extend_from_slice(&((BASE + reg::STATUS) as u32).to_le_bytes());
    code.extend_from_slice(&[0xe6, 0xf4, 0xf4]);
    code
}

#[test]
fn a_guest_inflates_the_balloon_through_real_mmio_exits() {
    let mut rig = Rig::new(16 << 20, Backend::Anon, BalloonConfig::default());
    let kvm = Kvm::open().unwrap();
    let vm = Vm::new(&kvm, &rig.ram).unwrap();
    vm.register_irqfd(rig.interrupt.event(), 5).unwrap();

    let pages: Vec<u64> = (0..8).map(|i| DATA + i * PAGE_4K).collect();
    pages.iter().for_each(|&p| rig.fill_page(p));
    let ballooned = [pages[1], pages[2], pages[5]];
    let pfns: Vec<u8> = ballooned.iter().flat_map(|&p| ((p >> 12) as u32).to_le_bytes()).collect();
    rig.mem().write_slice(&pfns, GuestAddress(PFNS)).unwrap();
    let mut q = VirtQueue::new(0, RINGS, 8);
    q.add_chain(rig.mem(), &[(PFNS, pfns.len() as u32, false)]);

    let mut script: Vec<(u64, u32)> = vec![
        (reg::STATUS, status::ACKNOWLEDGE),
        (reg::STATUS, status::ACKNOWLEDGE | status::DRIVER),
        (reg::DRIVER_FEATURES_SEL, 1),
        (reg::DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32)),
        (reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        (reg::QUEUE_SEL, 0),
        (reg::QUEUE_NUM, 8),
    ];
    for (low, gpa) in [(reg::QUEUE_DESC_LOW, q.desc), (reg::QUEUE_DRIVER_LOW, q.avail), (reg::QUEUE_DEVICE_LOW, q.used)]
    {
        script.extend([(low, gpa as u32), (low + 4, 0)]);
    }
    script.extend([
        (reg::QUEUE_READY, 1),
        (reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK),
        (reg::QUEUE_NOTIFY, 0),
    ]);
    let mut bytes: Vec<u8> =
        script.iter().flat_map(|&(off, v)| [((BASE + off) as u32).to_le_bytes(), v.to_le_bytes()].concat()).collect();
    bytes.extend_from_slice(&0u32.to_le_bytes());
    rig.mem().write_slice(&bytes, GuestAddress(SCRIPT)).unwrap();
    rig.mem().write_slice(&script_player(), GuestAddress(CODE)).unwrap();

    let entry = crate::boot::pvh::configure(&rig.ram, CODE).unwrap();
    let vcpu = Vcpu::new(&vm, &kvm.supported_cpuid().unwrap(), 0, 1).unwrap();
    vcpu.set_entry(&entry).unwrap();
    let mut pio = PioBus::new();
    pio.insert(0xf4, 4, Arc::new(Mutex::new(DebugExit))).unwrap();
    let buses = Arc::new(DeviceBuses::new(pio, std::mem::take(&mut rig.bus)));
    let control = Arc::new(VmControl::new().unwrap());
    let exit =
        run_vcpus(vec![vcpu], buses.clone(), rig.ram.memory(), &control, Some(Duration::from_secs(30)), Vec::new())
            .unwrap();
    drop(buses);
    drop(vm);

    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    assert_eq!(exit, VmExit::DebugExit { status: ok as u8 }, "{:?}", rig.balloon.counters().last_error);
    assert_eq!(q.used_idx(rig.mem()), 1);
    for &p in &pages {
        assert_eq!(rig.page_is_zero(p), ballooned.contains(&p), "page {p:#x}");
    }
    assert_eq!(rig.balloon.counters().inflated_pages, 3);
    assert!(rig.interrupt.raised_count() >= 1);
}
