//! kestrel-operator: turns ModelDeployments into GPU-scheduled worker Deployments and
//! tells the truth about them in status.
//!
//! Reconcile is a named pipeline, one module per step: [`observe`] → [`validate`] →
//! [`decide`] → [`build`] → [`apply`] → [`status`]. Only observe, apply and status do I/O.
pub mod apply;
pub mod autoscale;
pub mod build;
pub mod config;
pub mod controller;
pub mod decide;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod signals;
pub mod status;
pub mod validate;

mod fixtures;
