//! The ModelDeployment API.
