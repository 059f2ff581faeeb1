//! The reconcile's one decision: what the plan is computed against. Pure, table-tested.
//!
//! - **Trusted**: the model is the one last applied, verified less than a resync ago, by the same
//!   provider: no cloud call at all (an unchanged resync costs nothing).
//!   After a restart that holds for a Service whose model still hashes to its checkpoint
//!   (memory *unverified*: known from the checkpoint, not read).
//! - **Memory**: the model changed; plan against what was last applied or observed (no read).
//! - **Checkpoint**: the model changed and memory is unverified: a checkpoint is not trusted for
//!   a write. Only a change of targets is applied against it, once the target groups are
//!   confirmed ours (one read); anything else reads the cloud first.
//! - **Nothing**: a new Service that never carried our finalizer and that this process has not
//!   touched: nothing of ours can exist yet, so no read either.
//! - **Cloud**: read what exists (after a restart, a failed apply, a provider change, or when the
//!   drift check is due).
//!
//! While a load balancer is provisioning its state is polled first (one call), whatever the basis.

use std::time::Duration;

/// What is remembered about the cloud, as the decision needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remembered {
    /// The desired model hashes to the one last applied.
    pub same_model: bool,
    /// The same provider made it as the class names now.
    pub same_provider: bool,
    /// The last apply failed.
    pub stale: bool,
    /// Since the last read from the cloud.
    pub age: Duration,
    pub provisioning: bool,
    /// Known from the Service's checkpoint only, not read since this process started.
    pub unverified: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    Trusted,
    Memory,
    Checkpoint,
    Nothing,
    Cloud,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub basis: Basis,
    /// Read the load balancer's state again first.
    pub poll_state: bool,
}

/// `untouched`: no finalizer of ours, no name set by annotation (every name derives from the
/// UID) and nothing remembered about the Service, not even a failure.
pub fn decide(remembered: Option<Remembered>, untouched: bool, resync: Duration) -> Decision {
    match remembered.filter(|r| usable(r, resync)) {
        Some(r) => Decision {
            basis: match (r.same_model, r.unverified) {
                (true, _) => Basis::Trusted,
                (false, false) => Basis::Memory,
                (false, true) => Basis::Checkpoint,
            },
            poll_state: r.provisioning,
        },
        None => Decision {
            basis: if untouched {
                Basis::Nothing
            } else {
                Basis::Cloud
            },
            poll_state: false,
        },
    }
}

/// What a deletion plans against: memory when it is fresh and settled, else the cloud (a delete
/// wave would otherwise cost a full observe per Service).
pub fn deletion_basis(remembered: Option<Remembered>, resync: Duration) -> Basis {
    match remembered {
        Some(r) if usable(&r, resync) && !r.provisioning && !r.unverified => Basis::Memory,
        _ => Basis::Cloud,
    }
}

fn usable(r: &Remembered, resync: Duration) -> bool {
    !r.stale && r.same_provider && r.age < resync
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESYNC: Duration = Duration::from_secs(600);

    fn fresh() -> Remembered {
        Remembered {
            same_model: true,
            same_provider: true,
            stale: false,
            age: Duration::from_secs(10),
            provisioning: false,
            unverified: false,
        }
    }

    fn from_checkpoint() -> Remembered {
        Remembered {
            unverified: true,
            ..fresh()
        }
    }

    #[test]
    fn decisions() {
        use Basis::*;
        let cases: &[(&str, Option<Remembered>, bool, Basis, bool)] = &[
            ("unchanged and fresh", Some(fresh()), false, Trusted, false),
            (
                "model changed",
                Some(Remembered {
                    same_model: false,
                    ..fresh()
                }),
                false,
                Memory,
                false,
            ),
            (
                "provisioning, unchanged",
                Some(Remembered {
                    provisioning: true,
                    ..fresh()
                }),
                false,
                Trusted,
                true,
            ),
            (
                "provisioning, changed",
                Some(Remembered {
                    provisioning: true,
                    same_model: false,
                    ..fresh()
                }),
                false,
                Memory,
                true,
            ),
            (
                "drift check due",
                Some(Remembered {
                    age: RESYNC,
                    ..fresh()
                }),
                false,
                Cloud,
                false,
            ),
            (
                "last apply failed",
                Some(Remembered {
                    stale: true,
                    ..fresh()
                }),
                false,
                Cloud,
                false,
            ),
            (
                "another provider made it",
                Some(Remembered {
                    same_provider: false,
                    ..fresh()
                }),
                false,
                Cloud,
                false,
            ),
            (
                "checkpoint, unchanged",
                Some(from_checkpoint()),
                false,
                Trusted,
                false,
            ),
            (
                "checkpoint, model changed: confirmed or read before writing",
                Some(Remembered {
                    same_model: false,
                    ..from_checkpoint()
                }),
                false,
                Checkpoint,
                false,
            ),
            (
                "checkpoint, drift check due",
                Some(Remembered {
                    age: RESYNC,
                    ..from_checkpoint()
                }),
                false,
                Cloud,
                false,
            ),
            ("new Service", None, true, Nothing, false),
            ("nothing remembered (restart)", None, false, Cloud, false),
            // Memory wins over "untouched" (cannot both hold in practice; memory is more precise).
            (
                "remembered and untouched",
                Some(fresh()),
                true,
                Trusted,
                false,
            ),
        ];
        for (name, remembered, untouched, basis, poll_state) in cases {
            assert_eq!(
                decide(*remembered, *untouched, RESYNC),
                Decision {
                    basis: *basis,
                    poll_state: *poll_state
                },
                "{name}"
            );
        }
    }

    #[test]
    fn deletions() {
        let cases: &[(&str, Option<Remembered>, Basis)] = &[
            ("fresh", Some(fresh()), Basis::Memory),
            (
                "the model does not matter",
                Some(Remembered {
                    same_model: false,
                    ..fresh()
                }),
                Basis::Memory,
            ),
            (
                "provisioning",
                Some(Remembered {
                    provisioning: true,
                    ..fresh()
                }),
                Basis::Cloud,
            ),
            (
                "stale",
                Some(Remembered {
                    stale: true,
                    ..fresh()
                }),
                Basis::Cloud,
            ),
            (
                "old",
                Some(Remembered {
                    age: RESYNC * 2,
                    ..fresh()
                }),
                Basis::Cloud,
            ),
            ("nothing remembered", None, Basis::Cloud),
            (
                "known from a checkpoint",
                Some(from_checkpoint()),
                Basis::Cloud,
            ),
        ];
        for (name, remembered, basis) in cases {
            assert_eq!(deletion_basis(*remembered, RESYNC), *basis, "{name}");
        }
    }
}
