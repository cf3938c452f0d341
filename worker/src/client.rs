//! A minimal HTTP/1.1 client for the bench, the profile and the tests (loopback only).

use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

/// A response: status, the Retry-After header if any, whether the server closes the
/// connection after it, and the body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<String>,
    pub closes_connection: bool,
    pub body: Bytes,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpClient { inner }
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Reply> {
        let mut builder = Request::builder().method(method).uri(url);
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = self.inner.request(request).await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let closes_connection = response
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            retry_after,
            closes_connection,
            body,
        })
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<Reply> {
        self.request(Method::GET, url, None).await
    }

    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> anyhow::Result<Reply> {
        self.request(Method::POST, url, Some(serde_json::to_vec(body)?))
            .await
    }
}
