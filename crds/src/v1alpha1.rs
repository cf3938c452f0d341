//! `kestrel.dev/v1alpha1`: the `ModelDeployment` kind.
//!
//! Field docs here are the `kubectl explain` text. Validation that the API server can
//! do (types, enums, bounds, cross-field rules in CEL) lives here, so a bad spec is
//! refused at admission; what only the operator can check becomes a condition.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Kestrel kind.
pub const GROUP: &str = "kestrel.dev";
/// Most variants a ModelDeployment may list (bounds the CEL rules' cost).
pub const MAX_VARIANTS: usize = 8;

/// A served model: which weights, at which precisions and on which accelerators it may
/// run, the latency it must hold, and what it may cost. Kestrel runs one Deployment per
/// active variant behind one Service, scales replicas from queue depth and p95 latency,
/// and picks the variant that meets the latency target at the lowest cost.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kestrel.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    category = "kestrel",
    namespaced,
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A served model with its variants, latency target, budget and scaling bounds.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready", description = "ready/desired replicas"),
    printcolumn(name = "Variant", type_ = "string", json_path = ".status.activeVariant", description = "the variant the fleet runs or converges to"),
    printcolumn(name = "P95(ms)", type_ = "integer", json_path = ".status.signals.p95LatencyMs", description = "observed p95 request latency"),
    printcolumn(name = "Queue", type_ = "number", json_path = ".status.signals.queueDepth", description = "requests waiting or running across ready replicas"),
    printcolumn(name = "Cost/h", type_ = "string", json_path = ".status.costPerHour", description = "cost per hour of the replicas that exist now"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", description = "why Ready is what it is"),
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: it prefixes the names of the Deployments and pods Kestrel creates")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.replicas) || !self.scaling.enabled || self.replicas >= self.scaling.minReplicas && self.replicas <= self.scaling.maxReplicas").message("spec.replicas must lie within [spec.scaling.minReplicas, spec.scaling.maxReplicas] while scaling is enabled (or disable scaling to set it freely)"))]
pub struct ModelDeploymentSpec {
    /// The model to serve and where its weights are.
    pub model: ModelSpec,

    /// The same model at different precisions, each with the accelerator it needs and
    /// what it costs, in order of preference. Kestrel runs the cheapest variant that
    /// meets the latency target within the budget (the first one when scaling is off).
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(validation = Rule::new("self.all(v, self.exists_one(w, w.name == v.name))").message("spec.variants: variant names must be unique"))]
    pub variants: Vec<VariantSpec>,

    /// The latency the model must hold.
    pub slo: SloSpec,

    /// How Kestrel scales replicas.
    #[serde(default)]
    pub scaling: ScalingSpec,

    /// Limits on cost and quality loss, and which gives way when they conflict with the SLO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,

    /// Where worker pods may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,

    /// The inference worker container.
    #[serde(default)]
    pub worker: WorkerSpec,

    /// Replicas to run when `scaling.enabled` is false (what `kubectl scale` sets).
    /// Ignored while scaling is enabled. Defaults to `scaling.minReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
}

/// The model to serve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Model name as clients send it in requests' `model` field (e.g. `all-MiniLM-L6-v2`).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// What the model does: `embeddings` or `text-generation`.
    pub task: Task,
    /// Where the weights are. Mounted read-only into every worker pod.
    pub source: ModelSource,
}

/// What a model does; decides the worker's route and which precisions it can serve.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// OpenAI-compatible `/v1/embeddings`.
    Embeddings,
    /// OpenAI-compatible `/v1/completions` and `/v1/chat/completions`.
    TextGeneration,
}

/// Where a model's weights are. Exactly one of `persistentVolumeClaim` or `hostPath`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.persistentVolumeClaim) != has(self.hostPath)").message("spec.model.source: set exactly one of persistentVolumeClaim or hostPath"))]
pub struct ModelSource {
    /// A PersistentVolumeClaim in the same namespace holding the model folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcSource>,
    /// A folder on the node (for single-node and development clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
}

