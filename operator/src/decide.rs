//! decide: how many replicas of which variant, and why. Pure: a function of the valid
//! spec, what was observed, the policy's memory and `now`.

use std::collections::BTreeMap;

use crate::observe::Observed;
use crate::validate::ValidDeployment;

/// What the fleet should look like after this reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Desired replicas per variant that should have a Deployment (a variant switch
    /// keeps the old variant here until the new one is Ready).
    pub replicas: BTreeMap<String, i32>,
    /// The variant the fleet runs or converges to.
    pub target_variant: String,
    /// Machine-readable reason (CamelCase).
    pub reason: String,
    /// What was decided and why, for people.
    pub message: String,
    pub predicted_p95_ms: Option<f64>,
    pub projected_cost_per_hour: f64,
    /// Whether the signals the decision needs were there (None: not needed).
    pub metrics_available: Option<Result<(), String>>,
    /// Why the fleet is held below what the signals ask for, if it is.
    pub scaling_limited: Option<(String, String)>,
    /// Budget conflict and how it was resolved, if there is one.
    pub budget_constrained: Option<(String, String)>,
    /// The policy's memory to keep in status.
    pub memory: Option<serde_json::Value>,
}

impl Plan {
    pub fn total(&self) -> i32 {
        self.replicas.values().sum()
    }
}

/// Decides the fleet. Scaling disabled: the first variant at the fixed replica count.
pub fn decide(
    md: &ValidDeployment,
    observed: &Observed,
    memory: Option<&serde_json::Value>,
    now: f64,
    profiles: &crate::autoscale::Profiles,
) -> Plan {
    if !md.scaling.enabled {
        return fixed(md, observed);
    }
    crate::autoscale::decide(md, observed, memory, now, profiles)
}

fn fixed(md: &ValidDeployment, observed: &Observed) -> Plan {
    let variant = &md.variants[0];
    let replicas = BTreeMap::from([(variant.name.clone(), md.scaling.fixed_replicas)]);
    let current: i32 = observed.deployments.values().map(|d| d.spec_replicas).sum();
    let scaling_limited = unschedulable(observed).map(|m| ("Unschedulable".to_owned(), m));
    Plan {
        projected_cost_per_hour: md.cost_per_hour(&replicas),
        message: format!(
            "scaling is disabled: running {} replica(s) of variant {} as spec.replicas says (was {current})",
            md.scaling.fixed_replicas, variant.name
        ),
        replicas,
        target_variant: variant.name.clone(),
        reason: "ScalingDisabled".into(),
        predicted_p95_ms: None,
        metrics_available: None,
        scaling_limited,
        budget_constrained: None,
        memory: None,
    }
}

/// The scheduler's message for the first worker pod it cannot place, if any.
pub fn unschedulable(observed: &Observed) -> Option<String> {
    observed.pod_problems.iter().find_map(|p| match p {
        crate::observe::PodProblem::Unschedulable { message, .. } => Some(message.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PriceTable;
    use crate::fixtures::md;
    use crate::validate::validate;

    #[test]
    fn scaling_disabled_runs_spec_replicas_of_the_first_variant() {
        let mut m = md("minilm");
        m.spec.scaling.enabled = false;
        m.spec.replicas = Some(3);
        m.spec.variants.push(crate::fixtures::variant(
            "q8",
            kestrel_crds::v1alpha1::Precision::Q8_0,
        ));
        let v = validate(&m, Some("w:1"), &PriceTable::default()).unwrap();
        let plan = decide(&v, &Observed::default(), None, 0.0, &Default::default());
        assert_eq!(plan.replicas, BTreeMap::from([("f32".to_owned(), 3)]));
        assert_eq!(plan.reason, "ScalingDisabled");
        assert!((plan.projected_cost_per_hour - 0.30).abs() < 1e-9);
    }
}
