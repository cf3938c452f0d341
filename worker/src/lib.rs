//! kestrel-worker: Kestrel's bundled inference server for the embeddings task
//! (all-MiniLM-L6-v2) and the text-generation task (Gemma 3 from GGUF, `textgen`).
//!
//! `engine` runs the model (candle or ONNX Runtime behind one trait), `batcher` owns
//! the queue and forms batches, `api` is the HTTP surface, `metrics` the contract's
//! series, `serve` the process lifecycle, `profile` and `bench` the measurements.

pub mod admission;
pub mod api;
pub mod batcher;
pub mod bench;
pub mod client;
pub mod corpus;
pub mod engine;
pub mod gelu;
pub mod metrics;
pub mod profile;
pub mod q8;
pub mod serve;
pub mod textgen;
mod vector;