/// A model folder inside a PersistentVolumeClaim.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the claim, in the ModelDeployment's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Folder inside the volume that holds the model files (`config.json`, weights, tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub sub_path: Option<String>,
}

/// A model folder on the node's filesystem.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute path of the model folder on the node.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("spec.model.source.hostPath.path must be an absolute path"))]
    pub path: String,
}

/// One precision of the model, with the accelerator it runs on and its price.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VariantSpec {
    /// Short name, unique in this ModelDeployment; part of the Deployment name and the
    /// `kestrel.dev/variant` label (lowercase letters, digits and '-', at most 20).
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Numeric precision of the weights the worker loads.
    pub precision: Precision,
    /// What the variant runs on.
    #[serde(default)]
    pub accelerator: AcceleratorSpec,
    /// Price of one replica per hour, as a decimal string (e.g. "2.50"). Overrides the
    /// operator's price table for this variant's accelerator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(\.[0-9]{1,4})?$"))]
    pub price_per_hour: Option<String>,
    /// Quality loss against the full-precision reference, in [0, 1]: 1 − the minimum
    /// cosine similarity on the worker's fixed sentence set, as `kestrel-worker profile`
    /// measures it. Compared with `budget.maxQualityLoss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub quality_loss: Option<f64>,
}

/// Numeric precision of a variant's weights.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4KM,
}

impl Precision {
    /// The spelling used in specs, labels and worker flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Q8_0 => "q8_0",
            Precision::Q4_0 => "q4_0",
            Precision::Q4KM => "q4_k_m",
        }
    }

    /// Whether the bundled worker can serve this precision for `task`.
    pub fn serves(self, task: Task) -> bool {
        match task {
            // The worker's encoder variants: f32/f16/bf16 (candle) and 8-bit (ONNX
            // Runtime). q4_0 loses too much (cosine 0.95); k-quants need rows
            // divisible by 256, which 384-wide layers are not.
            Task::Embeddings => !matches!(self, Precision::Q4_0 | Precision::Q4KM),
            // GGUF decoders: every precision the worker's converter produces.
            Task::TextGeneration => !matches!(self, Precision::F32 | Precision::Bf16),
        }
    }
}

/// What a variant runs on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'nvidia' || (!has(self.count) && (!has(self.products) || size(self.products) == 0) && !has(self.migProfile))").message("accelerator: count, products and migProfile apply only to kind nvidia"))]
pub struct AcceleratorSpec {
    /// `cpu` (default) or `nvidia`.
    #[serde(default)]
    pub kind: AcceleratorKind,
    /// GPUs per replica (kind nvidia; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub count: Option<i32>,
    /// Acceptable GPU products (the `nvidia.com/gpu.product` node label), most preferred
    /// first. Pods may only land on these; the scheduler prefers earlier ones. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub products: Vec<String>,
    /// MIG profile (e.g. `1g.10gb`): requests `nvidia.com/mig-<profile>` instead of whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+g\.[0-9]+gb$"))]
    pub mig_profile: Option<String>,
}

/// Kind of accelerator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorKind {
    #[default]
    Cpu,
    Nvidia,
}

/// The latency target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// Target p95 latency in milliseconds (of the metric `latencyMetric` names).
    #[schemars(range(min = 1, max = 600000))]
    pub p95_latency_ms: i32,
    /// Requests waiting or running per ready replica that Kestrel aims for.
    #[serde(default = "default_queue_target")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_queue_depth_per_replica: i32,
    /// Which latency the target applies to: `requestDuration` (default) or
    /// `timeToFirstToken` (text generation).
    #[serde(default)]
    pub latency_metric: LatencyMetric,
}

fn default_queue_target() -> i32 {
    8
}

/// Which latency an SLO measures.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum LatencyMetric {
    #[default]
    RequestDuration,
    TimeToFirstToken,
}

