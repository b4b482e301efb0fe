//! The snapshot layer: saving a paused [`Machine`] into a snapshot directory (full or
//! diff), reading one back (a chain of diffs ending in a full snapshot), and describing
//! one (`faultline snapshot inspect`).
//!
//! A full snapshot carries every page that exists and is not zero. After it, KVM's dirty
//! log is switched on for the VM, so the next snapshot can be a diff: the pages the guest
//! wrote since (harvested with `KVM_GET_DIRTY_LOG` and reset with `KVM_CLEAR_DIRTY_LOG`
//! in the same pause, so no write falls between two snapshots). A diff names its parent;
//! restoring it loads the chain from the full snapshot up.
//!
//! The VMM's own changes to guest RAM are not in KVM's dirty log, so the smmu keeps a
//! set of its own ([`crate::smmu::vmm_writes`]): every discard through the
//! [`Discarder`](crate::smmu::discard::Discarder) (balloon inflation, free page
//! reporting) marks its range, and the balloon marks the used rings it writes and the
//! pages of partially held huge pages it zeroes. A diff carries the union of the dirty
//! log and that set, both taken in the same pause (and both reset by a full snapshot).
//! A page in the union that no longer exists on the host (discarded since the parent)
//! is carried as zeros without being read, so a chain never resurrects the parent's
//! bytes there; reading it would populate it, or fault into the fault engine.
//!
//! Discarded pages also stay holes across a restore: the state saves the smmu's
//! page-state table's discarded ranges (only pages the host holds nothing for: a zone
//! paged by the kernel is not tracked page by page; see `GuestPaging::save_page_state`),
//! and `Machine::restore_state` discards them
//! again in the new VM, after an eager load (which wrote the chain's zeros there) and
//! before a lazy one (whose fault engine then fills them with zeros instead of reading
//! the images).
//!
//! While a snapshot is written the VM is paused and its devices are quiesced
//! (`Machine::quiesce`: the balloon's transport is held, so its notifier thread cannot
//! serve a kick and write guest RAM meanwhile). The fault engine only fills pages the
//! guest touches, and the kernel loader ran before the first snapshot. Chaos runs
//! (which write-protect and discard at random) are still refused by `Machine::save_state`.

pub mod chunks;
pub mod cli;
pub mod format;
pub mod image;
pub mod lazy;
pub mod live;
pub mod map;
pub mod page_server;
pub mod prefetch;
pub mod uffd_socket;
pub mod working_set;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::machine::{Machine, MachineError, MachineState};
use crate::memory::GuestRam;
use crate::vstate::VmError;
use format::{FormatError, SnapshotKind, SnapshotState, ZoneImage};
use image::{Carry, ImageError, ZoneView};

