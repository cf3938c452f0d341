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
//! ```
//! use std::collections::BTreeMap;
//! use kestrel_policy::profile::WorkerProfile;
//! use kestrel_policy::*;
//!
//! let profile =
//!     WorkerProfile::from_json(include_str!("../../../worker/profiles/cpu-2core-xeon.json")).unwrap();
//! let input = DecisionInput {
//!     targets: Targets { p95_latency_ms: 200.0, queue_depth_per_replica: 8.0 },
//!     scaling: ScalingLimits {
//!         min_replicas: 1,
//!         max_replicas: 20,
//!         scale_down_delay_s: 300.0,
//!         max_scale_down_fraction: 0.5,
//!     },
//!     budget: Budget { max_cost_per_hour: Some(12.0), max_quality_loss: Some(0.01), ..Budget::default() },
//!     tuning: Tuning::default(),
//!     variants: vec![
//!         profile.variant("f32").unwrap().spec(1.0, true),
//!         profile.variant("int8").unwrap().spec(0.6, true),
//!     ],
//!     fleet: Fleet {
//!         variants: BTreeMap::from([("f32".to_string(), VariantReplicas { replicas: 3, ready: 3 })]),
//!         pending_unschedulable: None,
//!         startup_s: None,
//!     },
//!     signals: Some(Signals {
//!         queue_depth: 30.0,
//!         in_flight: 42.0,
//!         arrival_rate: 300.0,
//!         arrival_rate_short: Some(310.0),
//!         p95_ms: Some(120.0),
//!         observed_throughput: Some(300.0),
//!         age_seconds: 4.0,
//!     }),
//! };
//! input.validate().unwrap();
//! // The memory comes from the object's status (`PolicyMemory::default()` the first time).
//! let memory = PolicyMemory { target_variant: Some("f32".into()), ..PolicyMemory::default() };
//! let d = decide(&input, &memory, Timestamp(1_700_000_000.0));
//! assert_eq!(d.replicas["f32"], 6);
//! assert_eq!(d.reason, DecisionReason::ScaleUpQueueDepth);
//! assert_eq!(d.message, "queue depth 42 over 3 ready replicas (target 8/replica): scaling f32 3→6");
//! assert!(d.changes(&input.fleet)); // → apply, write d.memory to status, emit an Event
//! ```
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
