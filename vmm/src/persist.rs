//! The state layer: every part of a VM that holds state a snapshot or a migration must
//! carry implements [`Persist`] beside its own type (the vCPU in `vstate::vcpu_state`,
//! the VM's irqchip and clocks in `vstate::vm_state`, each device beside the device).
//!
//! A state is a plain serde struct: no host addresses, no fds, nothing that only makes
//! sense in the process that saved it. Restoring is done onto a part freshly built from
//! the same configuration (the shape of the VM comes from the config; the state only
//! says where in its life each part was), so `restore` takes `&mut self` rather than
//! building the part itself.

/// A part of a VM whose state can be saved and restored.
///
/// There are deliberately no default bodies: a part that forgets its state must not
/// compile.
pub trait Persist {
    /// The saved state (serde-serializable, host-independent).
    type State;
    /// Why saving or restoring failed.
    type Error;

    /// Reads the part's state. Called with the VM paused.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Puts the part into `state`. Called with the VM paused, on a part built from the
    /// configuration the state was saved with.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}
