//! The tiny Faultline guest: a PVH-bootable x86-64 kernel that runs memory workloads.
//!
//! Ring 0 ([`boot`]) is a few dozen assembly instructions: page tables, GDT/TSS/IDT, and
//! an `iretq` to ring 3, where everything else runs in Rust (natively, even on a nested
//! KVM that emulates CPL0). The BSP ([`bsp_main`]) copies the boot information, parses the
//! command line, finds the workload region, starts the APs ([`smp`]), prints the ready
//! line and runs the steps ([`workloads`]) together with the APs; then it prints the done
//! line and writes the exit status to the debug-exit port.
#![no_std]
#![no_main]

#[macro_use]
mod serial;
mod balloon;
mod balloon_step;
mod boot;
mod cmdline;
mod histogram;
mod mem;
mod pvh;
mod region;
mod smp;
mod stall;
mod step_context;
mod tsc;
mod virtio_mmio;
mod workloads;

use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{fence, AtomicBool, Ordering};

use faultline_abi::{report, ExitStatus, DEBUG_EXIT_PORT, MAX_CPUS, REPORT_PREFIX};

use cmdline::Config;
use region::Region;
use serial::{JsonEscaped, Serial};
use workloads::Context;

/// Where ring 0 drops every CPU: `cpu` is its LAPIC ID.
#[no_mangle]
extern "C" fn ring3_entry(cpu: u64) -> ! {
    if cpu == 0 {
        bsp_main()
    } else {
        ap_main(cpu as u32)
    }
}

/// Prints an `FL error` line.
pub(crate) fn error(message: impl core::fmt::Display) {
    report!(report::ERROR, "{{\"msg\":\"{}\"}}", JsonEscaped(message));
}

fn bsp_main() -> ! {
    // `.bss` is not cleared here: zeroing p_memsz past p_filesz is the ELF loader's job
    // (Faultline's and QEMU's do it), and clearing it again would touch every page of it
    // (the per-CPU results alone are about 1 MiB) for nothing.
    boot::install_idt();
    serial::init();
    tsc::init();
    let info = pvh::copy_boot_info(boot::start_info_gpa()).unwrap_or_else(|message| {
        error(message);
        exit(ExitStatus::BadCommandLine)
    });
    let config = Config::parse(info.cmdline).unwrap_or_else(|bad| {
        error(bad);
        exit(ExitStatus::BadCommandLine)
    });
    let (tsc_khz, source) = match config.tsc_khz {
        Some(khz) => (khz, tsc::Source::CommandLine),
        None => tsc::khz_from_cpuid(),
    };
    if source == tsc::Source::Unknown {
        note!(
            "TSC frequency unknown (no fl.tsc_khz, CPUID 0x15/0x16/0x40000010): tsc_khz 0, pacing at {} kHz",
            tsc::FALLBACK_TSC_KHZ
        );
    }
    let mapped = boot::extend_identity_map(info.memmap);
    let region = Region::from_memmap(info.memmap, mapped, config.size_bytes, config.region_stride_pages)
        .unwrap_or_else(|e| {
            error(e);
            exit(ExitStatus::BadCommandLine)
        });
    workloads::set_context(Context { config, region, tsc_khz, cmdline: info.cmdline });
    fence(Ordering::SeqCst);
    if let Err(online) = smp::start_aps(config.cpus, tsc_khz) {
        error(format_args!(
            "only {online} of {} application processors started within {} ms (is -smp/--cpus at least fl.cpus={}?)",
            config.cpus - 1,
            smp::AP_START_TIMEOUT_MS,
            config.cpus
        ));
        exit(ExitStatus::ApStartFailed);
    }
    print_ready(&config, &region, tsc_khz);
    let status = workloads::run_steps(0);
    exit(status)
}

fn print_ready(config: &Config, region: &Region, tsc_khz: u64) {
    let mut out = Serial::lock();
    let _ = write!(
        out,
        "{REPORT_PREFIX}{} {{\"cpus\":{},\"ram_bytes\":{},\"region_bytes\":{},\"region_pages\":{},\"tsc_khz\":{},\"steps\":\"",
        report::READY,
        config.cpus,
        region.ram_bytes,
        region.pages * faultline_abi::PAGE_SIZE,
        region.pages,
        tsc_khz
    );
    for (i, step) in config.steps().iter().enumerate() {
        let _ = write!(out, "{}{}", if i == 0 { "" } else { "," }, step.name());
    }
    let _ = out.write_str("\"}\n");
}

fn ap_main(cpu: u32) -> ! {
    let context = workloads::context();
    if cpu >= context.config.cpus || cpu as usize >= MAX_CPUS {
        boot::park();
    }
    smp::AP_ONLINE.fetch_add(1, Ordering::AcqRel);
    workloads::run_steps(cpu);
    boot::park()
}

/// Prints the done line, writes `status` to the debug-exit port and stops this CPU.
fn exit(status: ExitStatus) -> ! {
    {
        let mut out = Serial::lock_or_steal();
        let _ = writeln!(
            out,
            "{REPORT_PREFIX}{} {{\"status\":{},\"name\":\"{}\"}}",
            report::DONE,
            status as u8,
            status.name()
        );
    }
    serial::outb(DEBUG_EXIT_PORT, status as u8);
    boot::park()
}

/// Called (in ring 3, on a fresh stack) by the ring-0 exception stub.
#[no_mangle]
extern "C" fn exception_report(vector: u64, error_code: u64, rip: u64, cpu: u64) -> ! {
    static REPORTING: AtomicBool = AtomicBool::new(false);
    if REPORTING.swap(true, Ordering::AcqRel) {
        boot::park(); // another CPU (or a fault while reporting) is already on it
    }
    {
        let mut out = Serial::lock_or_steal();
        let _ = writeln!(
            out,
            "{REPORT_PREFIX}{} {{\"vector\":{vector},\"error_code\":{error_code},\"rip\":{rip},\"cpu\":{cpu}}}",
            report::EXCEPTION
        );
    }
    exit(ExitStatus::Exception)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    {
        let mut out = Serial::lock_or_steal();
        let _ = writeln!(out, "{REPORT_PREFIX}{} {{\"msg\":\"{}\"}}", report::ERROR, JsonEscaped(info));
    }
    exit(ExitStatus::Panic)
}
