use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kestrel_crds::contract::{DEFAULT_WORKER_PORT, env};
use kestrel_worker::batcher::BatchLimits;
use kestrel_worker::bench::BenchConfig;
use kestrel_worker::engine::{
    BackendKind, Device, LoadOptions, LongInput, ONNX_DIR, OrtLibrary, Precision, VariantSpec,
};
use kestrel_worker::profile::{self, ProfileConfig, VariantProfile};
use kestrel_worker::serve::{ServeConfig, serve};
use tracing::warn;

#[derive(Debug, Parser)]
#[command(
    name = "kestrel-worker",
    version,
    about = "Kestrel's inference worker (embeddings, text generation)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible embeddings API with dynamic batching.
    Serve(ServeArgs),
    /// Measure each variant on this machine (capacity data for the operator).
    Profile(ProfileArgs),
    /// Worker HTTP throughput beside sentence-transformers and raw ONNX Runtime.
    Bench(BenchArgs),
    /// Closed-loop HTTP load against a running worker; prints one JSON object.
    Load(LoadArgs),
    /// Write a GGUF variant: every weight matrix re-quantized (fetch-gemma runs it).
    Requantize(RequantizeArgs),
    /// Text generation through HTTP per variant and concurrency, beside transformers.
    BenchGeneration(BenchGenerationArgs),
}

#[derive(Debug, Args)]
struct BenchGenerationArgs {
    /// The Gemma folder (worker/scripts/fetch-gemma).
    #[arg(long, env = "KESTREL_GEMMA_DIR")]
    model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "q4_k_m,q8_0,q4_0,f16")]
    variants: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Python with transformers, torch and gguf for the baseline (none: skipped).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Threads of the baseline (the worker uses every core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[derive(Debug, Args)]
struct RequantizeArgs {
    /// The source GGUF (e.g. the shipped Q4_K_M).
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// q8_0, q4_0, f16 or f32.
    #[arg(long)]
    dtype: String,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The worker's base URL, e.g. http://127.0.0.1:8080 (loopback or the local cluster).
    #[arg(long)]
    url: String,
    /// Clients, each sending its next request when answered.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Sentences per request (the bench set, cycled).
    #[arg(long, default_value_t = 1)]
    inputs: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured load first (warms the batch shapes).
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
}

#[derive(Debug, Args)]
struct ProfileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Variants to profile, each in its own child process.
    #[arg(long, value_delimiter = ',', default_value = "f32,int8")]
    variants: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    batch_sizes: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
    concurrency: Vec<usize>,
    /// Seconds spent on each batch size and concurrency level.
    #[arg(long, default_value_t = 2.0)]
    seconds_per_point: f64,
    /// The batcher's maximum batch for the concurrency runs.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Print the schema's JSON (kestrel.dev/worker-profile/v1) instead of a table.
    #[arg(long)]
    json: bool,
    /// Profile in this process instead of one child per variant.
    #[arg(long, hide = true)]
    in_process: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Model folder (with onnx/ from scripts/export_onnx.py).
    #[arg(long, env = env::MODEL_DIR)]
    model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "f32,int8")]
    variants: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Engine threads (0: one per core), the same for the baselines.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Python with sentence-transformers and onnxruntime, for the baselines.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Seconds of 3× overload after the table (0: skip).
    #[arg(long, default_value_t = 0.0)]
    overload_seconds: f64,
    /// Interleaved rounds of every measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// Model folder (config.json, tokenizer.json, model.safetensors, onnx/).
    #[arg(long, env = env::MODEL_DIR)]
    model: PathBuf,
    /// cpu or cuda:N.
    #[arg(long, env = env::DEVICE, default_value = "cpu")]
    device: String,
    /// Force a backend (candle, onnx); by default f32 and int8 run on ONNX Runtime on CPU.
    #[arg(long)]
    backend: Option<BackendKind>,
    /// libonnxruntime.so (from the PyPI onnxruntime wheel) for the onnx backend.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_library: Option<PathBuf>,
    /// Intra-op threads of the engine (0: one per available core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Variant to serve. Embeddings: f32 (default), int8 (ONNX Runtime), f16, bf16
    /// (candle). Text generation (a GGUF folder): q4_k_m (default), q8_0, q4_0, f16.
    #[arg(long, env = env::VARIANT)]
    variant: Option<String>,
    #[arg(long, env = env::PORT, default_value_t = DEFAULT_WORKER_PORT)]
    port: u16,
    /// Address to bind; the pod needs 0.0.0.0, tests use 127.0.0.1.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    /// Requests admitted and waiting at most; beyond it the answer is 429.
    #[arg(long, env = env::MAX_QUEUE, default_value_t = 64)]
    max_queue: usize,
    /// Inputs per batch at most.
    #[arg(long, env = env::MAX_BATCH, default_value_t = 32)]
    max_batch: usize,
    /// Padded tokens (inputs × longest) per batch at most.
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// How long a batch may wait for more requests after its oldest was admitted (it
    /// waits only while fewer inputs are queued than recent batches held).
    #[arg(long, default_value_t = 5)]
    max_batch_wait_ms: u64,
    /// Seconds between SIGTERM and the end of admission (ready is false meanwhile).
    #[arg(long, env = env::DRAIN_DELAY_SECONDS, default_value_t = 5.0)]
    drain_delay_seconds: f64,
    /// A request not started within this many seconds is answered 503.
    #[arg(long, default_value_t = 30.0)]
    request_timeout_seconds: f64,
    /// Inputs per request at most.
    #[arg(long, default_value_t = 2048)]
    max_inputs: usize,
    /// Inputs longer than the model's maximum: truncate (as sentence-transformers) or refuse (400).
    #[arg(long, default_value = "truncate", value_parser = ["truncate", "refuse"])]
    long_input: String,
    /// Text generation: prompt + generated tokens per sequence, at most.
    #[arg(long, default_value_t = 2048)]
    max_context: usize,
}

