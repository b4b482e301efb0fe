//! virtio devices (placeholder)
