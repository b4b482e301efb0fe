//! Unit tests of the configuration: parsing, defaults, validation and the guest's
//! command line.

use super::*;

#[test]
fn zone_spec_parses_all_keys() {
    let zone = ZoneConfig::parse("size=1G,backend=hugetlb").unwrap();
    assert_eq!(zone, ZoneConfig::new(1 << 30, Backend::Hugetlb));
    let zone = ZoneConfig::parse("size=64M,backend=file,path=/tmp/x").unwrap();
    assert_eq!(zone.path.as_deref(), Some(std::path::Path::new("/tmp/x")));
    assert_eq!(ZoneConfig::parse("512M").unwrap().size_bytes, 512 << 20);
}

#[test]
fn zone_spec_errors_name_the_problem() {
    let err = ZoneConfig::parse("size=12Q").unwrap_err().to_string();
    assert!(err.contains("cannot parse size '12Q'"), "{err}");
    let err = ZoneConfig::parse("size=1G,backend=ram").unwrap_err().to_string();
    assert!(err.contains("unknown backend 'ram'") && err.contains("hugetlb"), "{err}");
    let err = ZoneConfig::parse("backend=anon").unwrap_err().to_string();
    assert!(err.contains("missing size="), "{err}");
    let err = ZoneConfig::parse("size=1G,colour=red").unwrap_err().to_string();
    assert!(err.contains("unknown key 'colour'"), "{err}");
}

#[test]
fn validation_rejects_zero_unaligned_and_misplaced_paths() {
    let mut config = VmConfig { zones: vec![ZoneConfig::new(0, Backend::Anon)], ..Default::default() };
    assert_eq!(config.validate(), Err(ConfigError::ZeroZoneSize { zone: 0 }));
    config.zones = vec![ZoneConfig::new(64 << 20, Backend::Anon), ZoneConfig::new(3 << 20, Backend::Hugetlb)];
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("zone 1") && err.to_string().contains(&(4u64 << 20).to_string()), "{err}");
    config.zones = vec![ZoneConfig::new(64 << 20, Backend::File)];
    assert!(config.validate().unwrap_err().to_string().contains("needs path="));
    config.zones = vec![ZoneConfig { path: Some("/x".into()), ..ZoneConfig::new(64 << 20, Backend::Memfd) }];
    assert!(config.validate().unwrap_err().to_string().contains("only for backend=file"));
    config.zones = vec![ZoneConfig::new(4 << 20, Backend::Anon)];
    assert!(matches!(config.validate(), Err(ConfigError::TooLittleMemory { .. })));
    config.zones = vec![ZoneConfig::new(64 << 20, Backend::Anon)];
    config.vcpus = 0;
    assert!(config.validate().unwrap_err().to_string().contains("vcpus = 0"));
}

#[test]
fn workload_becomes_guest_cmdline() {
    let config = VmConfig::default();
    config.validate().unwrap();
    let line = config.guest_cmdline(Some(2_400_000));
    assert!(line.starts_with("fl.cpus=2 fl.tsc_khz=2400000 fl.steps=fill,verify"), "{line}");
    let bad =
        VmConfig { workload: Workload { steps: vec!["jump".into()], ..Default::default() }, ..Default::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("unknown step 'jump'"));
}

#[test]
fn toml_config_reads_sizes_as_text_and_rejects_unknown_fields() {
    let config: VmConfig = toml::from_str(
        "vcpus = 4\n[[memory]]\nsize_bytes = \"128M\"\nbackend = \"memfd\"\n[[memory]]\nsize_bytes = 67108864\nbackend = \"anon\"\n[workload]\nsteps = [\"touch\"]\n",
    )
    .unwrap();
    assert_eq!(config.vcpus, 4);
    assert_eq!(config.zones[0], ZoneConfig::new(128 << 20, Backend::Memfd));
    assert_eq!(config.total_memory_bytes(), 192 << 20);
    assert_eq!(config.workload.steps, vec!["touch".to_string()]);
    let err = toml::from_str::<VmConfig>("vcpu = 4\n").unwrap_err().to_string();
    assert!(err.contains("vcpu"), "{err}");
}

#[test]
fn paging_modes_parse_and_minor_on_anon_is_refused() {
    let zone = ZoneConfig::parse("size=64M,backend=memfd,paging=uffd-minor").unwrap();
    assert_eq!(zone.paging, PagingMode::UffdMinor);
    assert_eq!(ZoneConfig::parse("size=64M,paging=missing").unwrap().paging, PagingMode::UffdMissing);
    let err = ZoneConfig::parse("size=64M,paging=lazy").unwrap_err().to_string();
    assert!(err.contains("unknown paging mode 'lazy'") && err.contains("uffd-missing"), "{err}");
    let config = VmConfig {
        zones: vec![ZoneConfig { paging: PagingMode::UffdMinor, ..ZoneConfig::new(64 << 20, Backend::Anon) }],
        ..Default::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("zone 0") && err.contains("paging=uffd-minor") && err.contains("backend=memfd"), "{err}");
    let toml_zone: VmConfig =
        toml::from_str("[[memory]]\nsize_bytes = \"64M\"\nbackend = \"hugetlb\"\npaging = \"uffd-missing\"\n").unwrap();
    assert_eq!(toml_zone.zones[0].paging, PagingMode::UffdMissing);
}

