//! The CPUID a vCPU sees: what KVM supports, with this vCPU's APIC ID and the VM's
//! topology (one thread per core, one package).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bit 31, "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, "more than one logical processor per package".
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Smallest `n` with `2^n >= count`.
fn ceil_log2(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Adjusts one CPUID entry for the vCPU with `apic_id` in a VM of `vcpu_count` vCPUs.
pub fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, vcpu_count: u32) {
    match entry.function {
        1 => {
            // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((vcpu_count & 0xff) << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if vcpu_count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1
        // (EAX[4:0] = 0 marks the end of the cache list).
        4 if entry.eax & 0x1f != 0 => {
            let cores = vcpu_count.saturating_sub(1) & 0x3f;
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { vcpu_count.saturating_sub(1) & 0xfff } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | (cores << 26);
        }
        0xb | 0x1f => {
            // Extended topology: level 0 is SMT (1 thread per core), level 1 is core.
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = ceil_log2(vcpu_count);
                    entry.ebx = vcpu_count;
                    entry.ecx = (2 << 8) | 1;
                }
                index => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = index;
                }
            }
        }
        _ => {}
    }
}

/// The CPUID for the vCPU with `apic_id`, from KVM's supported CPUID.
pub fn for_vcpu(supported: &CpuId, apic_id: u32, vcpu_count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, apic_id, vcpu_count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0001_0800, edx: 0xffff_ffff, ..Default::default() }
    }

    #[test]
    fn leaf_1_carries_the_apic_id_and_count() {
        let mut e = entry(1, 0);
        patch_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800, "CLFLUSH size is kept");
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        patch_entry(&mut e, 0, 1);
        assert_eq!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_carries_the_x2apic_id_and_topology() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        patch_entry(&mut smt, 5, 6);
        patch_entry(&mut core, 5, 6);
        assert_eq!((smt.edx, core.edx), (5, 5));
        assert_eq!((smt.ebx, core.ebx), (1, 6));
        assert_eq!(core.eax, 3, "6 vCPUs need 3 bits of APIC ID");
        assert_eq!(core.ecx, 0x201);
    }

    #[test]
    fn each_vcpu_gets_its_own_copy() {
        let supported = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0)]).unwrap();
        let a = for_vcpu(&supported, 0, 2);
        let b = for_vcpu(&supported, 1, 2);
        assert_eq!(a.as_slice()[0].ebx >> 24, 0);
        assert_eq!(b.as_slice()[0].ebx >> 24, 1);
        assert_eq!(b.as_slice()[1].edx, 1);
    }
}
