//! Harness for tests against a real Kubernetes cluster.
//!
//! Every test gets its own namespace and its own operator process watching only that
//! namespace, so tests run in parallel without sharing state. The cluster is whatever
//! `KUBECONFIG` names (the local cluster's `e2e/cluster/env` sets it); without one the
//! tests fail loudly rather than skip.

pub mod load;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Event, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kestrel_crds::ModelDeployment;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use tokio::process::{Child, Command};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The operator binary the tests run (built by the test command before the tests).
pub fn operator_bin() -> PathBuf {
    std::env::var_os("KESTREL_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/kestrel-operator"))
}

/// kubectl: $KUBECTL, else the local cluster's, else the one on PATH.
pub fn kubectl_bin() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL") {
        return k.into();
    }
    let local = repo_root().join("e2e/cluster/.build/bin/kubectl");
    if local.exists() {
        local
    } else {
        "kubectl".into()
    }
}

/// A client for the cluster KUBECONFIG names; fails with a clear message without one.
pub async fn client() -> Result<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        bail!(
            "KUBECONFIG is not set: these tests need a cluster. Run `e2e/cluster/up` and \
             `source e2e/cluster/env`, or point KUBECONFIG at any conformant cluster"
        );
    }
    Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("failed to build a client from KUBECONFIG: {e:?}"))
}