/// Errors taking, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file cannot be read.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A memory image cannot be read or written.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Pausing, saving or restoring the machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The dirty log could not be read or switched on.
    #[error("dirty log: {0}")]
    DirtyLog(#[from] VmError),
    /// The snapshot directory cannot be used.
    #[error("{path}: {reason}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A file of the snapshot cannot be read or written.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A diff was asked for with no snapshot before it.
    #[error("a diff snapshot needs an earlier snapshot of this VM in this process to build on; take a full one first (snapshot create DIR without --diff)")]
    NoParent,
    /// A live snapshot failed.
    #[error(transparent)]
    Live(#[from] live::LiveError),
    /// A chain of diffs is broken.
    #[error("{path}: {reason}")]
    Chain {
        /// The snapshot whose parent is wrong.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Zones to restore a snapshot into instead of the ones it was taken with (same count
/// and sizes; backend, path and paging may differ), and other things a restore may change.
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    /// Replacement zones.
    pub zones: Option<Vec<crate::config::ZoneConfig>>,
    /// Echo the guest's console.
    pub console: Option<bool>,
    /// How guest memory comes back.
    pub memory_restore: MemoryRestore,
    /// `uffd-socket`: how long a fault may wait on the external handler (None: 10 s).
    pub page_server_timeout: Option<std::time::Duration>,
    /// `uffd-missing`: what a background thread brings in besides the faults.
    pub prefetch: page_server::Prefetch,
    /// `uffd-missing`: record the guest's first touches for this long after the
    /// restore into the snapshot's working-set file.
    pub record_working_set: Option<std::time::Duration>,
}

/// How a restore brings guest memory back (`--memory-restore`; docs/lazy-restore.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryRestore {
    /// Read every carried page into guest RAM before the vCPUs start.
    #[default]
    Eager,
    /// Map the base image privately over anonymous zones (the kernel reads each page on
    /// first touch, copy-on-write); diffs above the base are read in eagerly.
    Map,
    /// Start at once; every zone is paged by userfaultfd MISSING faults, each page read
    /// from the images on first touch.
    UffdMissing,
    /// Shared zones (memfd, hugetlb): the images are written into the zone's page cache
    /// and faults map it with UFFDIO_CONTINUE (no copy per fault).
    UffdMinor,
    /// Register guest RAM MISSING on a userfaultfd and hand it, with the region table,
    /// to an external handler listening on this Unix socket, as Firecracker does.
    UffdSocket(PathBuf),
}

impl MemoryRestore {
    /// Parses `eager`, `map`, `uffd-missing`, `uffd-minor` or `uffd-socket:PATH`.
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "eager" => MemoryRestore::Eager,
            "map" => MemoryRestore::Map,
            "uffd-missing" => MemoryRestore::UffdMissing,
            "uffd-minor" => MemoryRestore::UffdMinor,
            _ => match text.strip_prefix("uffd-socket:") {
                Some("") => return Err("uffd-socket: needs the handler's socket path, e.g. uffd-socket:/run/pager.sock".into()),
                Some(path) => MemoryRestore::UffdSocket(PathBuf::from(path)),
                None => {
                    return Err(format!(
                        "unknown memory restore mode {text:?}; use eager, map, uffd-missing, uffd-minor or uffd-socket:PATH"
                    ))
                }
            },
        })
    }

    /// The mode's name as `--memory-restore` takes it (without a socket path).
    pub fn name(&self) -> &'static str {
        match self {
            MemoryRestore::Eager => "eager",
            MemoryRestore::Map => "map",
            MemoryRestore::UffdMissing => "uffd-missing",
            MemoryRestore::UffdMinor => "uffd-minor",
            MemoryRestore::UffdSocket(_) => "uffd-socket",
        }
    }
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    /// The directory.
    pub dir: PathBuf,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// Guest memory bytes carried in the images.
    pub memory_bytes: u64,
    /// The state file's size.
    pub state_bytes: u64,
    /// How long pausing the vCPUs took, ns (0 if the VM was paused already).
    pub pause_ns: u64,
    /// Whole snapshot, ms (pause, state, images, sync).
    pub total_ms: f64,
    /// A live snapshot: how long the vCPUs were stopped, ns (stopping them, saving the
    /// state, write-protecting guest RAM, resetting the dirty log, resuming).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_pause_ns: Option<u64>,
    /// A live snapshot: the guest's (or the VMM's) writes that waited for their page to
    /// be copied first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_faults: Option<u64>,
    /// A live snapshot: where `guest_pause_ns` went, and the dirty-log reset just before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_breakdown: Option<PauseBreakdown>,
}

/// Where a live snapshot's pause goes, ns each (the parts add up to `guest_pause_ns`
/// but for the timer calls), and what ran before it while the guest ran on: the
/// dirty-log reset, the whole-zone write-protect and the rounds that protected again
/// what the guest wrote meanwhile.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PauseBreakdown {
    /// Resetting KVM's dirty log and the VMM's write set, before the write-protect.
    pub dirty_log_reset_before_ns: u64,
    /// Write-protecting every zone whole (16 MiB per `UFFDIO_WRITEPROTECT`), while the
    /// guest runs.
    pub pre_protect_ns: u64,
    /// Rounds (while the guest runs) that write-protected again the pages written since
    /// the previous round.
    pub rounds: u64,
    /// Pages those rounds protected again, in all.
    pub round_pages: u64,
    /// Stopping the vCPUs and quiescing the devices.
    pub stop_ns: u64,
    /// Saving vCPU, VM and device state (with the page-state table's scan).
    pub save_state_ns: u64,
    /// In the pause: taking the pages written since the last round (KVM's dirty log,
    /// the VMM's write set, the write faults).
    pub harvest_ns: u64,
    /// In the pause: write-protecting those pages again.
    pub write_protect_ns: u64,
    /// How many pages that was.
    pub pause_pages: u64,
    /// Resuming the vCPUs.
    pub resume_ns: u64,
}