impl ModelArgs {
    fn load_options(&self) -> anyhow::Result<(Device, LoadOptions)> {
        let device: Device = self.device.parse()?;
        let threads = match self.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let ort_library = OrtLibrary(self.ort_library.clone());
        Ok((
            device,
            LoadOptions {
                device,
                threads,
                ort_library,
            },
        ))
    }

    /// Resolves a variant; f32 without a forced backend falls back to candle when the
    /// ONNX graph or the ONNX Runtime library is missing.
    fn variant(&self, name: &str, device: Device) -> anyhow::Result<VariantSpec> {
        let spec = VariantSpec::resolve(name, self.backend, device)?;
        let onnx_ready = self.model.join(ONNX_DIR).join(spec.onnx_file()).is_file()
            && OrtLibrary(self.ort_library.clone()).path().is_ok();
        if spec.backend == BackendKind::Onnx
            && self.backend.is_none()
            && spec.precision == Precision::F32
            && !onnx_ready
        {
            warn!("no ONNX graph or ONNX Runtime library: serving f32 with candle");
            return Ok(VariantSpec::resolve(
                name,
                Some(BackendKind::Candle),
                device,
            )?);
        }
        Ok(spec)
    }
}

/// Keeps large freed buffers in the heap for reuse. By default glibc serves each
/// allocation over its mmap threshold with fresh pages that the kernel zeroes: a Gemma
/// decode step's logits (16 sequences × 262,144 × 4 bytes) and activations paid 8 % of
/// the step in page clearing. The heap's high-water mark is what peak RSS already was.
fn reuse_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn main() -> anyhow::Result<()> {
    // ONNX Runtime's telemetry writes a database under $HOME/.cache when the library
    // loads; the worker must write nothing at run time (read-only root filesystem).
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        // SAFETY: first statement of main, before any thread exists.
        unsafe { std::env::set_var("ORT_DISABLE_TELEMETRY", "1") };
    }
    reuse_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) if kestrel_worker::textgen::is_gguf_folder(&args.model.model) => {
            use kestrel_worker::textgen::{GenLimits, SHIPPED_VARIANT, TextServeConfig};
            if args.model.device != "cpu" {
                anyhow::bail!(
                    "text generation runs on cpu only (got --device {})",
                    args.model.device
                );
            }
            let config = TextServeConfig {
                model_dir: args.model.model.clone(),
                variant: args.variant.unwrap_or_else(|| SHIPPED_VARIANT.to_string()),
                addr: SocketAddr::new(args.host, args.port),
                limits: GenLimits {
                    max_queue: args.max_queue,
                    max_running: args.max_batch.max(1),
                    request_timeout: Duration::from_secs_f64(args.request_timeout_seconds),
                },
                max_context: args.max_context,
                drain_delay: Duration::from_secs_f64(args.drain_delay_seconds),
            };
            runtime.block_on(kestrel_worker::textgen::serve(config))
        }
        Command::BenchGeneration(args) => {
            use kestrel_worker::textgen::bench;
            let config = bench::GenBenchConfig {
                model_dir: args.model,
                variants: args.variants,
                concurrency: args.concurrency,
                seconds: args.seconds,
                max_tokens: args.max_tokens,
                python: args.python,
                threads: args.threads,
            };
            let exe = std::env::current_exe()?;
            let points = runtime.block_on(bench::run(&config, &exe))?;
            print!("{}", bench::table(&points));
            Ok(())
        }
        Command::Requantize(args) => {
            let dtype =
                kestrel_worker::textgen::variants::variant_dtype(&args.dtype).ok_or_else(|| {
                    anyhow::anyhow!("unknown --dtype {:?} (q8_0, q4_0, f16, f32)", args.dtype)
                })?;
            let started = std::time::Instant::now();
            kestrel_worker::textgen::variants::requantize(&args.input, &args.output, dtype)?;
            tracing::info!(output = %args.output.display(), seconds = started.elapsed().as_secs_f64(), "variant written");
            Ok(())
        }
        Command::Serve(args) => {
            let (device, load) = args.model.load_options()?;
            let variant_name = args.variant.clone().unwrap_or_else(|| "f32".to_string());
            let variant = args.model.variant(&variant_name, device)?;
            let config = ServeConfig {
                model_dir: args.model.model.clone(),
                variant,
                device,
                load,
                addr: SocketAddr::new(args.host, args.port),
                limits: BatchLimits {
                    max_queue: args.max_queue,
                    max_batch: args.max_batch.max(1),
                    max_batch_tokens: args.max_batch_tokens,
                    max_wait: Duration::from_millis(args.max_batch_wait_ms),
                },
                drain_delay: Duration::from_secs_f64(args.drain_delay_seconds),
                request_timeout: Duration::from_secs_f64(args.request_timeout_seconds),
                max_inputs: args.max_inputs,
                long_input: if args.long_input == "refuse" {
                    LongInput::Refuse
                } else {
                    LongInput::Truncate
                },
            };
            runtime.block_on(serve(config))
        }
        Command::Profile(args) => run_profile(args, &runtime),
        Command::Load(args) => {
            use kestrel_worker::bench::closed_loop_inputs;
            let r = runtime.block_on(async {
                if args.warmup_seconds > 0.0 {
                    closed_loop_inputs(
                        &args.url,
                        args.concurrency,
                        args.inputs,
                        args.warmup_seconds,
                    )
                    .await;
                }
                closed_loop_inputs(&args.url, args.concurrency, args.inputs, args.seconds).await
            });
            let doc = serde_json::json!({
                "concurrency": args.concurrency,
                "inputs_per_request": args.inputs,
                "requests": r.ok,
                "rejected": r.rejected,
                "errors": r.errors,
                "seconds": r.seconds,
                "requests_per_second": r.throughput(),
                "items_per_second": r.throughput() * args.inputs as f64,
                "p50_ms": r.percentile(50.0),
                "p95_ms": r.percentile(95.0),
                "p99_ms": r.percentile(99.0),
            });
            println!("{doc}");
            Ok(())
        }
        Command::Bench(args) => {
            let threads = match args.threads {
                0 => std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
                n => n,
            };
            let config = BenchConfig {
                model_dir: args.model,
                variants: args.variants,
                concurrency: args.concurrency,
                seconds: args.seconds,
                threads,
                max_batch: args.max_batch,
                python: args.python,
                serve_args: Vec::new(),
                overload_seconds: args.overload_seconds,
                rounds: args.rounds.max(1),
            };
            let report = runtime.block_on(kestrel_worker::bench::run(&config))?;
            println!("{report}");
            Ok(())
        }
    }
}

