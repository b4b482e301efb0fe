//! Hand-made hostile guests (a few instructions each, booted by PVH on the real /dev/kvm):
//! what they do must end in a bounded report or a clear exit, never in a VMM that grows or
//! runs without bound unasked.

mod common;
use common::*;

use faultline::boot::test_elf;

/// Writes a PVH kernel of `code` into `dir` and returns its path.
fn kernel(dir: &ScratchDir, name: &str, code: &[u8]) -> String {
    let path = dir.0.join(name);
    std::fs::write(&path, test_elf::elf(code, true)).unwrap();
    path.display().to_string()
}

/// A kernel that prints `line` `times` times on COM1, then exits with status 0.
fn chatty_kernel(line: &[u8], times: u32) -> Vec<u8> {
    let data = (test_elf::TEST_KERNEL_GPA + 0x100) as u32;
    let mut code = vec![0xb9]; // mov ecx, times
    code.extend_from_slice(&times.to_le_bytes());
    code.push(0xbe); // outer: mov esi, data
    code.extend_from_slice(&data.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
                                                       // inner: lodsb; test al, al; jz next; out dx, al; jmp inner
    code.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
    code.extend_from_slice(&[0xe2, 0xed]); // next: loop outer
    code.extend_from_slice(&[0xb0, 0x00, 0xe6, 0xf4, 0xf4]); // mov al, 0; out 0xf4, al; hlt
    code.resize(0x100, 0x90);
    code.extend_from_slice(line);
    code.push(0);
    code
}

#[test]
fn a_chatty_guest_gets_a_bounded_report_that_counts_what_was_dropped() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("chatty");
    let lines = 3000u64;
    let image = kernel(&dir, "chatty.elf", &chatty_kernel(b"FL result {\"step\":\"chatty\",\"pages\":1}\n", 3000));
    let run = run_json(&["--kernel", &image, "--memory", "size=16M"]);
    assert_eq!(run.report["exit"]["kind"], "debug-exit", "{}\n{}", run.stdout, run.stderr);
    let kept = run.report["guest"]["results"].as_array().unwrap().len() as u64;
    let dropped = run.report["guest"]["dropped_lines"].as_u64().unwrap_or(0);
    assert_eq!(kept, faultline::guest_report::MAX_LINES_PER_KIND as u64, "{}", run.stderr);
    assert_eq!(kept + dropped, lines);
}

#[test]
fn step_times_of_a_kernel_without_a_tsc_frequency_are_cycles_never_nan() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("no-tsc");
    let line = b"FL result {\"step\":\"mine\",\"pass\":1,\"pages\":7,\"cycles\":123456}\n";
    let image = kernel(&dir, "no-tsc.elf", &chatty_kernel(line, 1));
    let out =
        faultline().args(["run", "--timeout", "60", "--kernel", &image, "--memory", "size=16M"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("NaN"), "{stdout}");
    assert!(stdout.contains("mine pass 1: 7 pages in 123456 TSC cycles (slowest vCPU)"), "{stdout}");
    assert!(stdout.contains("ms wall"), "{stdout}");
}

#[test]
fn step_results_carry_the_host_wall_time_beside_the_guests_own() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&["--vcpus", "4", "--memory", "size=64M"]);
    run.assert_success();
    let tsc_khz = run.report["guest"]["ready"]["tsc_khz"].as_u64().unwrap();
    let results = run.report["guest"]["results"].as_array().unwrap();
    assert!(!results.is_empty());
    for result in results {
        let guest_ns = result["cycles"].as_u64().unwrap() * 1_000_000 / tsc_khz;
        let wall_ns = result["host_wall_ns"].as_u64().unwrap_or(0);
        // The host's clock from the previous report line spans the whole step, so it is
        // never shorter than the slowest vCPU's own start-to-end time.
        assert!(wall_ns >= guest_ns, "wall {wall_ns} ns < guest {guest_ns} ns: {result}");
    }
}

#[test]
fn a_guest_halted_with_interrupts_off_is_bounded_by_the_timeout_the_help_names() {
    if !kvm_available() {
        return;
    }
    let help = faultline().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("halted with interrupts off") && help.contains("no limit by default"), "{help}");
    let dir = ScratchDir::new("cli-hlt");
    let image = kernel(&dir, "cli-hlt.elf", &[0xfa, 0xf4, 0xeb, 0xfc]); // cli; hlt; jmp back
    let out = faultline()
        .args(["run", "--json", "--timeout", "2", "--kernel", &image, "--memory", "size=16M"])
        .output()
        .unwrap();
    let run = outcome(out);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.report["exit"]["kind"], "stopped", "{}", run.stdout);
    assert!(run.report["exit"]["reason"].as_str().unwrap().contains("timeout"), "{}", run.stdout);
}
