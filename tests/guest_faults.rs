//! A guest that breaks ends the run cleanly with a message that says what happened,
//! never a hang.

mod common;
use common::*;

#[test]
fn triple_fault_ends_the_run_with_its_rip() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&["--vcpus", "2", "--memory", "size=32M", "--steps", "triple-fault"]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.report["exit"]["kind"], "triple-fault", "{}", run.stdout);
    assert!(run.report["exit"]["rip"].as_u64().is_some());
}

/// On this platform's nested KVM (kvm_pvm) guest ring-0 code is emulated and the
/// emulator cannot run SSE: the VM must stop with an internal error naming rip and the
/// instruction bytes. Where ring 0 runs natively the step simply succeeds.
#[test]
fn emulation_failure_names_rip_and_instruction_bytes() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&["--vcpus", "1", "--memory", "size=32M", "--steps", "cpl0-sse"]);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
        let exit = &run.report["exit"];
        assert_eq!(exit["kind"], "internal-error", "{}", run.stdout);
        assert!(exit["rip"].as_u64().unwrap() >= faultline_abi::KERNEL_GPA, "{exit}");
        // pxor xmm0, xmm0 = 66 0f ef c0
        let bytes = exit["instruction_bytes"].as_str().unwrap().to_lowercase();
        assert!(bytes.replace(' ', "").contains("660fefc0"), "{exit}");
        let human =
            faultline().args(["run", "--vcpus", "1", "--memory", "size=32M", "--steps", "cpl0-sse"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&human.stderr);
        assert!(stderr.contains("emulation failure") && stderr.contains("rip"), "{stderr}");
    } else {
        run.assert_success();
    }
}

#[test]
fn timeout_stops_a_guest_that_never_ends() {
    if !kvm_available() {
        return;
    }
    let output = faultline()
        .args([
            "run",
            "--json",
            "--vcpus",
            "2",
            "--memory",
            "size=32M",
            "--steps",
            "idle",
            "--duration-ms",
            "600000",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    let run = outcome(output);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.report["exit"]["kind"], "stopped", "{}", run.stdout);
}
