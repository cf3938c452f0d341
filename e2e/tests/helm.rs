//! The Helm charts on a real cluster: `helm install` runs the operator as a pod with the
//! chart's least-privilege RBAC and it reconciles a ModelDeployment; `helm upgrade`
//! changes its flags and hands the leader Lease over; `helm uninstall` leaves only what
//! docs/helm.md says is kept; the kestrel-crds chart really upgrades the CRD.
//!
//! Needs the operator image in the cluster: `make images` imports `kestrel-operator:dev`
//! (or set KESTREL_OPERATOR_IMAGE=repository:tag to one the cluster can pull). Each test
//! has its own release and namespaces, so they run in parallel with the rest of the suite.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kestrel_crds::ModelDeployment;
use kestrel_e2e::{TestNamespace, kubectl_bin, repo_root, tail, wait_for};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tokio::process::Command;

const MINUTE: Duration = Duration::from_secs(60);
const CRD: &str = "modeldeployments.kestrel.dev";

/// helm: $HELM, else the local cluster's, else the one on PATH.
fn helm_bin() -> PathBuf {
    if let Some(h) = std::env::var_os("HELM") {
        return h.into();
    }
    let local = repo_root().join("e2e/cluster/.build/bin/helm");
    if local.exists() { local } else { "helm".into() }
}

/// Runs helm; returns stdout, or fails with its stderr.
async fn helm(args: &[&str]) -> Result<String> {
    let out = Command::new(helm_bin())
        .args(args)
        .output()
        .await
        .context("failed to run helm")?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs kubectl and returns (success, stdout + stderr) without failing.
async fn kubectl_status(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(kubectl_bin())
        .args(args)
        .output()
        .await
        .context("failed to run kubectl")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The operator image as (repository, tag): KESTREL_OPERATOR_IMAGE or kestrel-operator:dev.
fn operator_image() -> (String, String) {
    let image =
        std::env::var("KESTREL_OPERATOR_IMAGE").unwrap_or_else(|_| "kestrel-operator:dev".into());
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo.to_owned(), tag.to_owned()),
        _ => (image, "latest".to_owned()),
    }
}

/// Prometheus as pods reach it (the local cluster's by default).
fn prometheus_url() -> String {
    std::env::var("KESTREL_E2E_PROMETHEUS_URL")
        .unwrap_or_else(|_| "http://prometheus.kube-system.svc:9090".into())
}

/// A Helm release that is uninstalled when dropped (if the test did not uninstall it).
struct Release {
    name: String,
    namespace: String,
    installed: bool,
}

impl Release {
    /// A release name unique to this test's namespace (its random suffix).
    fn new(prefix: &str, ns: &TestNamespace) -> Self {
        let suffix = ns.name.rsplit('-').next().unwrap_or("x");
        Self {
            name: format!("{prefix}-{suffix}"),
            namespace: ns.name.clone(),
            installed: false,
        }
    }

    fn fullname(&self) -> String {
        // The chart's fullname: <release>-kestrel (the release names here never contain "kestrel").
        format!("{}-kestrel", self.name)
    }

    fn selector(&self) -> String {
        format!("app.kubernetes.io/instance={}", self.name)
    }

    async fn install(&mut self, chart: &str, values: &[&str]) -> Result<String> {
        let chart_path = repo_root().join(chart);
        let mut args = vec![
            "install",
            &self.name,
            chart_path.to_str().context("chart path is not UTF-8")?,
            "--namespace",
            &self.namespace,
            "--wait",
            "--timeout",
            "180s",
        ];
        args.extend_from_slice(values);
        let out = helm(&args).await;
        // A failed --wait install still leaves a release behind.
        self.installed = true;
        out
    }

    async fn upgrade(&self, chart: &str, values: &[&str]) -> Result<String> {
        let chart_path = repo_root().join(chart);
        let mut args = vec![
            "upgrade",
            &self.name,
            chart_path.to_str().context("chart path is not UTF-8")?,
            "--namespace",
            &self.namespace,
            "--reuse-values",
            "--wait",
            "--timeout",
            "180s",
        ];
        args.extend_from_slice(values);
        helm(&args).await
    }

    async fn uninstall(&mut self) -> Result<String> {
        let out = helm(&[
            "uninstall",
            &self.name,
            "--namespace",
            &self.namespace,
            "--wait",
            "--timeout",
            "120s",
        ])
        .await?;
        self.installed = false;
        Ok(out)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.installed && std::env::var_os("KESTREL_E2E_KEEP").is_none() {
            let _ = std::process::Command::new(helm_bin())
                .args([
                    "uninstall",
                    &self.name,
                    "--namespace",
                    &self.namespace,
                    "--ignore-not-found",
                ])
                .output();
        }
    }
}

