//! Kestrel's decisions, as pure functions: how many replicas of which variant, and why.
//!
//! The operator calls [`decide`] once per evaluation (about every 10 s) with a
//! [`DecisionInput`] built from the ModelDeployment's spec, the operator's config, the
//! worker profiles, the owned Deployments and the Prometheus signals, plus the
//! [`PolicyMemory`] it stored in status last time and the current time. It applies
//! [`Decision::replicas`], writes [`Decision::memory`] back to status, and turns
//! the reason, message and conditions into status and Events.
//!
//! The simulator `kestrel-sim` (feature `sim`) calls the very same [`decide`].
//!
//! This crate must never do I/O, read a clock or depend on kube, tokio or HTTP.

mod capacity;
mod decide;
mod decision;
mod input;
mod memory;
pub mod profile;

pub use decide::decide;
pub use decision::{Decision, DecisionConditions, DecisionReason, Recommendations};
pub use input::{
    BatchLatency, Budget, BudgetPolicy, DecisionInput, Fleet, InputError, ScalingLimits, Signals,
    Targets, Timestamp, Tuning, VariantCapacity, VariantReplicas, VariantSpec,
};
pub use memory::{DemandSample, MAX_REMEMBERED, PolicyMemory, Recommendation, SwitchCandidate};
