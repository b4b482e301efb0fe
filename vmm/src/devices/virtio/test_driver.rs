//! Test driver