/// The snapshot history of one running VM: its last snapshot (a diff's parent).
#[derive(Debug, Default)]
pub struct SnapshotHistory {
    last: Mutex<Option<PathBuf>>,
}

/// The zones of `ram` as the image code sees them.
pub fn zone_views(ram: &GuestRam, machine_zones: &[crate::config::ZoneConfig]) -> Vec<ZoneView> {
    ram.zone_mappings()
        .iter()
        .zip(machine_zones)
        .enumerate()
        .map(|(zone, (mapping, config))| ZoneView {
            zone,
            host_addr: mapping.host_addr(),
            size_bytes: mapping.size_bytes(),
            page_bytes: config.page_bytes(),
            backend: config.backend,
            fd: mapping.fd(),
        })
        .collect()
}

/// Pauses `machine` (if it runs), writes a snapshot into `dir` (which must not exist, or
/// be empty) and leaves the VM paused. On any error the directory is removed again and
/// the VM is unharmed; the caller resumes it.
pub fn create(
    machine: &Machine,
    history: &SnapshotHistory,
    dir: &Path,
    diff: bool,
) -> Result<SnapshotSummary, SnapshotError> {
    let started = Instant::now();
    let parent = if diff {
        Some(history.last.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(SnapshotError::NoParent)?)
    } else {
        None
    };
    prepare_dir(dir)?;
    let pause = machine.pause()?;
    let result = write_snapshot(machine, dir, parent.as_deref());
    match result {
        Ok((images, state_bytes)) => {
            *history.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.to_path_buf());
            Ok(SnapshotSummary {
                dir: dir.to_path_buf(),
                kind: if diff { SnapshotKind::Diff } else { SnapshotKind::Full },
                memory_bytes: images.iter().map(ZoneImage::carried_bytes).sum(),
                state_bytes,
                pause_ns: pause.as_nanos() as u64,
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                guest_pause_ns: None,
                write_faults: None,
                pause_breakdown: None,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

fn prepare_dir(dir: &Path) -> Result<(), SnapshotError> {
    let bad = |reason: String| SnapshotError::Directory { path: dir.to_path_buf(), reason };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(bad("exists and is not empty; give a new directory for each snapshot".into()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).map_err(|e| bad(format!("cannot create it: {e}")))
        }
        Err(e) => Err(bad(format!("cannot use it: {e}"))),
    }
}

/// Writes images and state; returns the images and the state file's size.
fn write_snapshot(
    machine: &Machine,
    dir: &Path,
    parent: Option<&Path>,
) -> Result<(Vec<ZoneImage>, u64), SnapshotError> {
    let mut taken = Vec::new();
    let result = write_snapshot_taking(machine, dir, parent, &mut taken);
    if result.is_err() {
        // A diff that failed took pages out of KVM's dirty log and the VMM's set: they
        // go back into the set, so the next diff (on the same parent) still carries them.
        let writes = machine.paging.discarder().vmm_writes();
        taken.into_iter().for_each(|gpa| writes.mark(crate::smmu::GuestRange::new(gpa, 4096)));
    }
    result
}

/// [`write_snapshot`], listing in `taken` every page (guest-physical) a diff took out of
/// the dirty log and the VMM's set.
fn write_snapshot_taking(
    machine: &Machine,
    dir: &Path,
    parent: Option<&Path>,
    taken: &mut Vec<u64>,
) -> Result<(Vec<ZoneImage>, u64), SnapshotError> {
    // Device threads stay still until the images are written: nothing but this reads
    // or writes guest RAM meanwhile.
    let quiet = machine.quiesce();
    let state = machine.save_state_quiesced(&quiet)?;
    let views = zone_views(&machine.ram, &machine.config.zones);
    if parent.is_none() {
        // A lazily restored VM holds pages it has not brought in yet; a full snapshot
        // must carry them.
        machine.bring_in_lazy_memory().map_err(|source| SnapshotError::Io {
            path: dir.to_path_buf(),
            what: "bring in the pages of the lazy restore before a full snapshot",
            source,
        })?;
    }
    let existing = views.iter().map(image::existing_pages).collect::<Result<Vec<_>, ImageError>>()?;
    let writes = machine.paging.discarder().vmm_writes().clone();
    let mut vm = machine.vm();
    let images = match parent {
        None => views
            .iter()
            .zip(&existing)
            .map(|(view, pages)| {
                image::write_image(dir, &format::image_file_name(view.zone), view, pages, Carry::NonZero, None)
            })
            .collect::<Result<Vec<_>, ImageError>>()?,
        Some(_) => {
            // The guest's writes (KVM's dirty log) and the VMM's own (device writes and
            // every discard since the parent), taken in the same pause.
            taken.extend(writes.take());
            diff_images(machine, &mut vm, dir, &views, &existing, taken)?
        }
    };
    if parent.is_none() {
        // From the first full snapshot on, the guest's writes are logged for diffs; a
        // fresh log starts clean, so the next diff holds exactly what follows.
        vm.enable_dirty_log()?;
        // Logging may have been on before (an earlier full snapshot): reset it, and the
        // VMM's own writes with it (kept in `taken`: should this snapshot still fail, a
        // diff on the earlier one needs them).
        for (slot, region) in machine.ram.regions().iter().enumerate() {
            taken.extend(vm.take_dirty_pages(slot)?.into_iter().map(|page| region.gpa + page * 4096));
        }
        taken.extend(writes.take());
    }
    drop(vm);
    drop(quiet);
    let state_bytes = write_state_file(machine, dir, &images, state, parent)?;
    Ok((images, state_bytes))
}

/// Writes the state file of a snapshot whose images are in `dir` (last, and by rename: a
/// directory with a state file is complete, as far as the VMM's own failures go; nothing
/// is fsynced, see image.rs). Returns its size.
fn write_state_file(
    machine: &Machine,
    dir: &Path,
    images: &[ZoneImage],
    state: MachineState,
    parent: Option<&Path>,
) -> Result<u64, SnapshotError> {
    let file = SnapshotState {
        kind: if parent.is_some() { SnapshotKind::Diff } else { SnapshotKind::Full },
        parent: parent.map(|parent| parent_reference(dir, parent)),
        created_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        writer: format!("faultline {}", env!("CARGO_PKG_VERSION")),
        config: machine.config.clone(),
        images: images.to_vec(),
        machine: state,
    };
    let bytes = format::encode(&file);
    let tmp = dir.join(format!("{}.tmp", format::STATE_FILE));
    let io = |what| move |source| SnapshotError::Io { path: dir.join(format::STATE_FILE), what, source };
    std::fs::write(&tmp, &bytes).map_err(io("write"))?;
    std::fs::rename(&tmp, dir.join(format::STATE_FILE)).map_err(io("rename"))?;
    Ok(bytes.len() as u64)
}

/// The diff's images: per zone, the pages the VMM wrote or discarded (`taken`, guest-
/// physical, on entry) and the pages KVM logged dirty (added to `taken`), each carried
/// whether zero or not; pages that no longer exist are carried as zeros without being
/// read.
fn diff_images(
    machine: &Machine,
    vm: &mut crate::vstate::Vm,
    dir: &Path,
    views: &[ZoneView],
    existing: &[Vec<u64>],
    taken: &mut Vec<u64>,
) -> Result<Vec<ZoneImage>, SnapshotError> {
    for (slot, region) in machine.ram.regions().iter().enumerate() {
        taken.extend(vm.take_dirty_pages(slot)?.into_iter().map(|page| region.gpa + page * 4096));
    }
    let mut dirty: Vec<Vec<u64>> = vec![Vec::new(); views.len()];
    for &gpa in taken.iter() {
        if let Some((zone, offset)) = zone_offset(machine, gpa) {
            dirty[zone].push(offset / views[zone].page_bytes);
        }
    }
    Ok(views
        .iter()
        .zip(&mut dirty)
        .zip(existing)
        .map(|((view, pages), existing)| {
            pages.sort_unstable();
            pages.dedup();
            let name = format::image_file_name(view.zone);
            image::write_image(dir, &name, view, pages, Carry::All, Some(existing))
        })
        .collect::<Result<Vec<_>, ImageError>>()?)
}

/// The zone and offset in it of guest-physical `gpa`, if it is guest RAM.
pub(super) fn zone_offset(machine: &Machine, gpa: u64) -> Option<(usize, u64)> {
    let region = machine.ram.regions().iter().find(|r| gpa >= r.gpa && gpa - r.gpa < r.size_bytes)?;
    Some((region.zone, region.fd_offset + (gpa - region.gpa)))
}

/// How a diff in `dir` names its parent: `../NAME` when both are in the same directory
/// (so a directory of snapshots can be moved as a whole), else the absolute path.
fn parent_reference(dir: &Path, parent: &Path) -> PathBuf {
    match (dir.parent(), parent.parent(), parent.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => Path::new("..").join(name),
        _ => parent.to_path_buf(),
    }
}

/// Reads the state file of the snapshot in `dir`.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(format::STATE_FILE);
    let meta =
        std::fs::metadata(&path).map_err(|source| SnapshotError::Io { path: path.clone(), what: "open", source })?;
    if !meta.is_file() {
        return Err(SnapshotError::Directory { path, reason: "is not a regular file".into() });
    }
    if meta.len() > format::MAX_PAYLOAD_BYTES + format::HEADER_BYTES as u64 {
        return Err(FormatError::TooLarge { path, declared: meta.len() }.into());
    }
    let bytes =
        std::fs::read(&path).map_err(|source| SnapshotError::Io { path: path.clone(), what: "read", source })?;
    Ok(format::decode(&path, &bytes)?)
}

/// A snapshot and the diffs on top of it, base first, each with its directory.
pub struct Chain {
    /// `(dir, state)` from the full snapshot to the one asked for.
    pub links: Vec<(PathBuf, SnapshotState)>,
}

/// Most snapshots in a chain (a loop guard).
const MAX_CHAIN: usize = 1024;

impl Chain {
    /// Reads the snapshot in `dir` and, if it is a diff, its parents down to a full one.
    pub fn read(dir: &Path) -> Result<Chain, SnapshotError> {
        let mut links = Vec::new();
        let mut at = dir.to_path_buf();
        loop {
            let state = read_state(&at)?;
            let parent = state.parent.clone();
            if let Some((_, child)) = links.last() {
                let child: &SnapshotState = child;
                if child.config.zones.iter().map(|z| z.size_bytes).ne(state.config.zones.iter().map(|z| z.size_bytes)) {
                    return Err(SnapshotError::Chain {
                        path: at,
                        reason: "its zones differ from those of the diff on top of it".into(),
                    });
                }
            }
            links.push((at.clone(), state));
            match parent {
                None => break,
                Some(parent) => {
                    if links.len() >= MAX_CHAIN {
                        return Err(SnapshotError::Chain {
                            path: at,
                            reason: format!("more than {MAX_CHAIN} diffs (a loop?)"),
                        });
                    }
                    at = if parent.is_absolute() { parent } else { at.join(parent) };
                }
            }
        }
        links.reverse();
        Ok(Chain { links })
    }

    /// The snapshot asked for (the top of the chain).
    pub fn top(&self) -> &SnapshotState {
        &self.links.last().expect("a chain has at least one link").1
    }

    /// Checks every image file of the chain exists and has its zone's size.
    pub fn check_files(&self) -> Result<(), SnapshotError> {
        for (dir, state) in &self.links {
            for image in &state.images {
                image::check_image_file(dir, image)?;
            }
        }
        Ok(())
    }

    /// Loads the chain's memory into fresh guest RAM (base first, then each diff);
    /// returns the bytes read.
    pub fn load_memory(&self, views: &[ZoneView]) -> Result<u64, SnapshotError> {
        self.check_files()?;
        for view in views {
            image::clear_shared_zone(view)?;
        }
        let mut loaded = 0;
        for (dir, state) in &self.links {
            for (image, view) in state.images.iter().zip(views) {
                loaded += image::load_image(dir, image, view)?;
            }
        }
        Ok(loaded)
    }

    /// Takes the machine state of the top snapshot.
    pub fn into_machine_state(mut self) -> MachineState {
        self.links.pop().expect("a chain has at least one link").1.machine
    }
}

/// What `snapshot inspect` shows.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// Format version.
    pub format_version: u32,
    /// Who wrote it.
    pub writer: String,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// A diff's parent.
    pub parent: Option<PathBuf>,
    /// vCPUs.
    pub vcpus: u32,
    /// Per zone: backend, size, page size, bytes carried, checksum ok.
    pub zones: Vec<InspectedZone>,
    /// Every checksum (state and images) verified.
    pub checksums_ok: bool,
}

/// One zone in `snapshot inspect`.
#[derive(Debug, Serialize)]
pub struct InspectedZone {
    /// Backend name.
    pub backend: String,
    /// Paging mode.
    pub paging: String,
    /// Zone size.
    pub size_bytes: u64,
    /// Page unit of the image.
    pub page_bytes: u64,
    /// Bytes the image carries.
    pub carried_bytes: u64,
    /// The image's checksum, or the error reading it.
    pub image: Result<(), String>,
}

/// Reads and verifies a snapshot (state checksum, every image's checksum) without
/// restoring it.
pub fn inspect(dir: &Path) -> Result<Inspection, SnapshotError> {
    let state = read_state(dir)?;
    let mut checksums_ok = true;
    let zones = state
        .images
        .iter()
        .zip(&state.config.zones)
        .map(|(image, zone)| {
            let verified = verify_image(dir, image).map_err(|e| e.to_string());
            checksums_ok &= verified.is_ok();
            InspectedZone {
                backend: zone.backend.name().to_string(),
                paging: format!("{:?}", zone.paging).to_lowercase(),
                size_bytes: image.size_bytes,
                page_bytes: image.page_bytes,
                carried_bytes: image.carried_bytes(),
                image: verified,
            }
        })
        .collect();
    Ok(Inspection {
        dir: dir.to_path_buf(),
        format_version: format::FORMAT_VERSION,
        writer: state.writer,
        kind: state.kind,
        parent: state.parent,
        vcpus: state.config.vcpus,
        zones,
        checksums_ok,
    })
}

fn verify_image(dir: &Path, image: &ZoneImage) -> Result<(), ImageError> {
    use std::os::unix::fs::FileExt;
    image::check_image_file(dir, image)?;
    let path = dir.join(&image.file);
    let file =
        std::fs::File::open(&path).map_err(|source| ImageError::Io { path: path.clone(), what: "open", source })?;
    for (chunk, &expected) in image.chunk_crc32.iter().enumerate() {
        chunks::verify_chunk(&file, &path, &image.ranges, image.chunk_bytes, expected, chunk as u64)?;
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    for &(offset, len) in &image.ranges {
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(buffer.len() as u64) as usize;
            file.read_exact_at(&mut buffer[..chunk], offset + done).map_err(|source| ImageError::Io {
                path: path.clone(),
                what: "read",
                source,
            })?;
            crc.update(&buffer[..chunk]);
            done += chunk as u64;
        }
    }
    let found = crc.finalize();
    if found != image.crc32 {
        return Err(ImageError::BadChecksum { path, found, expected: image.crc32 });
    }
    Ok(())
}
