//! The whole path on the real KVM: a tiny guest (32-bit code at the PVH entry state)
//! plays a driver script of MMIO writes — negotiate, set up the inflate queue, DRIVER_OK,
//! notify — and exits with the Status register it reads back. Its vCPU's MMIO exits go
//! through the bus to the transport, the balloon discards the pages, and the interrupt
//! goes to the in-kernel IOAPIC through the irqfd. The same script with the QueueNotify
//! write taken by KVM's ioeventfds proves the notifier thread's path.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::balloon::BalloonConfig;
use super::notify::QueueNotifier;
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

/// What [`inflate_through_kvm`] saw: the Status the guest read back, the used ring's index
/// once the device was done (or the wait gave up), notifications the notifier thread
/// served, the pages and which were ballooned.
struct Outcome {
    exit: VmExit,
    used_idx: u16,
    served: u64,
    rig: Rig,
    pages: Vec<u64>,
    ballooned: [u64; 3],
}

#[test]
fn a_guest_inflates_the_balloon_through_real_mmio_exits() {
    let o = inflate_through_kvm(false);
    o.check_inflated();
    assert_eq!(o.served, 0);
}

#[test]
fn queue_notifications_through_ioeventfds_reach_the_notifier_thread() {
    // KVM signals the eventfd registered for the written queue index, the notifier thread
    // serves it. (This guest writes from CPL0, where this host's KVM also exits to the
    // bus: see `notify`; the built-in guest at CPL3 is served by the thread alone.)
    let o = inflate_through_kvm(true);
    o.check_inflated();
    assert!(o.served >= 1, "the notifier thread never saw the QueueNotify write");
}

impl Outcome {
    fn check_inflated(&self) {
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        let rig = &self.rig;
        assert_eq!(self.exit, VmExit::DebugExit { status: ok as u8 }, "{:?}", rig.balloon.counters().last_error);
        assert_eq!(self.used_idx, 1);
        for &p in &self.pages {
            assert_eq!(rig.page_is_zero(p), self.ballooned.contains(&p), "page {p:#x}");
        }
        assert_eq!(rig.balloon.counters().inflated_pages, 3);
        assert!(rig.interrupt.raised_count() >= 1);
    }
}

/// A guest that sets up the inflate queue, posts three PFNs and notifies; the device's
/// answer is awaited after the guest exits (the notifier may still be working then).
fn inflate_through_kvm(ioeventfd: bool) -> Outcome {
    let mut rig = Rig::new(16 << 20, Backend::Anon, BalloonConfig::default());
    let kvm = Kvm::open().unwrap();
    let vm = Vm::new(&kvm, &rig.ram).unwrap();
    vm.register_irqfd(rig.interrupt.event(), 5).unwrap();
    let mut register = |event: &vmm_sys_util::eventfd::EventFd, addr: u64, queue: u32| {
        vm.fd().register_ioevent(event, &kvm_ioctls::IoEventAddress::Mmio(addr), queue).map_err(|e| e.to_string())
    };
    let notify_addr = BASE + reg::QUEUE_NOTIFY;
    let notifier = ioeventfd.then(|| QueueNotifier::start(rig.transport.clone(), notify_addr, &mut register).unwrap());

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
    // The notifier works on its own thread: give it a moment to finish (a bound, not a
    // figure: the result is checked, not the time).
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = |n: &Option<QueueNotifier>| q.used_idx(rig.mem()) == 1 && n.as_ref().is_none_or(|n| n.served() > 0);
    while !done(&notifier) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let served = notifier.as_ref().map_or(0, QueueNotifier::served);
    drop(notifier);
    drop(buses);
    drop(vm);
    let used_idx = q.used_idx(rig.mem());
    Outcome { exit, used_idx, served, rig, pages, ballooned }
}
