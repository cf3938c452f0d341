//! kestrel-operator: turns ModelDeployments into GPU-scheduled worker Deployments and
//! tells the truth about them in status.
//!
//! Reconcile is a named pipeline, one module per step: [`observe`] → [`validate`] →
//! [`decide`] → [`build`] → [`apply`] → [`status`]. Apply and status write to the API
//! server; observe reads the [`cache`] of owned objects and the serving signals.
pub mod apply;
pub mod autoscale;
pub mod build;
pub mod cache;
pub mod config;
pub mod controller;
pub mod decide;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod signals;
pub mod status;
pub mod validate;

mod fixtures;
