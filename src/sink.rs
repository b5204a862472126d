//! A recording webhook receiver: what `relay demo` delivers to, and what the tests use as the
//! public and private applications. Answers with a scripted sequence of statuses.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::{self, StatusCode};

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request headers, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Status answered.
    pub answered: u16,
    /// When the request arrived.
    pub at: std::time::Instant,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A running sink.
pub struct Sink {
    /// Its URL.
    pub url: String,
    /// Every request, in arrival order.
    pub rx: mpsc::UnboundedReceiver<Received>,
    script: Arc<Mutex<VecDeque<u16>>>,
    token: CancellationToken,
}

impl Sink {
    /// Starts a sink on 127.0.0.1 (an ephemeral port) answering 200 unless scripted otherwise.
    pub async fn start() -> std::io::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Sink::serve(listener))
    }

    /// Serves a sink on `listener`.
    pub fn serve(listener: TcpListener) -> Sink {
        let addr: SocketAddr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (tx, rx) = mpsc::unbounded_channel();
        let script: Arc<Mutex<VecDeque<u16>>> = Arc::default();
        let token = CancellationToken::new();
        let s = script.clone();
        tokio::spawn(http::serve(
            listener,
            http::ServerOptions {
                tls: None,
                max_connections: 256,
                name: "sink",
            },
            move |req, _| {
                let tx = tx.clone();
                let script = s.clone();
                async move {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    let body = http::read_body(req.into_body(), 64 * 1024 * 1024)
                        .await
                        .map(|b| b.to_vec())
                        .unwrap_or_default();
                    let status = script
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front()
                        .unwrap_or(200);
                    let _ = tx.send(Received {
                        headers,
                        body,
                        answered: status,
                        at: std::time::Instant::now(),
                    });
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                    http::text(status, "")
                }
            },
            token.clone(),
        ));
        Sink {
            url: format!("http://{addr}/hook"),
            rx,
            script,
            token,
        }
    }

    /// Answers the next requests with these statuses, then 200 again.
    pub fn script(&self, statuses: &[u16]) {
        self.script.lock().unwrap_or_else(|p| p.into_inner()).extend(statuses);
    }

    /// The next request, waiting at most `within`.
    pub async fn next(&mut self, within: std::time::Duration) -> Option<Received> {
        tokio::time::timeout(within, self.rx.recv()).await.ok().flatten()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