fn run_profile(args: ProfileArgs, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if kestrel_worker::textgen::is_gguf_folder(&args.model.model) {
        return run_generation_profile(args);
    }
    let (device, load) = args.model.load_options()?;
    let config = ProfileConfig {
        model_dir: args.model.model.clone(),
        device,
        load,
        batch_sizes: args.batch_sizes.clone(),
        concurrency: args.concurrency.clone(),
        seconds_per_point: args.seconds_per_point,
        max_batch: args.max_batch,
    };
    let mut variants: Vec<VariantProfile> = Vec::new();
    for name in &args.variants {
        let spec = args.model.variant(name, device)?;
        if args.in_process {
            variants.push(runtime.block_on(profile::profile_variant(&config, &spec))?);
            continue;
        }
        // One child per variant: its memory and warm-up are its own.
        let list = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("profile")
            .args(["--model", &args.model.model.display().to_string()])
            .args(["--device", &args.model.device])
            .args(["--threads", &config.load.threads.to_string()])
            .args(["--variants", name])
            .args(["--batch-sizes", &list(&args.batch_sizes)])
            .args(["--concurrency", &list(&args.concurrency)])
            .args(["--seconds-per-point", &args.seconds_per_point.to_string()])
            .args(["--max-batch", &args.max_batch.to_string()])
            .args(["--json", "--in-process"]);
        if let Some(b) = args.model.backend {
            cmd.args(["--backend", b.as_str()]);
        }
        if let Some(lib) = &args.model.ort_library {
            cmd.arg("--ort-library").arg(lib);
        }
        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
        if !out.status.success() {
            anyhow::bail!("profiling variant {name} failed ({})", out.status);
        }
        let doc: profile::Profile = serde_json::from_slice(&out.stdout)?;
        variants.extend(doc.variants);
    }
    let doc = profile::document(&config, variants);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", profile::table(&doc));
    }
    Ok(())
}

