//! Small builders for unit tests.
#![cfg(test)]

use kestrel_crds::ModelDeployment;
use std::collections::BTreeMap;

use kestrel_crds::v1alpha1::*;

pub fn variant(name: &str, precision: Precision) -> VariantSpec {
    VariantSpec {
        name: name.into(),
        precision,
        accelerator: AcceleratorSpec::default(),
        price_per_hour: None,
        quality_loss: None,
    }
}

pub fn gpu_variant(name: &str, precision: Precision, count: i32, products: &[&str]) -> VariantSpec {
    let mut v = variant(name, precision);
    v.accelerator = AcceleratorSpec {
        kind: AcceleratorKind::Nvidia,
        count: Some(count),
        products: products.iter().map(|p| p.to_string()).collect(),
        mig_profile: None,
    };
    v
}

/// An embeddings ModelDeployment in namespace `ns` with one f32 CPU variant.
pub fn md(name: &str) -> ModelDeployment {
    let mut md = ModelDeployment::new(
        name,
        ModelDeploymentSpec {
            model: ModelSpec {
                name: "all-MiniLM-L6-v2".into(),
                task: Task::Embeddings,
                source: ModelSource {
                    persistent_volume_claim: None,
                    host_path: Some(HostPathSource {
                        path: "/var/lib/models/minilm".into(),
                    }),
                },
            },
            variants: vec![variant("f32", Precision::F32)],
            slo: SloSpec {
                p95_latency_ms: 200,
                target_queue_depth_per_replica: 8,
                latency_metric: LatencyMetric::RequestDuration,
            },
            scaling: ScalingSpec::default(),
            budget: None,
            placement: None,
            worker: WorkerSpec::default(),
            replicas: None,
        },
    );
    md.metadata.namespace = Some("ns".into());
    md.metadata.uid = Some("uid-1".into());
    md.metadata.generation = Some(1);
    md
}

/// A plan with the given replicas per variant; the first variant is the target.
pub fn plan(replicas: &[(&str, i32)]) -> crate::decide::Plan {
    crate::decide::Plan {
        replicas: replicas
            .iter()
            .map(|(v, n)| (v.to_string(), *n))
            .collect::<BTreeMap<_, _>>(),
        target_variant: replicas[0].0.into(),
        reason: "Test".into(),
        message: String::new(),
        predicted_p95_ms: None,
        projected_cost_per_hour: 0.0,
        metrics_available: None,
        scaling_limited: None,
        budget_constrained: None,
        memory: None,
    }
}
