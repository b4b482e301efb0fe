//! The built-in guest is a plain PVH ELF: QEMU boots the same file and the guest prints
//! its ready line and verifies its memory there too.

mod common;
use common::*;

#[test]
fn same_elf_boots_under_qemu_microvm() {
    if !kvm_available() {
        return;
    }
    let Some(qemu) = qemu() else { return };
    let dir = ScratchDir::new("qemu");
    let image = guest_image_in(&dir.0);
    for cpus in ["1", "2"] {
        let output = std::process::Command::new("timeout")
            .args(["60", qemu])
            .args(faultline::experiments::boot_bench::QEMU_MICROVM_ARGS)
            .args(["-smp", cpus, "-m", "128M", "-kernel"])
            .arg(&image)
            .args(["-append", &format!("fl.cpus={cpus} fl.steps=fill,verify")])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("FL ready {"), "no ready line under QEMU with {cpus} CPU(s):\n{stdout}");
        assert!(stdout.contains("FL verify {\"ok\":true"), "{stdout}");
        // isa-debug-exit: QEMU exits with (status << 1) | 1; status 0 is success.
        assert_eq!(output.status.code(), Some(1), "{stdout}");
    }
}
