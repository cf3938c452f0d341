//! validate: the raw spec → a typed [`ValidDeployment`] that every later step builds from.
//!
//! Admission (OpenAPI + CEL) already refused what the API server can check; this step
//! checks what needs the operator's knowledge (which precisions a task can serve, the
//! price table, the default image). Pure: no I/O, nothing re-reads the raw spec after it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use kestrel_crds::ModelDeployment;
use kestrel_crds::v1alpha1::{
    AcceleratorKind, ConflictPolicy, LatencyMetric, ModelSource, PlacementSpec, Precision,
    PullPolicy, Task,
};
use kube::ResourceExt;

use crate::config::PriceTable;

/// A ModelDeployment whose spec the operator can act on.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidDeployment {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub generation: Option<i64>,
    pub model_name: String,
    pub task: Task,
    pub source: WeightSource,
    /// In the spec's order, which is the order of preference.
    pub variants: Vec<ValidVariant>,
    pub slo: Slo,
    pub scaling: Scaling,
    pub budget: Budget,
    pub placement: PlacementSpec,
    pub worker: Worker,
}

/// Where the weights are mounted from.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightSource {
    Pvc {
        claim_name: String,
        sub_path: Option<String>,
    },
    HostPath {
        path: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValidVariant {
    pub name: String,
    pub precision: Precision,
    pub accelerator: Accelerator,
    /// Price of one replica per hour.
    pub price_per_hour: f64,
    pub quality_loss: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Accelerator {
    Cpu,
    Nvidia {
        count: i32,
        products: Vec<String>,
        mig_profile: Option<String>,
    },
}

impl Accelerator {
    pub fn is_gpu(&self) -> bool {
        matches!(self, Accelerator::Nvidia { .. })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    pub p95_latency_ms: f64,
    pub target_queue_per_replica: f64,
    pub latency_metric: LatencyMetric,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scaling {
    pub enabled: bool,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub scale_down_delay_seconds: i32,
    /// Replicas to hold while scaling is disabled.
    pub fixed_replicas: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub max_cost_per_hour: Option<f64>,
    pub max_quality_loss: Option<f64>,
    pub on_conflict: ConflictPolicy,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Worker {
    pub image: String,
    pub pull_policy: Option<PullPolicy>,
    pub port: i32,
    pub max_batch_size: i32,
    pub max_queue: i32,
    pub resources: Option<ResourceRequirements>,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
}

/// A spec the operator cannot act on. Each message names the field and what is allowed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SpecError {
    #[error(
        "spec.variants[{index}].precision: {precision} cannot serve task {task}; allowed: {allowed}"
    )]
    UnsupportedPrecision {
        index: usize,
        precision: &'static str,
        task: &'static str,
        allowed: String,
    },
    #[error(
        "spec.worker.image is not set and the operator has no default worker image (--worker-image)"
    )]
    MissingImage,
    #[error("{field}: {value:?} is not a decimal amount")]
    BadAmount { field: String, value: String },
    #[error("spec.variants: at least one variant is required")]
    NoVariants,
    #[error(
        "spec.scaling.minReplicas ({min}) must be less than or equal to spec.scaling.maxReplicas ({max})"
    )]
    MinAboveMax { min: i32, max: i32 },
}

