//! Malicious drivers
