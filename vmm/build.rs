//! Builds the tiny guest (`guest-image/`) so that `cargo build` and `cargo test` from the
//! workspace root need no manual step.
//!
//! The guest is a `#![no_std]` ELF built for the *host* target (no bare-metal target or
//! rust-src is installed) and linked by its own linker script. Those link flags and
//! `panic=abort` must not reach the rest of the workspace, so the guest is built by a
//! nested `cargo build` with its own target directory and its own RUSTFLAGS. The path of
//! the resulting ELF is handed to the VMM as `FAULTLINE_GUEST_ELF` and embedded in the
//! binary (the "built-in guest").
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest_dir = manifest_dir.join("../guest-image").canonicalize().unwrap();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("guest-target");
    let host = "x86_64-unknown-linux-gnu";
    let linker_script = guest_dir.join("link.ld");

    println!("cargo:rerun-if-changed={}", guest_dir.join("src").display());
    println!("cargo:rerun-if-changed={}", guest_dir.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", linker_script.display());

    // Ring-3 workload code may use SSE (the guest's ring 0 enables it); ring-0 code is
    // hand-written assembly. relocation-model=static + -no-pie: the image is linked at
    // its load address. Frame pointers make exception reports easier to read.
    let flags = [
        "-Cpanic=abort".to_string(),
        "-Crelocation-model=static".to_string(),
        "-Ccode-model=small".to_string(),
        "-Cforce-frame-pointers=yes".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        "-Clink-arg=-no-pie".to_string(),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        format!("-Clink-arg=-T{}", linker_script.display()),
    ];
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&guest_dir)
        .args(["build", "--release", "--bin", "faultline-guest", "--features", "guest-bin"])
        .args(["--target", host])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    // The outer build's flags and wrappers are for the host tools, not for the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_BUILD_TARGET",
        "CARGO_LLVM_COV",
        "RUSTC_WRAPPER",
    ] {
        command.env_remove(var);
    }
    let status = command.status().expect("cannot run cargo to build the guest image");
    if !status.success() {
        panic!("building the guest image (guest-image/) failed: see the errors above");
    }
    let elf = target_dir.join(host).join("release").join("faultline-guest");
    // The binary embeds the guest without its debug info (three quarters of the file):
    // less for every run to map. The full ELF stays in
    // OUT_DIR/guest-target/ for addr2line and gdb.
    let stripped = out_dir.join("faultline-guest.stripped");
    let objcopy = Command::new("objcopy").arg("--strip-debug").arg(&elf).arg(&stripped).status();
    let embedded = match objcopy {
        Ok(status) if status.success() => stripped,
        _ => {
            println!("cargo:warning=objcopy --strip-debug failed; embedding the guest with its debug info");
            elf.clone()
        }
    };
    println!("cargo:rustc-env=FAULTLINE_GUEST_ELF={}", embedded.display());
    order_release_code(&manifest_dir);
}

/// Release binaries are linked by gold with the code a run executes placed together
/// (`link/section-order.txt`, made by `scripts/trace-functions.py`; see
/// docs/bench-boot.md). The kernel maps a binary's code 64 KiB around each page fault, so
/// code spread over the whole `.text` costs RSS for code that never runs. GNU ld 2.40
/// has no section ordering; gold has. Without gold the link is the default one, with a
/// warning.
fn order_release_code(manifest_dir: &std::path::Path) {
    let order = manifest_dir.join("link/section-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    if env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let gold = Command::new("ld.gold").arg("--version").output().is_ok_and(|o| o.status.success());
    if !gold {
        println!(
            "cargo:warning=ld.gold not found: the release binary is linked without its code ordering (a larger RSS)"
        );
        return;
    }
    println!("cargo:rustc-link-arg-bins=-fuse-ld=gold");
    println!("cargo:rustc-link-arg-bins=-Wl,--section-ordering-file={}", order.display());
}
