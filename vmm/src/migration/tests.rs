//! The destination's decoder against seeded random corruption of a real stream: every
//! flipped bit, truncation, replayed byte range and reordered frame is refused (never
//! applied as good, never a panic); the stream as sent arrives byte for byte.

use faultline_abi::splitmix64;

use super::destination::receive_memory;
use super::memory::{Applier, Zones, BATCH_HEADER};
use super::stream::{FrameReader, FrameType, FrameWriter};
use super::MigrationError;
use crate::config::{Backend, ZoneConfig};
use crate::memory::GuestRam;

fn zones() -> Vec<ZoneConfig> {
    vec![ZoneConfig::new(8 << 20, Backend::Anon), ZoneConfig::new(4 << 20, Backend::Memfd)]
}

/// Source RAM with some pages written (and some written, then zeroed or discarded), and the stream
/// that carries it: two rounds, state, completion. Returns (ram, stream, frame offsets).
fn source_stream() -> (GuestRam, Vec<u8>, Vec<usize>) {
    let ram = GuestRam::new(&zones()).unwrap();
    let views = crate::snapshot::zone_views(&ram, &zones());
    for (zone, view) in views.iter().enumerate() {
        for page in (0..view.pages()).step_by(7) {
            // SAFETY: page < pages: inside the zone's mapping; nothing else uses this RAM.
            let word = unsafe { view.host_addr.add((page * 4096) as usize).cast::<u64>() };
            // SAFETY: as above.
            unsafe { word.write(splitmix64(page ^ zone as u64) | 1) };
        }
    }
    let source = Zones::new(&ram, &zones());
    let mut writer = FrameWriter::new(Vec::new());
    let mut offsets = vec![0];
    let mut buffer = Vec::new();
    let send = |writer: &mut FrameWriter<Vec<u8>>, kind, payload: &[u8], offsets: &mut Vec<usize>| {
        writer.write(kind, &[payload]).unwrap();
        offsets.push(writer.bytes_written() as usize);
    };
    for zone in 0..source.len() {
        let mut first = 0;
        while first < source.unit_count(zone) {
            let count = 200.min(source.unit_count(zone) - first);
            source.encode(zone, first, count, &[], &mut buffer);
            send(&mut writer, FrameType::Pages, &buffer, &mut offsets);
            first += count;
        }
    }
    send(&mut writer, FrameType::RoundEnd, &0u32.to_le_bytes(), &mut offsets);
    // Round 1: page 7 of zone 0 became zero.
    // SAFETY: inside zone 0's mapping.
    unsafe { views[0].host_addr.add(7 * 4096).cast::<u64>().write(0) };
    source.encode(0, 5, 4, &[], &mut buffer);
    send(&mut writer, FrameType::Pages, &buffer, &mut offsets);
    // Page 14 of zone 0 (sent with data in round 0) was discarded by the VMM: it goes as a
    // zero marker without being read (its bytes are still there when encoded), and the
    // destination clears it.
    source.encode(0, 13, 3, &[14], &mut buffer);
    send(&mut writer, FrameType::Pages, &buffer, &mut offsets);
    // SAFETY: inside zone 0's mapping.
    unsafe { std::ptr::write_bytes(views[0].host_addr.add(14 * 4096), 0, 4096) };
    send(&mut writer, FrameType::RoundEnd, &1u32.to_le_bytes(), &mut offsets);
    send(&mut writer, FrameType::State, b"{\"vcpus\":[]}", &mut offsets);
    send(&mut writer, FrameType::Complete, b"", &mut offsets);
    let bytes = writer.get_ref().clone();
    (ram, bytes, offsets)
}

fn decode(bytes: &[u8], ram: &GuestRam) -> Result<Vec<u8>, MigrationError> {
    let mut applier = Applier::new(Zones::new(ram, &zones()));
    receive_memory(&mut FrameReader::new(bytes), &mut applier).map(|r| r.state)
}

