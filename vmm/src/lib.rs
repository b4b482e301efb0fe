//! Faultline: a minimal KVM virtual machine monitor for experiments on guest memory.
//!
//! Layers (see ARCHITECTURE.md): `config` (what the user asked for) → `memory` (guest RAM
//! and its backends) → `smmu` (page state, invalidation, demand paging) → `vstate` (KVM
//! VM and vCPUs) → `devices` → experiments (`run`, `bench`). Data flows down, events up.
#![deny(missing_docs)]

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod devices;
pub mod exit;
pub mod experiments;
pub mod guest_report;
pub mod host;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod paging;
pub mod persist;
pub mod report;
pub mod smmu;
pub mod snapshot;
pub mod stop_signals;
pub mod trace;
pub mod vm_target;
pub mod vmm;
pub mod vstate;

/// The built-in tiny guest (guest-image/), embedded at build time.
pub static BUILTIN_GUEST_ELF: &[u8] = include_bytes!(env!("FAULTLINE_GUEST_ELF"));