/// `profile` on a GGUF folder: each variant in its own child (memory figures are its own).
fn run_generation_profile(args: ProfileArgs) -> anyhow::Result<()> {
    use kestrel_worker::textgen::{VARIANTS, profile as tp};
    let dir = &args.model.model;
    // The embeddings defaults mean "every variant" here.
    let variants: Vec<String> = if args.variants == ["f32", "int8"] {
        VARIANTS.iter().map(|v| v.to_string()).collect()
    } else {
        args.variants.clone()
    };
    let sizes: Vec<usize> = if args.batch_sizes == [1, 2, 4, 8, 16, 32, 64] {
        vec![1, 4, 16]
    } else {
        args.batch_sizes.clone()
    };
    let steps = (args.seconds_per_point * 8.0).clamp(4.0, 200.0) as usize;
    let mut out = Vec::new();
    for name in &variants {
        if args.in_process {
            out.push(tp::profile_variant(dir, name, &sizes, steps)?);
            continue;
        }
        let list = sizes
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("profile")
            .arg("--model")
            .arg(dir)
            .args(["--variants", name, "--batch-sizes", &list])
            .args(["--seconds-per-point", &args.seconds_per_point.to_string()])
            .args(["--json", "--in-process"])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        if !child.status.success() {
            anyhow::bail!("profiling variant {name} failed ({})", child.status);
        }
        let doc: profile::Profile = serde_json::from_slice(&child.stdout)?;
        out.extend(doc.variants);
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let doc = tp::document(
        profile::machine(kestrel_worker::engine::Device::Cpu, threads),
        out,
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", profile::table(&doc));
    }
    Ok(())
}