#[test]
fn engine_and_chaos_settings_are_range_checked() {
    let mut config = VmConfig::default();
    config.fault_engine.handler_threads = 0;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("fault_engine.handler_threads = 0") && err.contains("--fault-threads"), "{err}");
    config.fault_engine = FaultEngineOptions::default();
    config.chaos = Some(ChaosConfig { max_pages: 0, ..ChaosConfig::default() });
    assert!(config.validate().unwrap_err().to_string().contains("chaos.max_pages"));
    config.chaos = Some(ChaosConfig::default());
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("add churn to --steps") && err.contains("--chaos-no-discard"), "{err}");
    config.chaos = Some(ChaosConfig { discards: false, ..ChaosConfig::default() });
    config.validate().unwrap();
    config.chaos = Some(ChaosConfig::default());
    config.workload.steps = vec!["fill".into(), "churn".into()];
    config.validate().unwrap();
    config.workload.size_bytes = Some(4097);
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("4097 bytes is not whole 4 KiB pages") && err.contains("8K"), "{err}");
}

#[test]
fn chaos_refuses_every_handler_that_cannot_resolve_write_protect_faults() {
    use crate::smmu::engine_tuning::EngineTuning;
    let mut config = VmConfig {
        chaos: Some(ChaosConfig::default()),
        workload: Workload { steps: vec!["fill".into(), "churn".into()], ..Default::default() },
        ..Default::default()
    };
    config.validate().unwrap();
    for design in ["reference", "minimal"] {
        config.fault_engine.tuning = EngineTuning::parse(design).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("chaos.events") && err.contains("write-protect"), "{design}: {err}");
    }
}

#[test]
fn balloon_schedule_is_checked_and_reaches_the_guest() {
    let mut config = VmConfig {
        balloon: Some(BalloonOptions { schedule_bytes: vec![64 << 20, 0], ..Default::default() }),
        workload: Workload { steps: vec!["fill".into(), "balloon".into(), "verify".into()], ..Default::default() },
        ..Default::default()
    };
    config.validate().unwrap();
    let line = config.guest_cmdline(None);
    assert!(line.contains("fl.balloon_changes=2") && line.contains("virtio_mmio.device=4K@0xd0000000:5"), "{line}");
    config.balloon = Some(BalloonOptions { schedule_bytes: vec![5000], ..Default::default() });
    assert!(config.validate().unwrap_err().to_string().contains("whole 4 KiB pages"));
    config.balloon = Some(BalloonOptions { schedule_bytes: vec![1 << 30], ..Default::default() });
    assert!(config.validate().unwrap_err().to_string().contains("smaller than guest RAM"));
    config.balloon = None;
    assert!(config.validate().unwrap_err().to_string().contains("--balloon"));
    assert_eq!(BalloonOptions::parse_schedule("128M, 0").unwrap(), vec![128 << 20, 0]);
    assert!(BalloonOptions::parse_schedule("lots").is_err());
}

#[test]
fn zone_keys_given_twice_or_not_fitting_the_backend_are_refused() {
    let err = ZoneConfig::parse("size=64M,size=128M").unwrap_err().to_string();
    assert!(err.contains("size= is given twice"), "{err}");
    let err = ZoneConfig::parse("size=64M,hugepage=2M").unwrap_err().to_string();
    assert!(err.contains("hugepage= is only for backend=hugetlb, not anon"), "{err}");
    let err = ZoneConfig::parse("size=64M,reuse=maybe").unwrap_err().to_string();
    assert!(err.contains("reuse=on or reuse=off"), "{err}");
    assert!(ZoneConfig::parse("size=64M,backend=file,path=/x,reuse=on").unwrap().reuse);
    let config = VmConfig {
        zones: vec![ZoneConfig { hugepage_bytes: 4 << 20, ..ZoneConfig::new(64 << 20, Backend::Hugetlb) }],
        ..Default::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("hugepage=4M is not a huge page size") && !err.contains("4194304"), "{err}");
    let config = VmConfig {
        zones: vec![ZoneConfig { reuse: true, ..ZoneConfig::new(64 << 20, Backend::Memfd) }],
        ..Default::default()
    };
    assert!(config.validate().unwrap_err().to_string().contains("reuse=on is only for backend=file"));
}

#[test]
fn toml_zones_default_to_anon_like_the_command_line() {
    let config: VmConfig = toml::from_str("[[memory]]\nsize_bytes = \"64M\"\n").unwrap();
    assert_eq!(config.zones[0], ZoneConfig::new(64 << 20, Backend::Anon));
    let err = toml::from_str::<VmConfig>("[[memory]]\nsize_bytes = true\n").unwrap_err().to_string();
    assert!(err.contains("a whole number of bytes") && !err.contains("untagged"), "{err}");
}

#[test]
fn a_dirty_ring_must_be_a_power_of_two_kvm_takes() {
    for entries in [0, 100, 128, 1000, 1 << 17] {
        let config = VmConfig { dirty_ring: Some(entries), ..Default::default() };
        assert_eq!(config.validate(), Err(ConfigError::BadDirtyRing { entries }), "{entries}");
    }
    for entries in [DIRTY_RING_MIN_ENTRIES, 4096, DIRTY_RING_MAX_ENTRIES] {
        let config = VmConfig { dirty_ring: Some(entries), ..Default::default() };
        assert_eq!(config.validate(), Ok(()), "{entries}");
    }
    let err = ConfigError::BadDirtyRing { entries: 100 }.to_string();
    assert!(err.contains("power of two") && err.contains("256") && err.contains("65536"), "{err}");
    // A config without a ring says nothing about it (older readers take it unchanged).
    let json = serde_json::to_value(VmConfig::default()).unwrap();
    assert!(json.get("dirty_ring").is_none(), "{json}");
}