fn same_memory(a: &GuestRam, b: &GuestRam) -> bool {
    let (a, b) = (crate::snapshot::zone_views(a, &zones()), crate::snapshot::zone_views(b, &zones()));
    a.iter().zip(&b).all(|(a, b)| {
        // SAFETY: both zones' whole mappings, read only, nothing writes them meanwhile.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts(a.host_addr, a.size_bytes as usize),
                std::slice::from_raw_parts(b.host_addr, b.size_bytes as usize),
            )
        };
        x == y
    })
}

#[test]
fn the_stream_as_sent_arrives_byte_for_byte() {
    let (source, bytes, _) = source_stream();
    let destination = GuestRam::new(&zones()).unwrap();
    assert_eq!(decode(&bytes, &destination).unwrap(), b"{\"vcpus\":[]}");
    assert!(same_memory(&source, &destination));
}

#[test]
fn seeded_random_corruption_is_always_refused() {
    let (_, bytes, offsets) = source_stream();
    let destination = GuestRam::new(&zones()).unwrap();
    let mut rng = 0x5eed_u64;
    let mut next = |bound: usize| {
        rng = splitmix64(rng);
        (rng % bound as u64) as usize
    };
    let mut kinds = [0usize; 4];
    for round in 0..400 {
        let mut stream = bytes.clone();
        let kind = round % 4;
        kinds[kind] += 1;
        let what = match kind {
            0 => {
                let at = next(stream.len());
                let bit = next(8);
                stream[at] ^= 1 << bit;
                format!("bit {bit} of byte {at} flipped")
            }
            1 => {
                let cut = next(stream.len());
                stream.truncate(cut);
                format!("cut after {cut} bytes")
            }
            2 => {
                let end = 1 + next(stream.len() - 1);
                let start = end.saturating_sub(1 + next(64 << 10));
                let replay = stream[start..end].to_vec();
                stream.splice(end..end, replay);
                format!("bytes {start}..{end} replayed")
            }
            _ => {
                let frame = next(offsets.len() - 2);
                let (a, b, c) = (offsets[frame], offsets[frame + 1], offsets[frame + 2]);
                let (first, second) = (stream[a..b].to_vec(), stream[b..c].to_vec());
                stream.splice(a..c, second.into_iter().chain(first));
                format!("frames {frame} and {} swapped", frame + 1)
            }
        };
        let result = decode(&stream, &destination);
        assert!(result.is_err(), "round {round}: {what} was accepted");
    }
    assert!(kinds.iter().all(|&k| k >= 100), "{kinds:?}");
}

#[test]
fn out_of_range_and_lying_page_frames_are_refused() {
    let destination = GuestRam::new(&zones()).unwrap();
    let frame = |zone: u32, shift: u32, first: u64, count: u32, data: usize| {
        let mut payload = zone.to_le_bytes().to_vec();
        payload.extend(shift.to_le_bytes());
        payload.extend(first.to_le_bytes());
        payload.extend(count.to_le_bytes());
        payload.extend(0u32.to_le_bytes());
        payload.resize(BATCH_HEADER + (count as usize).div_ceil(8) + data, 0);
        let mut writer = FrameWriter::new(Vec::new());
        writer.write(FrameType::Pages, &[&payload]).unwrap();
        writer.get_ref().clone()
    };
    let cases = [
        (frame(2, 12, 0, 1, 4096), "zone 2, but the VM has 2 zones"),
        (frame(0, 21, 0, 1, 2 << 20), "2^21"),
        (frame(0, 12, 2047, 2, 8192), "outside its 2048 pages"),
        (frame(1, 12, u64::MAX, 1, 4096), "outside"),
        (frame(0, 12, 0, 1, 100), "100 data bytes"),
        (frame(0, 12, 0, 0, 0), "0 pages"),
    ];
    for (bytes, expected) in cases {
        let err = decode(&bytes, &destination).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
    }
}