/// Installs (server-side applies) the ModelDeployment CRD and waits until it is served.
pub async fn install_crd(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = ModelDeployment::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("kestrel-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(|e| anyhow::anyhow!("failed to apply the ModelDeployment CRD: {e:?}"))?;
    wait_for(
        "the CRD to be Established",
        Duration::from_secs(30),
        || async {
            let c = crds.get(&crd.name_any()).await?;
            Ok(c.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"))
        },
    )
    .await
}

/// Polls `check` every 500 ms until it says true or `timeout` passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last_err = None;
    while start.elapsed() < timeout {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match last_err {
        Some(e) => bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}"),
        None => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// One test's namespace, with an operator watching only it. Dropping it stops the
/// operator and deletes the namespace.
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
    operator: Option<Child>,
}

impl TestNamespace {
    /// Creates `kestrel-e2e-<test>-<unique>` and installs the CRD.
    pub async fn new(test: &str) -> Result<Self> {
        let client = client().await?;
        install_crd(&client).await?;
        let unique = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .subsec_nanos()
                ^ std::process::id()
        );
        let name: String = format!("e2e-{test}-{unique}")
            .chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches('-')
            .into();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"kestrel.dev/e2e": "true"}}
        }))?;
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("failed to create namespace {name}"))?;
        Ok(Self {
            client,
            name,
            operator: None,
        })
    }

    /// Starts the operator binary watching only this namespace, with `extra` flags.
    pub fn start_operator(&mut self, extra: &[&str]) -> Result<()> {
        let bin = operator_bin();
        if !bin.exists() {
            bail!(
                "{} does not exist: build it first (`cargo build -p kestrel-operator`)",
                bin.display()
            );
        }
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("{}-operator.log", self.name)),
        )?;
        let mut cmd = Command::new(bin);
        cmd.args(["--watch-namespaces", &self.name, "--leader-election=false"]);
        if !extra.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--evaluation-interval-seconds") {
            cmd.args(["--evaluation-interval-seconds", "2"]);
        }
        let child = cmd
            .args(extra)
            .env("KESTREL_LOG_LEVEL", "info,kube=warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("failed to start the operator")?;
        self.operator = Some(child);
        Ok(())
    }

    /// A route of a Service in this namespace, through its ClusterIP.
    pub async fn service_url(&self, service: &str, route: &str) -> Result<String> {
        let services: Api<k8s_openapi::api::core::v1::Service> = self.api();
        let spec = services
            .get(service)
            .await?
            .spec
            .context("a Service has a spec")?;
        let ip = spec.cluster_ip.context("the Service has no ClusterIP")?;
        Ok(format!(
            "http://{ip}:{}{route}",
            kestrel_crds::contract::DEFAULT_WORKER_PORT
        ))
    }

    /// The embeddings route of a Service in this namespace, through its ClusterIP.
    pub async fn embeddings_url(&self, service: &str) -> Result<String> {
        self.service_url(service, "/v1/embeddings").await
    }

    /// The embeddings route once it answers: Ready pods reach kube-proxy's rules a moment
    /// after the API says Ready, so a load test starts only when a request gets through.
    pub async fn serving_url(&self, service: &str) -> Result<String> {
        let body = serde_json::json!({"model": "all-MiniLM-L6-v2", "input": "ping"});
        self.answering_url(service, "/v1/embeddings", &body).await
    }

    /// The completions route of a text-generation Service once it answers (as
    /// [`TestNamespace::serving_url`]).
    pub async fn completions_url(&self, service: &str) -> Result<String> {
        let body = serde_json::json!({"prompt": "ping", "max_tokens": 1});
        self.answering_url(service, "/v1/completions", &body).await
    }

    /// `route` of `service` once a POST of `body` to it succeeds.
    async fn answering_url(
        &self,
        service: &str,
        route: &str,
        body: &serde_json::Value,
    ) -> Result<String> {
        let url = self.service_url(service, route).await?;
        let client = reqwest::Client::new();
        let body = body.to_string();
        wait_for("the Service to answer", Duration::from_secs(30), || {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            async move {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await?;
                Ok(resp.status().is_success())
            }
        })
        .await?;
        Ok(url)
    }

    /// Stops the operator this namespace started (SIGKILL, as when its pod is lost) and
    /// waits until it is gone.
    pub async fn stop_operator(&mut self) -> Result<()> {
        if let Some(mut child) = self.operator.take() {
            child.kill().await.context("failed to stop the operator")?;
        }
        Ok(())
    }

    /// Sends SIGTERM to the operator this namespace started and waits up to `within`
    /// for it to exit; returns its exit status.
    pub async fn terminate_operator(
        &mut self,
        within: Duration,
    ) -> Result<std::process::ExitStatus> {
        let child = self
            .operator
            .as_mut()
            .context("the operator is not running")?;
        let pid = child.id().context("the operator has already exited")?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(within, child.wait())
            .await
            .with_context(|| format!("the operator did not exit within {within:?} of SIGTERM"))??;
        self.operator = None;
        Ok(status)
    }

    /// PID of the operator this namespace started.
    pub fn operator_pid(&self) -> Option<u32> {
        self.operator.as_ref()?.id()
    }

    pub fn operator_log(&self) -> String {
        std::fs::read_to_string(std::env::temp_dir().join(format!("{}-operator.log", self.name)))
            .unwrap_or_default()
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Applies a ModelDeployment given as YAML (its namespace is set to this one).
    pub async fn apply_yaml(&self, yaml: &str) -> Result<ModelDeployment> {
        let mut md: ModelDeployment =
            serde_yaml::from_str(yaml).context("test YAML does not parse")?;
        md.metadata.namespace = Some(self.name.clone());
        let api: Api<ModelDeployment> = self.api();
        Ok(api
            .patch(
                &md.name_any(),
                &PatchParams::apply("kestrel-e2e").force(),
                &Patch::Apply(&md),
            )
            .await?)
    }

    /// Waits until the named ModelDeployment is Ready with fresh metrics (what a
    /// scaling test needs before its load starts).
    pub async fn wait_ready_with_metrics(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<ModelDeployment> {
        self.wait_md(name, "Ready with fresh metrics", timeout, |md| {
            condition(md, "Ready").is_some_and(|c| c.status == "True")
                && condition(md, "MetricsAvailable").is_some_and(|c| c.status == "True")
        })
        .await
    }

    /// Waits until the named ModelDeployment's status records a scale-up decision and
    /// returns that status; an error if the decision's reason is not a scale-up one.
    pub async fn wait_scale_up(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<kestrel_crds::ModelDeploymentStatus> {
        let md = self
            .wait_md(name, "the scale-up in status", timeout, |md| {
                md.status
                    .as_ref()
                    .and_then(|s| s.last_decision.as_ref())
                    .is_some_and(|d| d.to_replicas > 1)
            })
            .await?;
        let status = md.status.context("a status")?;
        let reason = status
            .last_decision
            .as_ref()
            .map(|d| d.reason.clone())
            .unwrap_or_default();
        anyhow::ensure!(
            reason.starts_with("ScaleUp") || reason == "MaxReplicas",
            "the scale-up's reason is {reason}"
        );
        Ok(status)
    }

    /// Waits until the named ModelDeployment satisfies `pred`.
    pub async fn wait_md<P>(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: P,
    ) -> Result<ModelDeployment>
    where
        P: Fn(&ModelDeployment) -> bool,
    {
        let api: Api<ModelDeployment> = self.api();
        let start = Instant::now();
        loop {
            let md = api.get(name).await?;
            if pred(&md) {
                return Ok(md);
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; status: {}\n--- events:\n{}\n--- operator log (tail):\n{}",
                    serde_json::to_string_pretty(&md.status).unwrap_or_default(),
                    self.events().await.unwrap_or_default(),
                    tail(&self.operator_log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Events in this namespace, oldest first, one per line.
    pub async fn events(&self) -> Result<String> {
        let api: Api<Event> = self.api();
        let mut evs = api.list(&ListParams::default()).await?.items;
        evs.sort_by_key(|e| e.metadata.creation_timestamp.clone());
        Ok(evs
            .iter()
            .map(|e| {
                format!(
                    "{} {} {}: {}",
                    e.type_.clone().unwrap_or_default(),
                    e.involved_object.name.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Runs kubectl against this cluster; returns stdout, or fails with stderr.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(kubectl_bin())
            .args(args)
            .output()
            .await
            .context("failed to run kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if let Some(mut child) = self.operator.take() {
            let _ = child.start_kill();
        }
        if std::env::var_os("KESTREL_E2E_KEEP").is_some() {
            eprintln!("keeping namespace {} (KESTREL_E2E_KEEP is set)", self.name);
            return;
        }
        // Drop cannot await: delete from a thread with its own runtime and its own client
        // (a client is bound to the runtime that made it, which is blocked here).
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                if let Ok(client) = Client::try_default().await {
                    let api: Api<Namespace> = Api::all(client);
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
            });
        })
        .join();
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The condition of a ModelDeployment's status, if present.
pub fn condition<'a>(
    md: &'a ModelDeployment,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// The model folder on the node for the real worker (`KESTREL_MODEL_DIR`, written by
/// `worker/scripts/setup-dev`); the local cluster's node is this machine.
/// The Prometheus the operator under test reads (the local cluster's, on loopback).
pub fn prometheus_url() -> String {
    std::env::var("KESTREL_PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:9090".into())
}

pub fn model_dir() -> Result<String> {
    std::env::var("KESTREL_MODEL_DIR").context(
        "KESTREL_MODEL_DIR is not set: run `make setup` (or worker/scripts/setup-dev) and export what it prints",
    )
}

/// The worker image the serving tests run (`KESTREL_WORKER_IMAGE`, default the one
/// `make images` imports).
pub fn worker_image() -> String {
    std::env::var("KESTREL_WORKER_IMAGE").unwrap_or_else(|_| "kestrel-worker:dev".into())
}

/// The reference embedding of sentence `i` of the worker's fixed set (sentence-transformers).
pub fn reference_embedding(i: usize) -> Result<(String, Vec<f32>)> {
    use base64::Engine;
    let text = std::fs::read_to_string(repo_root().join("worker/data/reference-embeddings.json"))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let sentence = doc["sentences"][i]
        .as_str()
        .context("no such sentence")?
        .to_owned();
    let bytes = base64::engine::general_purpose::STANDARD.decode(
        doc["embeddings_f32le_base64"][i]
            .as_str()
            .context("no such embedding")?,
    )?;
    let v = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((sentence, v))
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
