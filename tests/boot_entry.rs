//! How the built-in guest is entered and what it reaches: the direct 64-bit entry (the
//! default) and PVH (the same ELF given as `--kernel`, as other VMMs boot it) both zero
//! the image's `.bss` on memory that already holds data, and both cover RAM above 4 GiB.
//!
//! Big guests are checked with a sampled region (`fl.region_stride`): the first and last
//! page of every RAM range and every 4096th page between, filled and verified. That
//! proves every range (below the MMIO hole, above 4 GiB, every zone) is reached and holds
//! its data, without writing 6 GiB on a shared CI machine.

mod common;
use common::*;

const STRIDE: u64 = 4096;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Pages of the sampled region over RAM spans `[start, end)` (bytes).
fn sampled_pages(spans: &[(u64, u64)]) -> u64 {
    spans
        .iter()
        .map(|&(start, end)| {
            let pages = (end - start) / 4096;
            pages.div_ceil(STRIDE) + u64::from((pages - 1) % STRIDE != 0)
        })
        .sum()
}

fn stride_arg() -> String {
    format!("fl.region_stride={STRIDE}")
}

fn verified_pages(run: &RunOutcome) -> u64 {
    run.assert_success();
    let verifies = run.verifies();
    assert_eq!(verifies.len(), 1, "{}", run.stdout);
    assert_eq!(verifies[0]["ok"], true, "{}", verifies[0]);
    verifies[0]["pages"].as_u64().unwrap()
}

#[test]
fn a_file_zone_that_already_holds_data_boots_and_verifies() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("dirty-file-zone");
    let image = guest_image_in(&dir.0);
    let path = dir.0.join("guest-ram");
    // An old image: every byte non-zero, .bss, page tables and stacks of the guest included.
    std::fs::write(&path, vec![0xa5u8; 32 << 20]).unwrap();
    let spec = format!("size=32M,backend=file,path={},reuse=on", path.display());
    let direct = run_json(&["--vcpus", "2", "--memory", &spec]);
    direct.assert_success().assert_verified(pages(24));
    std::fs::write(&path, vec![0x5au8; 32 << 20]).unwrap();
    let pvh = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        &spec,
        "--kernel",
        image.to_str().unwrap(),
        "--cmdline",
        "fl.cpus=2 fl.steps=fill,verify",
    ]);
    pvh.assert_success().assert_verified(pages(24));
}

#[test]
fn a_6_gib_guest_verifies_ram_above_4_gib_by_either_entry() {
    if !kvm_available() {
        return;
    }
    // One 6 GiB zone: RAM [0, 3 GiB) and [4 GiB, 7 GiB); the region starts at 8 MiB.
    let expected = sampled_pages(&[(8 * MIB, 3 * GIB), (4 * GIB, 7 * GIB)]);
    let direct = run_json(&["--vcpus", "2", "--memory", "size=6G", "--cmdline", &stride_arg()]);
    assert_eq!(verified_pages(&direct), expected, "{}", direct.stdout);
    assert_eq!(direct.report["guest"]["ready"]["ram_bytes"], 6 * GIB);

    let dir = ScratchDir::new("pvh-6g");
    let image = guest_image_in(&dir.0);
    let cmdline = format!("fl.cpus=2 fl.steps=fill,verify {}", stride_arg());
    let pvh =
        run_json(&["--vcpus", "2", "--memory", "size=6G", "--kernel", image.to_str().unwrap(), "--cmdline", &cmdline]);
    assert_eq!(verified_pages(&pvh), expected, "{}", pvh.stdout);
}

#[test]
fn two_2_gib_zones_verify_the_part_above_4_gib() {
    if !kvm_available() {
        return;
    }
    // Zone 1 [0, 2 GiB), zone 2 [2, 3 GiB) and [4, 5 GiB): the memory map merges the
    // adjacent part below the hole.
    let expected = sampled_pages(&[(8 * MIB, 3 * GIB), (4 * GIB, 5 * GIB)]);
    let run = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "size=2G,backend=anon",
        "--memory",
        "size=2G,backend=memfd",
        "--cmdline",
        &stride_arg(),
    ]);
    assert_eq!(verified_pages(&run), expected, "{}", run.stdout);
}

#[test]
fn size_past_the_mmio_hole_is_accepted() {
    if !kvm_available() {
        return;
    }
    // --size 5G of a 6 GiB guest: all RAM below the hole and 5 GiB - (3 GiB - 8 MiB) above.
    let above = 5 * GIB - (3 * GIB - 8 * MIB);
    let expected = sampled_pages(&[(8 * MIB, 3 * GIB), (4 * GIB, 4 * GIB + above)]);
    let run = run_json(&["--vcpus", "1", "--memory", "size=6G", "--size", "5G", "--cmdline", &stride_arg()]);
    assert_eq!(verified_pages(&run), expected, "{}", run.stdout);
}

#[test]
fn an_elf_that_is_no_kernel_is_refused_naming_why() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&["--kernel", "/bin/sh"]);
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(run.stderr.contains("cannot boot /bin/sh: it is a "), "{}", run.stderr);
    assert!(run.stderr.contains("not a kernel"), "{}", run.stderr);
}
