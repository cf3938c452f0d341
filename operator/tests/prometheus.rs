//! PrometheusSource against a real Prometheus (Debian's `prometheus`, started here on
//! loopback) scraping a real exporter of the worker contract's series: the PromQL returns
//! what the policy expects, and a worker that stops reporting or a Prometheus that is
//! down holds the scale and turns MetricsAvailable false.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use kestrel_crds::contract::metrics as series;
use kestrel_operator::autoscale::{self, Profiles};
use kestrel_operator::config::PriceTable;
use kestrel_operator::observe::{DeploymentState, Observed};
use kestrel_operator::signals::prometheus::PrometheusSource;
use kestrel_operator::signals::{MetricsSource, SignalsQuery, SignalsReading};
use kestrel_operator::validate::validate;

/// Exposition of one worker: 6 waiting, 10 in flight, 20 ok/s and 5 refused/s, every
/// request between 100 and 150 ms (so p95 interpolates to 147.5 ms).
fn exposition(started: Instant) -> String {
    let t = started.elapsed().as_secs_f64();
    let ok = (20.0 * t).floor();
    let rejected = (5.0 * t).floor();
    let d = series::REQUEST_DURATION;
    format!(
        "# TYPE {q} gauge\n{q} 6\n# TYPE {f} gauge\n{f} 10\n# TYPE {r} counter\n{r}{{outcome=\"ok\"}} {ok}\n{r}{{outcome=\"rejected\"}} {rejected}\n\
         # TYPE {d} histogram\n{d}_bucket{{le=\"0.1\"}} 0\n{d}_bucket{{le=\"0.15\"}} {ok}\n{d}_bucket{{le=\"+Inf\"}} {ok}\n{d}_sum {s}\n{d}_count {ok}\n",
        q = series::QUEUE_DEPTH,
        f = series::IN_FLIGHT,
        r = series::REQUESTS_TOTAL,
        s = ok * 0.125,
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(target: SocketAddr, port: u16, dir: &std::path::Path) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: worker\n  static_configs:\n  - targets: ['{target}']\n    labels: {{namespace: search, kestrel_dev_model_deployment: minilm}}\n"
        ),
    )
    .unwrap();
    let bin = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    let child = Command::new(&bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("prometheus.log")).unwrap(),
        ))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("failed to start {bin} (apt-get install prometheus, or set PROMETHEUS_BIN): {e}")
        });
    Prometheus(child)
}

fn query() -> SignalsQuery {
    SignalsQuery {
        namespace: "search".into(),
        name: "minilm".into(),
        latency_metric: series::REQUEST_DURATION,
        window_seconds: 10,
        short_window_seconds: 5,
        generation: false,
    }
}

async fn poll<F: Fn(&SignalsReading) -> bool>(
    src: &PrometheusSource,
    what: &str,
    ok: F,
) -> SignalsReading {
    let start = Instant::now();
    loop {
        let r = src.read(&query()).await;
        if ok(&r) {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "timed out waiting for {what}; last reading {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn fleet(replicas: i32) -> Observed {
    Observed {
        deployments: BTreeMap::from([(
            "f32".to_owned(),
            DeploymentState {
                name: "minilm-f32".into(),
                applied_hash: None,
                spec_replicas: replicas,
                replicas,
                ready_replicas: replicas,
                updated_replicas: replicas,
            },
        )]),
        ..Default::default()
    }
}

#[tokio::test]
async fn signals_from_a_real_prometheus_drive_the_policy_and_missing_ones_hold_it() {
    let dir = std::env::temp_dir().join(format!("kestrel-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // A real exporter on loopback.
    let started = Instant::now();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let app = Router::new().route("/metrics", get(move || async move { exposition(started) }));
    let exporter = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let port = free_port();
    let prometheus = start_prometheus(target, port, &dir);
    let src = PrometheusSource::new(&format!("http://127.0.0.1:{port}")).unwrap();

    // Rates need their window filled: wait until the 10 s window is long full.
    let reading = poll(&src, "fresh signals with rates over a full window", |r| {
        matches!(r, SignalsReading::Fresh(s) if s.p95_ms.is_some())
            && started.elapsed() > Duration::from_secs(20)
    })
    .await;
    let SignalsReading::Fresh(s) = reading else {
        unreachable!()
    };
    assert_eq!(s.scraped_workers, 1);
    assert!((s.waiting - 6.0).abs() < 1e-9, "waiting {}", s.waiting);
    assert!(
        (s.in_flight - 10.0).abs() < 1e-9,
        "in flight {}",
        s.in_flight
    );
    assert!(
        (s.arrival_rate - 25.0).abs() < 5.0,
        "arrivals (ok + refused) {}",
        s.arrival_rate
    );
    assert!(
        (s.throughput - 20.0).abs() < 4.0,
        "throughput {}",
        s.throughput
    );
    let p95 = s.p95_ms.unwrap();
    assert!((p95 - 147.5).abs() < 1.0, "p95 {p95}");
    assert!(s.age_seconds < 5.0, "age {}", s.age_seconds);

    // Those signals, through the same decide the operator runs, scale one replica up.
    let md = validate(&kestrel_md(), Some("w:1"), &PriceTable::default()).unwrap();
    let mut observed = fleet(1);
    observed.signals = Some(SignalsReading::Fresh(s));
    let plan = autoscale::decide(&md, &observed, None, 1_000.0, &Profiles::bundled());
    assert!(
        plan.replicas["f32"] >= 2,
        "10 in flight over 1 replica (target 8): {plan:?}"
    );
    assert_eq!(plan.metrics_available, Some(Ok(())));

    // The worker stops reporting: no fresh signals, replicas are held.
    exporter.abort();
    let reading = poll(&src, "signals to go missing", |r| {
        !matches!(r, SignalsReading::Fresh(_))
    })
    .await;
    let mut observed = fleet(3);
    observed.signals = Some(reading);
    let plan = autoscale::decide(&md, &observed, None, 1_010.0, &Profiles::bundled());
    assert_eq!(plan.replicas["f32"], 3, "held: {plan:?}");
    assert!(matches!(plan.metrics_available, Some(Err(_))), "{plan:?}");

    // Prometheus goes down: the reading says why, replicas are held.
    drop(prometheus);
    let reading = src.read(&query()).await;
    let SignalsReading::Unavailable(why) = &reading else {
        panic!("expected Unavailable, got {reading:?}")
    };
    assert!(
        why.contains(&format!("127.0.0.1:{port}")),
        "names the Prometheus URL: {why}"
    );
    let mut observed = fleet(3);
    observed.signals = Some(reading.clone());
    let plan = autoscale::decide(&md, &observed, None, 1_020.0, &Profiles::bundled());
    assert_eq!(plan.replicas["f32"], 3);
    assert_eq!(plan.metrics_available, Some(Err(why.clone())));
    let _ = std::fs::remove_dir_all(&dir);
}

fn kestrel_md() -> kestrel_crds::ModelDeployment {
    serde_yaml::from_str(
        r#"
apiVersion: kestrel.dev/v1alpha1
kind: ModelDeployment
metadata: {name: minilm, namespace: search, uid: u1, generation: 1}
spec:
  model: {name: all-MiniLM-L6-v2, task: embeddings, source: {hostPath: {path: /models}}}
  variants: [{name: f32, precision: f32}]
  slo: {p95LatencyMs: 200, targetQueueDepthPerReplica: 8}
  scaling: {minReplicas: 1, maxReplicas: 10}
"#,
    )
    .unwrap()
}
