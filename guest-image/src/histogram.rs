//! Per-CPU latency histograms (the ABI's log-linear buckets) and their JSON form.

use core::fmt::{self, Write};

use faultline_abi::{histogram_bucket, HISTOGRAM_BUCKETS};

/// Latency samples in cycles: bucket counts plus count/min/max/sum.
#[derive(Clone, Copy)]
pub struct Histogram {
    buckets: [u64; HISTOGRAM_BUCKETS],
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        // All zero, so per-CPU arrays of histograms live in .bss (min is valid once count > 0).
        Histogram { buckets: [0; HISTOGRAM_BUCKETS], count: 0, sum: 0, min: 0, max: 0 }
    }

    /// Forgets every sample.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Records one sample.
    #[inline(always)]
    pub fn record(&mut self, cycles: u64) {
        self.buckets[histogram_bucket(cycles)] += 1;
        self.min = if self.count == 0 { cycles } else { self.min.min(cycles) };
        self.max = self.max.max(cycles);
        self.count += 1;
        self.sum = self.sum.wrapping_add(cycles);
    }

    /// Adds `other`'s samples to this one.
    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        self.min = if self.count == 0 { other.min } else { self.min.min(other.min) };
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum = self.sum.wrapping_add(other.sum);
        self.max = self.max.max(other.max);
    }

    /// Writes `{"count":..,"min":..,"max":..,"mean":..,"buckets":[[index,count],..]}`.
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        let mean = self.sum.checked_div(self.count).unwrap_or(0);
        write!(
            out,
            "{{\"count\":{},\"min\":{},\"max\":{},\"mean\":{},\"buckets\":[",
            self.count, self.min, self.max, mean
        )?;
        let mut first = true;
        for (index, &count) in self.buckets.iter().enumerate().filter(|(_, &count)| count != 0) {
            if !first {
                out.write_char(',')?;
            }
            first = false;
            write!(out, "[{index},{count}]")?;
        }
        out.write_str("]}")
    }
}