/// Pods, operator logs and events of the release, for a failing test's message.
async fn diagnostics(release: &Release, namespaces: &[&TestNamespace]) -> String {
    let mut out = String::new();
    for ns in namespaces {
        let (_, pods) = kubectl_status(&["get", "pods", "-o", "wide", "-n", &ns.name])
            .await
            .unwrap_or_default();
        out += &format!("--- pods in {}:\n{pods}", ns.name);
        out += &format!(
            "--- events in {}:\n{}\n",
            ns.name,
            ns.events().await.unwrap_or_default()
        );
    }
    let (_, logs) = kubectl_status(&[
        "logs",
        "-n",
        &release.namespace,
        "-l",
        &release.selector(),
        "--all-containers",
        "--prefix",
        "--tail=60",
    ])
    .await
    .unwrap_or_default();
    out += &format!("--- operator logs (tail):\n{}", tail(&logs, 60));
    out
}

/// Fails with a pointer to `make images` when the operator pod cannot get its image.
async fn explain_image_problems(client: &Client, release: &Release) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &release.namespace);
    for pod in pods
        .list(&ListParams::default().labels(&release.selector()))
        .await?
    {
        for cs in pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
        {
            let reason = cs
                .state
                .and_then(|s| s.waiting)
                .and_then(|w| w.reason)
                .unwrap_or_default();
            if reason.contains("Image") {
                let (repo, tag) = operator_image();
                bail!(
                    "the operator pod cannot get its image {repo}:{tag} ({reason}): run `make images` \
                     (imports kestrel-operator:dev into the local cluster) or set KESTREL_OPERATOR_IMAGE"
                );
            }
        }
    }
    Ok(())
}

/// Names of the release's operator pods that are Running and not being deleted.
async fn operator_pods(client: &Client, release: &Release) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &release.namespace);
    Ok(pods
        .list(&ListParams::default().labels(&release.selector()))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| p.name_any())
        .collect())
}

/// Waits until the leader Lease is held by one of the release's current pods.
async fn wait_for_leader(client: &Client, release: &Release) -> Result<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &release.namespace);
    let lease_name = release.fullname();
    wait_for(
        "a current operator pod to hold the Lease",
        MINUTE,
        || async {
            let pods = operator_pods(client, release).await?;
            let holder = leases
                .get_opt(&lease_name)
                .await?
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity);
            Ok(holder.is_some_and(|h| pods.contains(&h)))
        },
    )
    .await?;
    Ok(leases
        .get(&lease_name)
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default())
}

/// A ModelDeployment whose worker never starts: enough to prove the operator reconciles.
fn md_yaml(name: &str, max_replicas: u32) -> String {
    format!(
        r#"
apiVersion: kestrel.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}}}
spec:
  model: {{name: all-MiniLM-L6-v2, task: embeddings, source: {{hostPath: {{path: /tmp}}}}}}
  variants: [{{name: f32, precision: f32}}]
  slo: {{p95LatencyMs: 200}}
  scaling: {{minReplicas: 1, maxReplicas: {max_replicas}}}
  worker: {{image: "kestrel-absent:none", imagePullPolicy: Never}}
"#
    )
}

/// Waits until the operator has reconciled the ModelDeployment's current generation.
async fn wait_reconciled(ns: &TestNamespace, name: &str) -> Result<ModelDeployment> {
    ns.wait_md(
        name,
        "status.observedGeneration = metadata.generation",
        MINUTE,
        |md| md.status.as_ref().and_then(|s| s.observed_generation) == md.metadata.generation,
    )
    .await
}