/// Checks a ModelDeployment and turns it into the typed value later steps build from.
pub fn validate(
    md: &ModelDeployment,
    default_image: Option<&str>,
    prices: &PriceTable,
) -> Result<ValidDeployment, SpecError> {
    let spec = &md.spec;
    if spec.variants.is_empty() {
        return Err(SpecError::NoVariants);
    }
    if spec.scaling.min_replicas > spec.scaling.max_replicas {
        return Err(SpecError::MinAboveMax {
            min: spec.scaling.min_replicas,
            max: spec.scaling.max_replicas,
        });
    }
    let variants = spec
        .variants
        .iter()
        .enumerate()
        .map(|(index, v)| {
            if !v.precision.serves(spec.model.task) {
                return Err(SpecError::UnsupportedPrecision {
                    index,
                    precision: v.precision.as_str(),
                    task: task_str(spec.model.task),
                    allowed: allowed_precisions(spec.model.task),
                });
            }
            let accelerator = match v.accelerator.kind {
                AcceleratorKind::Cpu => Accelerator::Cpu,
                AcceleratorKind::Nvidia => Accelerator::Nvidia {
                    count: v.accelerator.count.unwrap_or(1),
                    products: v.accelerator.products.clone(),
                    mig_profile: v.accelerator.mig_profile.clone(),
                },
            };
            let price_per_hour = match &v.price_per_hour {
                Some(p) => parse_amount(&format!("spec.variants[{index}].pricePerHour"), p)?,
                None => prices.replica_price(&accelerator),
            };
            Ok(ValidVariant {
                name: v.name.clone(),
                precision: v.precision,
                accelerator,
                price_per_hour,
                quality_loss: v.quality_loss,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let image = spec
        .worker
        .image
        .clone()
        .or_else(|| default_image.map(str::to_owned))
        .ok_or(SpecError::MissingImage)?;
    let budget = spec.budget.clone().unwrap_or_default();
    let max_cost_per_hour = budget
        .max_cost_per_hour
        .as_deref()
        .map(|v| parse_amount("spec.budget.maxCostPerHour", v))
        .transpose()?;

    Ok(ValidDeployment {
        name: md.name_any(),
        namespace: md.namespace().unwrap_or_default(),
        uid: md.uid().unwrap_or_default(),
        generation: md.metadata.generation,
        model_name: spec.model.name.clone(),
        task: spec.model.task,
        source: match &spec.model.source {
            ModelSource {
                persistent_volume_claim: Some(pvc),
                ..
            } => WeightSource::Pvc {
                claim_name: pvc.claim_name.clone(),
                sub_path: pvc.sub_path.clone(),
            },
            ModelSource {
                host_path: Some(hp),
                ..
            } => WeightSource::HostPath {
                path: hp.path.clone(),
            },
            // Admission refuses a source with neither; an older CRD might not have.
            ModelSource { .. } => WeightSource::HostPath {
                path: "/models".into(),
            },
        },
        variants,
        slo: Slo {
            p95_latency_ms: f64::from(spec.slo.p95_latency_ms),
            target_queue_per_replica: f64::from(spec.slo.target_queue_depth_per_replica),
            latency_metric: spec.slo.latency_metric,
        },
        scaling: Scaling {
            enabled: spec.scaling.enabled,
            min_replicas: spec.scaling.min_replicas,
            max_replicas: spec.scaling.max_replicas,
            scale_down_delay_seconds: spec.scaling.scale_down_delay_seconds,
            fixed_replicas: spec.replicas.unwrap_or(spec.scaling.min_replicas),
        },
        budget: Budget {
            max_cost_per_hour,
            max_quality_loss: budget.max_quality_loss,
            on_conflict: budget.on_conflict,
        },
        placement: spec.placement.clone().unwrap_or_default(),
        worker: Worker {
            image,
            pull_policy: spec.worker.image_pull_policy,
            port: spec.worker.port,
            max_batch_size: spec.worker.max_batch_size,
            max_queue: spec.worker.max_queue,
            resources: spec.worker.resources.clone(),
            args: spec.worker.args.clone(),
            env: spec.worker.env.clone(),
        },
    })
}

impl ValidDeployment {
    pub fn variant(&self, name: &str) -> Option<&ValidVariant> {
        self.variants.iter().find(|v| v.name == name)
    }

    /// Cost per hour of a fleet given replicas per variant.
    pub fn cost_per_hour(&self, replicas: &BTreeMap<String, i32>) -> f64 {
        replicas
            .iter()
            .filter_map(|(name, n)| self.variant(name).map(|v| v.price_per_hour * f64::from(*n)))
            .sum()
    }
}

pub fn task_str(task: Task) -> &'static str {
    match task {
        Task::Embeddings => "embeddings",
        Task::TextGeneration => "text-generation",
    }
}

fn allowed_precisions(task: Task) -> String {
    const ALL: [Precision; 6] = [
        Precision::F32,
        Precision::F16,
        Precision::Bf16,
        Precision::Q8_0,
        Precision::Q4_0,
        Precision::Q4KM,
    ];
    ALL.iter()
        .filter(|p| p.serves(task))
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_amount(field: &str, value: &str) -> Result<f64, SpecError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| SpecError::BadAmount {
            field: field.into(),
            value: value.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{md, variant};

    fn prices() -> PriceTable {
        PriceTable::from_pairs([
            ("cpu", 0.10),
            ("nvidia", 2.0),
            ("NVIDIA-H100-80GB-HBM3", 4.0),
        ])
    }

    #[test]
    fn a_precision_the_task_cannot_serve_names_the_variant_field() {
        let mut m = md("minilm");
        m.spec.variants.push(variant("k4", Precision::Q4KM));
        let err = validate(&m, Some("w:1"), &prices()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.variants[1].precision: q4_k_m cannot serve task embeddings; allowed: f32, f16, bf16, q8_0"
        );
    }

    #[test]
    fn a_missing_image_without_an_operator_default_is_refused() {
        let m = md("minilm");
        assert_eq!(validate(&m, None, &prices()), Err(SpecError::MissingImage));
        let mut m = md("minilm");
        m.spec.worker.image = Some("own:2".into());
        assert_eq!(validate(&m, None, &prices()).unwrap().worker.image, "own:2");
    }

    #[test]
    fn prices_come_from_the_variant_then_the_product_then_the_kind() {
        let mut m = md("minilm");
        let mut gpu = variant("h100", Precision::F16);
        gpu.accelerator.kind = AcceleratorKind::Nvidia;
        gpu.accelerator.products = vec!["NVIDIA-H100-80GB-HBM3".into()];
        let mut other = variant("l4", Precision::F16);
        other.accelerator.kind = AcceleratorKind::Nvidia;
        other.accelerator.products = vec!["NVIDIA-L4".into()];
        let mut priced = variant("own", Precision::Q8_0);
        priced.price_per_hour = Some("0.35".into());
        m.spec.variants.extend([gpu, other, priced]);
        let v = validate(&m, Some("w:1"), &prices()).unwrap();
        let got: Vec<f64> = v.variants.iter().map(|v| v.price_per_hour).collect();
        assert_eq!(got, vec![0.10, 4.0, 2.0, 0.35]);
    }

    #[test]
    fn a_budget_amount_that_is_not_a_number_names_the_field() {
        let mut m = md("minilm");
        m.spec.budget = Some(kestrel_crds::v1alpha1::BudgetSpec {
            max_cost_per_hour: Some("lots".into()),
            ..Default::default()
        });
        assert_eq!(
            validate(&m, Some("w:1"), &prices())
                .unwrap_err()
                .to_string(),
            "spec.budget.maxCostPerHour: \"lots\" is not a decimal amount"
        );
    }

    #[test]
    fn replicas_default_to_min_replicas_when_scaling_is_off() {
        let mut m = md("minilm");
        m.spec.scaling.enabled = false;
        m.spec.scaling.min_replicas = 2;
        assert_eq!(
            validate(&m, Some("w:1"), &prices())
                .unwrap()
                .scaling
                .fixed_replicas,
            2
        );
        m.spec.replicas = Some(5);
        assert_eq!(
            validate(&m, Some("w:1"), &prices())
                .unwrap()
                .scaling
                .fixed_replicas,
            5
        );
    }
}
