//! The bridge between the operator's view and kestrel-policy's pure decision.

use std::collections::BTreeMap;

use crate::decide::Plan;
use crate::observe::Observed;
use crate::validate::ValidDeployment;

/// Placeholder until kestrel-policy's decide() is wired in: hold min replicas.
pub fn decide(
    md: &ValidDeployment,
    observed: &Observed,
    _memory: Option<&serde_json::Value>,
    _now: f64,
) -> Plan {
    let variant = &md.variants[0];
    let replicas = BTreeMap::from([(variant.name.clone(), md.scaling.min_replicas)]);
    Plan {
        projected_cost_per_hour: md.cost_per_hour(&replicas),
        replicas,
        target_variant: variant.name.clone(),
        reason: "MinReplicas".into(),
        message: format!(
            "holding {} replica(s) of {}",
            md.scaling.min_replicas, variant.name
        ),
        predicted_p95_ms: None,
        metrics_available: None,
        scaling_limited: crate::decide::unschedulable(observed)
            .map(|m| ("Unschedulable".to_owned(), m)),
        budget_constrained: None,
        memory: None,
    }
}
