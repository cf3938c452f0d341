//! The ModelDeployment API (`kestrel.dev/v1alpha1`) and the worker <-> operator contract.
pub mod contract;