/// How replicas are scaled.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("spec.scaling.minReplicas must be less than or equal to spec.scaling.maxReplicas"))]
pub struct ScalingSpec {
    /// When false, Kestrel runs `spec.replicas` of the first variant and never scales.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Fewest replicas while scaling is enabled.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas while scaling is enabled.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Replicas are removed only when no higher recommendation was seen in this window.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: i32,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            scale_down_delay_seconds: default_scale_down_delay(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    10
}
fn default_scale_down_delay() -> i32 {
    300
}

/// Limits on cost and quality.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    /// Most the fleet may cost per hour, as a decimal string (e.g. "12.00").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(\.[0-9]{1,4})?$"))]
    pub max_cost_per_hour: Option<String>,
    /// Largest quality loss a variant may have to be chosen, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_quality_loss: Option<f64>,
    /// What gives way when the latency target cannot be met within `maxCostPerHour`:
    /// `HoldSlo` (default: exceed the budget, say so) or `HoldBudget` (cap the fleet,
    /// accept higher latency, say so).
    #[serde(default)]
    pub on_conflict: ConflictPolicy,
}

/// Which of budget and SLO gives way when both cannot hold.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConflictPolicy {
    #[default]
    HoldSlo,
    HoldBudget,
}

/// Where worker pods may run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Node labels every worker pod requires.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Extra tolerations (GPU variants always tolerate `nvidia.com/gpu:NoSchedule`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity merged with the GPU product affinity Kestrel derives from the variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// RuntimeClass of worker pods (e.g. `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
}

/// The inference worker container.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Worker image. Defaults to the operator's `--worker-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Port the worker serves on (API, health, readiness and metrics).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,
    /// Most requests per executed batch.
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: i32,
    /// Most requests waiting per replica; beyond it the worker answers 429.
    #[serde(default = "default_max_queue")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_queue: i32,
    /// CPU and memory for each worker container (GPU requests come from the variant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra arguments appended to the worker's command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            port: default_port(),
            max_batch_size: default_max_batch(),
            max_queue: default_max_queue(),
            resources: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

fn default_port() -> i32 {
    i32::from(crate::contract::DEFAULT_WORKER_PORT)
}
fn default_max_batch() -> i32 {
    32
}
fn default_max_queue() -> i32 {
    256
}

/// Image pull policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// What Kestrel observed and decided. Written only by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Worker pods that exist, all variants.
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods that are Ready, all variants.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Worker pods Kestrel wants, all variants.
    #[serde(default)]
    pub desired_replicas: i32,
    /// "ready/desired", for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Replica counts per variant that has, or should have, pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantStatus>,
    /// The variant the fleet runs, or converges to during a switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_variant: Option<String>,
    /// Label selector of all worker pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Serving signals read from Prometheus at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<ObservedSignals>,
    /// Cost per hour of the replicas that exist now (decimal string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_hour: Option<String>,
    /// Cost per hour once the last decision is carried out (decimal string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected_cost_per_hour: Option<String>,
    /// The last decision that changed replicas or variant, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<LastDecision>,
    /// The autoscaler's memory of recent recommendations (kept here so it survives
    /// operator restarts). Opaque to users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub policy_memory: Option<serde_json::Value>,
    /// Ready, Progressing, Degraded, MetricsAvailable, VariantSelected,
    /// BudgetConstrained, ScalingLimited.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Replica counts of one variant.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VariantStatus {
    pub name: String,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub desired_replicas: i32,
}

/// Serving signals at one evaluation.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObservedSignals {
    /// p95 latency in milliseconds over the evaluation window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_latency_ms: Option<i64>,
    /// Requests waiting or running, summed over ready replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<f64>,
    /// Requests per second arriving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<f64>,
    /// When the signals were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

/// A decision that changed the fleet.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastDecision {
    pub time: Time,
    /// Machine-readable reason (CamelCase), e.g. `QueueDepthHigh`.
    pub reason: String,
    /// What was decided and why, for people.
    pub message: String,
    /// Total desired replicas before and after.
    pub from_replicas: i32,
    pub to_replicas: i32,
    /// The variant the fleet converges to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The policy's predicted p95 (ms) after the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_p95_ms: Option<i64>,
}