/// Objects of the release that remain in `namespace` (kinds the chart renders).
async fn leftovers(release: &Release, namespace: &str) -> Result<String> {
    let (ok, out) = kubectl_status(&[
        "get",
        "deployments,replicasets,services,serviceaccounts,configmaps,roles,rolebindings,poddisruptionbudgets,networkpolicies",
        "-n",
        namespace,
        "-l",
        &release.selector(),
        "-o",
        "name",
    ])
    .await?;
    if !ok {
        bail!("kubectl get failed: {out}");
    }
    Ok(out.trim().to_owned())
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall_of_an_operator_watching_one_namespace() {
    let sys = TestNamespace::new("helm-sys").await.unwrap();
    let team = TestNamespace::new("helm-team").await.unwrap();
    let mut release = Release::new("kh", &sys);
    let result = install_upgrade_uninstall(&sys, &team, &mut release).await;
    if let Err(e) = result {
        panic!("{e:#}\n{}", diagnostics(&release, &[&sys, &team]).await);
    }
}

async fn install_upgrade_uninstall(
    sys: &TestNamespace,
    team: &TestNamespace,
    release: &mut Release,
) -> Result<()> {
    let client = sys.client.clone();
    // The API server's Pod Security admission refuses any operator pod that is not
    // `restricted` (non-root, read-only root, no escalation, no capabilities, seccomp).
    sys.kubectl(&[
        "label",
        "namespace",
        &sys.name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    ])
    .await?;
    let (repo, tag) = operator_image();
    let watch = format!("watchNamespaces={{{}}}", team.name);
    let image_repo = format!("image.repository={repo}");
    let image_tag = format!("image.tag={tag}");
    let prometheus = format!("prometheus.url={}", prometheus_url());
    let installed = release
        .install(
            "charts/kestrel",
            &[
                "--set",
                &image_repo,
                "--set",
                &image_tag,
                "--set",
                &watch,
                "--set",
                &prometheus,
                "--set",
                "scaling.evaluationIntervalSeconds=2",
            ],
        )
        .await;
    if let Err(e) = installed {
        explain_image_problems(&client, release).await?;
        return Err(e);
    }

    // The operator pod is Ready (helm --wait) and leads through the Lease.
    let first_leader = wait_for_leader(&client, release).await?;

    // It reconciles a ModelDeployment in the watched namespace with the chart's RBAC.
    team.apply_yaml(&md_yaml("helm-md", 2)).await?;
    let deployments: Api<Deployment> = team.api();
    wait_for("the worker Deployment helm-md-f32", MINUTE, || async {
        Ok(deployments.get_opt("helm-md-f32").await?.is_some())
    })
    .await?;
    wait_reconciled(team, "helm-md").await?;
    let logs = sys
        .kubectl(&[
            "logs",
            "-n",
            &sys.name,
            "-l",
            &release.selector(),
            "--tail=-1",
        ])
        .await?;
    if logs.to_lowercase().contains("forbidden") {
        bail!("the operator hit RBAC denials:\n{}", tail(&logs, 30));
    }

    // helm upgrade: changed values reach the pod (a log level, and a worker profile the
    // operator must parse at start from the mounted ConfigMap); with 2 replicas one leads.
    let profile = format!(
        "profiles.cpu-2core={}",
        repo_root()
            .join("worker/profiles/cpu-2core-xeon.json")
            .display()
    );
    release
        .upgrade(
            "charts/kestrel",
            &[
                "--set",
                "log.level=debug",
                "--set",
                "replicaCount=2",
                "--set-file",
                &profile,
            ],
        )
        .await?;
    let operator: Api<Deployment> = sys.api();
    let args = operator
        .get(&release.fullname())
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default();
    for want in [
        "--log-level=debug",
        "--profiles=/etc/kestrel/profiles/cpu-2core.json",
    ] {
        if !args.iter().any(|a| a == want) {
            bail!("after helm upgrade the operator's args are {args:?}; expected {want}");
        }
    }
    let leader = wait_for_leader(&client, release).await?;
    if leader == first_leader {
        bail!("the Lease is still held by {leader}, a pod the upgrade replaced");
    }
    let pods = operator_pods(&client, release).await?;
    if pods.len() != 2 {
        bail!("expected 2 operator pods after the upgrade, found {pods:?}");
    }
    // Exactly one writer: only the Lease holder reports kestrel_operator_leader 1 (read
    // through the API server's pod proxy, so this works on any cluster).
    wait_for(
        "exactly one pod to report kestrel_operator_leader 1",
        MINUTE,
        || async {
            let mut leaders = Vec::new();
            for pod in &pods {
                let path = format!(
                    "/api/v1/namespaces/{}/pods/{pod}:8080/proxy/metrics",
                    release.namespace
                );
                let metrics = sys.kubectl(&["get", "--raw", &path]).await?;
                if metrics
                    .lines()
                    .any(|l| l.trim() == "kestrel_operator_leader 1")
                {
                    leaders.push(pod.clone());
                }
            }
            Ok(leaders == [leader.clone()])
        },
    )
    .await?;
    // The new leader reconciles a change.
    team.apply_yaml(&md_yaml("helm-md", 3)).await?;
    wait_reconciled(team, "helm-md").await?;

    // helm uninstall leaves nothing of the release; kept by design: the CRD, the
    // ModelDeployments and what they own, and the Lease the operator wrote.
    release.uninstall().await?;
    wait_for("the operator pods to go", MINUTE, || async {
        Ok(operator_pods(&client, release).await?.is_empty())
    })
    .await?;
    for ns in [&sys.name, &team.name] {
        let left = leftovers(release, ns).await?;
        if !left.is_empty() {
            bail!("helm uninstall left in {ns}:\n{left}");
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.get(CRD)
        .await
        .context("the CRD must outlive the release")?;
    let mds: Api<ModelDeployment> = team.api();
    mds.get("helm-md")
        .await
        .context("ModelDeployments must outlive the release")?;
    let leases: Api<Lease> = sys.api();
    leases
        .get(&release.fullname())
        .await
        .context("the Lease stays until its namespace goes (docs/helm.md)")?;
    Ok(())
}

#[tokio::test]
async fn a_cluster_wide_install_has_release_unique_least_privilege_rbac() {
    let sys = TestNamespace::new("helm-cw").await.unwrap();
    let mut release = Release::new("kc", &sys);
    let result = cluster_wide_rbac(&sys, &mut release).await;
    if let Err(e) = result {
        panic!("{e:#}\n{}", diagnostics(&release, &[&sys]).await);
    }
}

async fn cluster_wide_rbac(sys: &TestNamespace, release: &mut Release) -> Result<()> {
    // An unknown value is refused before anything is created, naming the value.
    let refused = helm(&[
        "install",
        &release.name,
        repo_root().join("charts/kestrel").to_str().unwrap(),
        "--namespace",
        &sys.name,
        "--set",
        "bogus=1",
    ])
    .await;
    match refused {
        Ok(_) => bail!("helm install --set bogus=1 succeeded"),
        Err(e) if !e.to_string().contains("'bogus'") => {
            bail!("the schema error does not name the value: {e:#}")
        }
        Err(_) => {}
    }

    // No replicas: a cluster-wide operator would also reconcile other tests' namespaces.
    release
        .install("charts/kestrel", &["--set", "replicaCount=0"])
        .await?;
    let (ok, roles) = kubectl_status(&[
        "get",
        "clusterroles,clusterrolebindings",
        "-l",
        &release.selector(),
        "-o",
        "name",
    ])
    .await?;
    let roles: Vec<&str> = roles.lines().collect();
    let expected = format!("{}-{}", sys.name, release.fullname());
    let expected: String = expected.chars().take(63).collect();
    let expected = expected.trim_end_matches('-');
    if !ok
        || roles
            != [
                format!("clusterrole.rbac.authorization.k8s.io/{expected}").as_str(),
                format!("clusterrolebinding.rbac.authorization.k8s.io/{expected}").as_str(),
            ]
    {
        bail!("expected one ClusterRole and binding named {expected}, got {roles:?}");
    }

    // What the ServiceAccount may and may not do.
    let sa = format!("system:serviceaccount:{}:{}", sys.name, release.fullname());
    let lease = format!("leases.coordination.k8s.io/{}", release.fullname());
    let cases: &[(&str, &str, &str, bool)] = &[
        ("watch", "modeldeployments.kestrel.dev", "default", true),
        (
            "patch",
            "modeldeployments.kestrel.dev/status",
            "default",
            true,
        ),
        ("update", "modeldeployments.kestrel.dev", "default", false),
        ("patch", "deployments.apps", "default", true),
        ("delete", "deployments.apps", "default", true),
        ("delete", "services", "default", false),
        ("list", "pods", "default", true),
        ("delete", "pods", "default", false),
        ("get", "secrets", "default", false),
        ("create", "events.events.k8s.io", "default", true),
        ("create", "leases.coordination.k8s.io", &sys.name, true),
        ("update", &lease, &sys.name, true),
        (
            "update",
            "leases.coordination.k8s.io/other",
            &sys.name,
            false,
        ),
        ("create", "leases.coordination.k8s.io", "default", false),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, ns, want) in cases {
        let mut args = vec!["auth", "can-i", verb, "-n", ns, "--as", &sa];
        match resource.strip_suffix("/status") {
            Some(r) => args.extend([r, "--subresource", "status"]),
            None => args.push(resource),
        }
        let (_, out) = kubectl_status(&args).await?;
        let got = out.trim().starts_with("yes");
        if got != *want {
            wrong.push(format!("{verb} {resource} in {ns}: got {got}, want {want}"));
        }
    }
    if !wrong.is_empty() {
        bail!("RBAC differs from least privilege:\n{}", wrong.join("\n"));
    }

    release.uninstall().await?;
    let (_, roles) = kubectl_status(&[
        "get",
        "clusterroles,clusterrolebindings",
        "-l",
        &release.selector(),
        "-o",
        "name",
    ])
    .await?;
    if !roles.trim().is_empty() {
        bail!("helm uninstall left cluster-scoped objects: {roles}");
    }
    let left = leftovers(release, &sys.name).await?;
    if !left.is_empty() {
        bail!("helm uninstall left:\n{left}");
    }
    Ok(())
}

#[tokio::test]
async fn the_crds_chart_upgrades_the_crd_and_keeps_it_on_uninstall() {
    let ns = TestNamespace::new("helm-crds").await.unwrap();
    let mut release = Release::new("kcrd", &ns);
    let result = crds_chart(&ns, &mut release).await;
    // Leave the shared CRD as other tests expect it, pass or fail.
    let _ = kubectl_status(&[
        "label",
        "crd",
        CRD,
        "kestrel.dev/e2e-revision-",
        "app.kubernetes.io/managed-by-",
        "app.kubernetes.io/name-",
        "app.kubernetes.io/component-",
        "app.kubernetes.io/instance-",
        "app.kubernetes.io/version-",
        "helm.sh/chart-",
    ])
    .await;
    let _ = kubectl_status(&[
        "annotate",
        "crd",
        CRD,
        "kestrel.dev/e2e-note-",
        "meta.helm.sh/release-name-",
        "meta.helm.sh/release-namespace-",
        "helm.sh/resource-policy-",
    ])
    .await;
    if let Err(e) = result {
        panic!("{e:#}\n{}", diagnostics(&release, &[&ns]).await);
    }
}

async fn crds_chart(ns: &TestNamespace, release: &mut Release) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(ns.client.clone());
    // The CRD exists (TestNamespace installed it, as `kubectl apply` would): adopt it
    // into the release as docs/helm.md describes.
    let release_name = format!("meta.helm.sh/release-name={}", release.name);
    let release_ns = format!("meta.helm.sh/release-namespace={}", ns.name);
    ns.kubectl(&[
        "label",
        "crd",
        CRD,
        "app.kubernetes.io/managed-by=Helm",
        "--overwrite",
    ])
    .await?;
    ns.kubectl(&[
        "annotate",
        "crd",
        CRD,
        &release_name,
        &release_ns,
        "--overwrite",
    ])
    .await?;

    release
        .install(
            "charts/kestrel-crds",
            &["--set-string", "labels.kestrel\\.dev/e2e-revision=one"],
        )
        .await?;
    let crd = crds.get(CRD).await?;
    let label = |crd: &CustomResourceDefinition| {
        crd.labels()
            .get("kestrel.dev/e2e-revision")
            .cloned()
            .unwrap_or_default()
    };
    if label(&crd) != "one" {
        bail!("after install the CRD's labels are {:?}", crd.labels());
    }
    if crd
        .annotations()
        .get("helm.sh/resource-policy")
        .map(String::as_str)
        != Some("keep")
    {
        bail!("the CRD lacks helm.sh/resource-policy: keep");
    }

    // An upgrade of the chart changes the CRD on the cluster (crds/ folders never do).
    release
        .upgrade(
            "charts/kestrel-crds",
            &[
                "--set-string",
                "labels.kestrel\\.dev/e2e-revision=two",
                "--set-string",
                "annotations.kestrel\\.dev/e2e-note=upgraded",
            ],
        )
        .await?;
    let crd = crds.get(CRD).await?;
    if label(&crd) != "two"
        || crd
            .annotations()
            .get("kestrel.dev/e2e-note")
            .map(String::as_str)
            != Some("upgraded")
    {
        bail!(
            "helm upgrade did not change the CRD: labels {:?}, annotations {:?}",
            crd.labels(),
            crd.annotations().keys().collect::<Vec<_>>()
        );
    }

    // Uninstall keeps the CRD: ModelDeployments are still served.
    let out = release.uninstall().await?;
    if crds.get_opt(CRD).await?.is_none() {
        bail!("helm uninstall deleted the CRD (and every ModelDeployment); it said: {out}");
    }
    ns.apply_yaml(&md_yaml("after-uninstall", 2)).await?;
    Ok(())
}
